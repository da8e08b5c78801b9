"""Config files: finding and loading them, checking a user's against the shipped one, and their mistakes as one
line each (the trainer CLIs' `--config`; `llmcxr_jax.train` defines the flag)."""

from __future__ import annotations

import difflib
import numbers
import sys
import traceback
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from absl import flags

FLAGS = flags.FLAGS

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def load_config(spec: str) -> Any:
    """`configs/stage1.py:demo` (or `stage1:demo`, found in the repository's configs/) → its ConfigDict."""
    import importlib.util

    path, _, arg = spec.partition(":")
    file = Path(path) if path.endswith(".py") else CONFIG_DIR / f"{path}.py"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such config file")
    module_spec = importlib.util.spec_from_file_location(f"llmcxr_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg)


def config_from_flags() -> Any:
    """`--config` with its overrides; a file that failed to load is a ValueError naming it."""
    try:
        config = FLAGS.config
        config.keys()  # ml_collections defers a load failure to the config's first use
    except OSError as e:
        while e.__cause__ is not None:
            e = e.__cause__
        raise ValueError(f"--config {FLAGS['config'].config_filename}: {str(e).strip().splitlines()[-1].strip()}"
                         ) from None
    return config


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with config mistakes as one line: an unknown `--config.key` (ml_collections raises
    AttributeError, which absl does not report), a config file without get_config, or one whose code fails
    (absl would print the traceback, or the traceback inside its message): its error at its line."""
    try:
        return FLAGS(argv)
    except flags.IllegalFlagValueError as e:
        lines = str(e).strip().splitlines()  # the flag, then (for a file) the traceback's last line
        sys.exit(f"error: {' '.join(dict.fromkeys([lines[0], lines[-1]]))}")
    except flags.Error as e:  # absl's own: an unknown flag, a missing value
        sys.exit(f"error: {e}")
    except Exception as e:
        file = _config_file(argv)
        line = e.lineno if isinstance(e, SyntaxError) and Path(e.filename or "") == Path(file) else next(
            (f.lineno for f in reversed(traceback.extract_tb(e.__traceback__)) if Path(f.filename) == Path(file)),
            None)
        # ml_collections' AttributeErrors carry the repr of a message with a newline in it
        reason = str(e).replace("\\n", " ").replace("\\'", "").replace("'", "").strip('"') \
            if isinstance(e, AttributeError) else str(e)
        if line is not None:  # raised by the config file's own code while it loaded
            sys.exit(f"error: --config {file}:{line}: {type(e).__name__}: {reason}")
        if isinstance(e, AttributeError) and "has no attribute get_config" in reason:
            sys.exit(f"error: --config {file}: defines no get_config(arg) function")
        if isinstance(e, AttributeError):
            sys.exit(f"error: a --config.KEY override names no config field: {reason}")
        raise


def _config_file(argv: list[str]) -> str:
    """The file of `--config FILE[:VARIANT]` (or `--config=...`) in `argv`."""
    for i, arg in enumerate(argv):
        if arg in ("--config", "-config") and i + 1 < len(argv):
            return argv[i + 1].partition(":")[0]
        if arg.startswith(("--config=", "-config=")):
            return arg.partition("=")[2].partition(":")[0]
    return "(the config file)"


def _same_kind(value: Any, reference: Any) -> bool:
    """Whether a config value may stand where the reference config has `reference`: an int where a float is,
    numpy numbers, and None (ml_collections' "unset", which the code reads as the default)."""
    if value is None:
        return True
    if isinstance(reference, bool) or isinstance(value, bool):
        return isinstance(value, (bool, np.bool_)) and isinstance(reference, bool)
    if isinstance(reference, int):
        return isinstance(value, numbers.Integral)
    if isinstance(reference, float):
        return isinstance(value, numbers.Real)
    if isinstance(reference, tuple):
        return isinstance(value, (tuple, list))
    return isinstance(value, type(reference))


def config_problems(config: Any, reference: Any, prefix: str = "") -> list[str]:
    """Fields the trainer's own config file does not have (a typo would leave its default silently in force),
    fields it has that `config` lacks, and values of another kind than its, each named; nested sections are
    compared the same way."""
    problems = []
    for key, value in config.items():
        name = prefix + key
        if key not in reference:
            close = difflib.get_close_matches(key, list(reference.keys()), n=1)
            problems.append(f"{name} is no field" + (f" (did you mean {prefix}{close[0]}?)" if close else ""))
        elif isinstance(reference[key], ml_collections.ConfigDict):
            if isinstance(value, ml_collections.ConfigDict):
                problems += config_problems(value, reference[key], f"{name}.")
            else:
                problems.append(f"{name} is a {type(value).__name__}, not a section")
        elif not _same_kind(value, reference[key]):
            problems.append(f"{name}={value!r} is a {type(value).__name__}, not a {type(reference[key]).__name__}")
    for key, value in reference.items():  # e.g. a file written before the field existed
        if key not in config:
            shown = "a section" if isinstance(value, ml_collections.ConfigDict) else f"{value!r} there"
            problems.append(f"{prefix}{key} is missing ({shown})")
    return problems


def check_for_trainer(config: Any, source: str, example_config: str, config_fields: tuple[str, ...]) -> None:
    """Refuse the other trainer's config by name (`config_fields` are top-level fields only this trainer's configs
    have), then fields and kinds that `example_config`'s file does not have (every variant of a shipped file has
    the same), rather than an AttributeError from deep inside or a typo that leaves a default in force."""
    if missing := [f for f in config_fields if f not in config]:
        raise ValueError(f"--config {source} is not a config for this trainer (it has no {', '.join(missing)}); "
                         f"e.g. --config {example_config}")
    reference = CONFIG_DIR / Path(example_config.partition(":")[0]).name  # absent where only the package is
    if reference.is_file() and (problems := config_problems(config, load_config(str(reference)))):
        raise ValueError(f"--config {source}: {'; '.join(problems)} (the fields of configs/{reference.name})")
