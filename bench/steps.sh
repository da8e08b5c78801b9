# Sourced by bench/gpu_suite.sh and bench/gpu_profile.sh: run their steps within one time budget, BUDGET_S
# seconds counted from the script's start, so that a call fits the device lease it was planned for.
#
# step NAME LIMIT_S COMMAND...: COMMAND under min(LIMIT_S, what is left of the budget), printing its seconds
# (SIGTERM at the limit, SIGKILL 10 s later, to the command and its children); a step with under half its limit
# (at least 20 s) left is skipped by name: cut shorter, a 2.8B step would spend it all starting and compiling and
# measure nothing. Returns COMMAND's status (124: timed out; 1 when skipped).
step() {
  local name=$1 limit=$2 started=$SECONDS left=$((BUDGET_S - SECONDS)) status=0 needed
  shift 2
  needed=$((limit / 2 > 20 ? limit / 2 : 20))
  if ((left < needed)); then
    echo "[${0##*/}] $name: skipped, ${left} s of the ${BUDGET_S} s budget left, under the ${needed} s it needs (${SECONDS} s in all)"
    return 1
  fi
  ((limit > left)) && limit=$left
  timeout -k 10 "$limit" "$@" || status=$?
  if ((status == 124)); then
    echo "[${0##*/}] $name: timed out after ${limit} s"
  elif ((status != 0)); then
    echo "[${0##*/}] $name: failed (status $status)"
  fi
  echo "[${0##*/}] $name: $((SECONDS - started)) s (${SECONDS} s in all)"
  return "$status"
}
