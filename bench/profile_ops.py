"""Where the device time goes: trace one call with the JAX profiler and total the kernels (or XLA ops) by name.

Used by the benchmark scripts' `--profile` option on GPUs, where a lease is too short to open traces in a
viewer: the top entries are printed and written as JSON lines, with nothing to keep but that file.
"""

from __future__ import annotations

import collections
import json
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import jax
from jax.profiler import ProfileData


def device_op_times(xplane: Path, plane_prefix: str = "/device:") -> dict[str, dict[str, list[float]]]:
    """{line kind: {event name: [total ms, count]}} over the planes whose names start with `plane_prefix`.

    CUDA stream lines differ only by their stream number and are merged into the kind "stream".
    """
    kinds: dict[str, dict[str, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(lambda: [0.0, 0]))
    for plane in ProfileData.from_file(str(xplane)).planes:
        if not plane.name.startswith(plane_prefix):
            continue
        for line in plane.lines:
            kind = "stream" if line.name.startswith("Stream") else line.name
            for event in line.events:
                entry = kinds[kind][event.name]
                entry[0] += event.duration_ns / 1e6
                entry[1] += 1
    return kinds


_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\([^)]*\)|\S+) (?:.*?op_name=\"([^\"]*)\")?")


def kernel_key(name: str) -> str:
    """An HLO instruction's name as XLA:GPU names its kernel ('.' and '-' become '_'); trace names alike."""
    return re.sub(r"[.\-]", "_", name)


def hlo_sources(hlo_text: str) -> dict[str, dict[str, str]]:
    """{kernel name: {"shape", "op"}} for every instruction of compiled HLO text: its result shape and the JAX
    source op (metadata op_name), keyed by `kernel_key`, so that a trace's `gemm_fusion_dot_1085` can be told
    apart from the other matmuls."""
    sources = {}
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if match:
            name, shape, op = match.groups()
            sources.setdefault(kernel_key(name), {"shape": shape, "op": op or ""})
    return sources


def profile_top_ops(call: Callable[[], object], label: str, out: Path | None, top: int = 25,
                    plane_prefix: str = "/device:", hlo_text: str | None = None) -> list[dict]:
    """Trace `call` (which must block until its result is ready); print and append the `top` costliest entries
    of each line kind (XLA ops and CUDA streams are separate lines on GPUs), sorted by total time. With the
    compiled `hlo_text`, entries that name an HLO instruction also get its shape and source op."""
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        call()
        jax.profiler.stop_trace()
        kinds = device_op_times(next(Path(trace_dir).rglob("*.xplane.pb")), plane_prefix)
    sources = hlo_sources(hlo_text) if hlo_text else {}
    rows = []
    for kind, events in kinds.items():
        line_total = sum(ms for ms, _ in events.values())
        print(f"\n[{label}] {kind}: {line_total:.2f} ms in {sum(c for _, c in events.values())} events")
        for name, (ms, count) in sorted(events.items(), key=lambda kv: -kv[1][0])[:top]:
            source = sources.get(kernel_key(name), {})
            where = f"{source.get('shape', '')[:40]} {source.get('op', '')[-60:]}"
            print(f"  {ms:9.3f} ms {count:6d}x  {name[:70]}  {where}")
            rows.append({"label": label, "line": kind, "name": name, "ms": round(ms, 4), "count": count, **source})
    if out is not None:
        with out.open("a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return rows
