"""Which language model a checkpoint path holds: its kind, and a cheap identity (no JAX, nothing loaded).

The path alone does not identify a model: a training workdir goes on to later steps and a checkpoint can be
saved again over the same directory. A resumed evaluation compares identities so it never mixes two models.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

Kind = Literal["hf", "converted", "workdir"]


def checkpoint_kind(path: str | Path) -> Kind:
    """An HF directory (config.json), a converted checkpoint (meta.json) or a training workdir (checkpoints/)."""
    path = Path(path)
    if (path / "config.json").is_file():
        return "hf"
    if (path / "meta.json").is_file():
        return "converted"
    if (path / "checkpoints").is_dir():
        return "workdir"
    raise FileNotFoundError(f"{path}: not a model: expected config.json (HF directory), meta.json (converted "
                            "checkpoint) or checkpoints/ (training workdir)")


def finished_steps(workdir: Path) -> list[int]:
    """A training workdir's complete steps (Orbax renames a step's directory to its number once written)."""
    directory = workdir / "checkpoints"
    return [int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit()] if directory.is_dir() else []


def latest_step(workdir: Path) -> int:
    """The newest complete training step."""
    if not (steps := finished_steps(workdir)):
        raise FileNotFoundError(f"{workdir / 'checkpoints'}: no complete checkpoint step yet")
    return max(steps)


def checkpoint_identity(path: str | Path) -> dict[str, Any]:
    """Resolved path, kind, training step (workdirs; else None) and a digest of the model files' names, sizes
    and modification times: it changes when the model does, without reading gigabytes of weights."""
    path = Path(path).resolve()
    kind = checkpoint_kind(path)
    step = latest_step(path) if kind == "workdir" else None
    root = path / "checkpoints" / str(step) if step is not None else path
    digest = hashlib.sha256()
    for file in sorted(f for f in root.rglob("*") if f.is_file()):
        stat = file.stat()
        digest.update(f"{file.relative_to(root)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return {"path": str(path), "kind": kind, "step": step, "files": digest.hexdigest()}
