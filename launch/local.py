"""Start N CPU processes on 127.0.0.1 that train together, to test multi-host code on one machine.

    python launch/local.py --num_processes 2 --devices_per_process 4 -- \
        --config configs/stage1.py:tiny --workdir /tmp/run

Each process gets `--config.distributed.*` flags pointing at a coordinator on a free local port and
`devices_per_process` fake CPU devices. If one process fails, the others are stopped.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=4)
    parser.add_argument("--module", default="llmcxr_jax.train", help="the program every process runs")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="arguments after -- go to the program")
    args = parser.parse_args()
    if args.num_processes < 1 or args.devices_per_process < 1:
        parser.error(f"--num_processes and --devices_per_process must be at least 1, got {args.num_processes} and "
                     f"{args.devices_per_process}")
    train_args = [a for a in args.train_args if a != "--"]
    address = f"127.0.0.1:{free_port()}"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices_per_process}")
    procs = []
    for pid in range(args.num_processes):
        cmd = [sys.executable, "-m", args.module, *train_args,
               f"--config.distributed.coordinator_address={address}",
               f"--config.distributed.num_processes={args.num_processes}",
               f"--config.distributed.process_id={pid}", "--config.distributed.timeout_s=120"]
        procs.append(subprocess.Popen(cmd, env=env))
    status = 0
    while any(p.poll() is None for p in procs):
        failed = [p for p in procs if p.poll() not in (None, 0)]
        if failed:
            status = failed[0].returncode
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            break
        time.sleep(0.2)
    for p in procs:
        p.wait()
    # a process killed by a signal has a negative code: report the first non-zero one, never max() them away
    return status or next((p.returncode for p in procs if p.returncode), 0)


if __name__ == "__main__":
    sys.exit(main())
