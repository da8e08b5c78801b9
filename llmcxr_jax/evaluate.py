"""LLM-CXR's MIMIC-CXR generation evaluation (SPEC §14) as a resumable runner, its result files, and the CLI.

    python -m llmcxr_jax.evaluate mimic --checkpoint CKPT --vqgan DIR --manual_dir DIR --eval_ids FILE --out DIR
                                        [--codes PATH] [--rank R --world W] [--seed 42] [--image_mode resample]
    python -m llmcxr_jax.evaluate reports --generated FILE... [--reference FILE...] [--labeler none|phantom]
    python -m llmcxr_jax.evaluate decode --results FILE... --vqgan DIR --out DIR

`mimic` selects images as file generate_eval.py does (validate ∪ test, PA/AP, sorted dicom_ids, restricted to
the user's eval_dicom_ids.pickle, IMPRESSION-only references; images without one IMPRESSION, a report file or
codes are skipped and counted), takes this rank's share `[rank::world]`, and for every image generates one
report from its codes and one image from its reference report. Each finished record is appended to
`llm-cxr__eval_results_{rank}_{world}.jsonl` and flushed, so a killed run restarts where it stopped; a finished
shard is also written as the original's pickle (a list of dicts). `reports` scores such files (metrics.py);
`decode` turns them into the original's decoding outputs (JPEGs and a reports file).

Unlike the original's unseeded `random.choice`, each record's instructions and sampling seed are fixed by
(seed, dicom_id), so a record's outputs do not depend on sharding or on where a run was interrupted (with
batch_size 1; a larger batch shares one seed per batch). What else fixes the outputs (the model, the codes, the
sampler's options, the batch size) is recorded beside the results, and a resumed run with other settings is
refused.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import io
import json
import os
import pickle
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from llmcxr_jax import metrics, parallel
from llmcxr_jax.data.mimic_codes import default_codes_path, load_codes, require_vqgan, vqgan_metadata
from llmcxr_jax.data.mimic_files import (METADATA_CSV, REPORTS_DIR, SELECTED_VIEWS, SPLIT_CSV, WHERE,
                                         read_metadata_csv, read_split_csv, require_files, rows_of_split)
from llmcxr_jax.data.mimic_records import REPORT_SKIPS, ReportCache
from llmcxr_jax.data.plain_pickle import PlainPickleError, load_plain_pickle
from llmcxr_jax.data.text_files import decode_utf8
from llmcxr_jax.lm_checkpoint import checkpoint_identity
from llmcxr_jax.prompts import DEFAULT_SEED, choose_instruction
from vqgan_flax.atomic import write_atomic
from vqgan_flax.safe_pickle import UnsafePickleError, restricted_load

RESULTS_PREFIX = "llm-cxr__eval_results"
RECORD_FIELDS = ("dicom_id", "subject_id", "raw_report", "raw_image", "gen_report", "gen_image")
ORIGINAL_IMAGE_OFFSET = 50281  # CXR_VQ_TOKENIZER_LEN: raw_image holds code + this
REPORT_TOKENS, IMAGE_TOKENS = 128, 300  # max_new_tokens of generate_eval.py
CONVERT_EVAL_IDS = """\
eval_dicom_ids.pickle is read without running any code in it, so it must hold a list of dicom_id strings (or a
dict keyed by them). Convert it once, in an environment you trust:
    python -c "import pickle, pandas as pd; ids = pd.read_pickle('eval_dicom_ids.pickle'); \\
pickle.dump(sorted(map(str, ids)), open('eval_dicom_ids.plain.pickle', 'wb'))"
and pass the .plain.pickle file."""


class EvalInputError(ValueError):
    """An evaluation input or an existing results file is unusable; the message names the file and the fix."""


class EvalSampler(Protocol):
    """What the runner needs from a sampler (llmcxr_jax.generate.Sampler through GenerateSampler, or a stand-in).

    Both take a batch and one seed, and return one output per input, in order.
    """

    def cxr_to_report(self, codes: np.ndarray, *, seed: int, instructions: Sequence[str],
                      max_new_tokens: int) -> Sequence[str]:
        """Reports for int codes (B, h, w)."""

    def report_to_cxr(self, reports: Sequence[str], *, seed: int, instructions: Sequence[str],
                      max_new_tokens: int) -> Sequence[Any]:
        """Codes (h·w ints, any shape) per report, or None where no image came out."""


class GenerateSampler:
    """`llmcxr_jax.generate.Sampler` as an EvalSampler.

    One call per batch, each row with its own instruction. Report→CXR defaults to image_mode "resample", the
    original's loop (sample freely until exactly h·w codes come back, SPEC §10) but bounded by `max_tries`; a row
    whose tries run out gets no image (None), which the original's decoding step drops. "constrained" always
    gives an image but samples from another distribution than the original.
    """

    def __init__(self, sampler: Any, image_mode: str = "resample", max_tries: int = 10):
        self.sampler, self.image_mode, self.max_tries = sampler, image_mode, max_tries

    def cxr_to_report(self, codes: np.ndarray, *, seed: int, instructions: Sequence[str],
                      max_new_tokens: int) -> list[str]:
        return self.sampler.cxr_to_report(codes=codes, instruction=list(instructions), seed=seed,
                                          max_new_tokens=max_new_tokens).texts

    def report_to_cxr(self, reports: Sequence[str], *, seed: int, instructions: Sequence[str],
                      max_new_tokens: int) -> list[np.ndarray | None]:
        from llmcxr_jax.generate import ImageGenerationError

        try:
            return self.sampler.report_to_cxr(list(reports), instruction=list(instructions), seed=seed,
                                              image_mode=self.image_mode, max_tries=self.max_tries,
                                              max_new_tokens=max_new_tokens).codes
        except ImageGenerationError as err:  # the rows that did yield an image keep it
            return err.codes


@dataclasses.dataclass(frozen=True)
class EvalItem:
    dicom_id: str
    subject_id: str
    report: str  # IMPRESSION only (parse_report stage 2)
    codes: np.ndarray  # int (h, w)


@dataclasses.dataclass(frozen=True)
class EvalSelection:
    """The evaluated images in order, how many eval ids were left out and why, and which codes (as
    `mimic_codes.vqgan_metadata` describes them) the images were given as."""

    items: tuple[EvalItem, ...]
    counts: Mapping[str, int]
    codes: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class RunSummary:
    path: Path
    shard: int  # images of this rank
    resumed: int  # records found from an earlier run
    written: int  # records written now
    pickle_path: Path  # the complete shard in the original's format


# ---- selection --------------------------------------------------------------------------------------------------

def read_eval_ids(path: str | Path) -> frozenset[str]:
    """The dicom_ids of the user's eval_dicom_ids.pickle: a list of ids or a dict keyed by them."""
    if not Path(path).is_file():
        raise EvalInputError(f"{path}: no such file (the eval_dicom_ids.pickle of the evaluation protocol)")
    try:
        obj = load_plain_pickle(path, "a list of dicom_id strings")
    except PlainPickleError as err:
        raise EvalInputError(f"{err}\n{CONVERT_EVAL_IDS}") from err
    ids = list(obj.keys()) if isinstance(obj, dict) else obj
    if not all(type(i) is str for i in ids):
        raise EvalInputError(f"{path}: dicom_ids must be strings\n{CONVERT_EVAL_IDS}")
    return frozenset(ids)


def select_mimic_eval(manual_dir: str | Path, codes_path: str | Path, eval_ids: Iterable[str],
                      grid: tuple[int, int] = (16, 16), num_codes: int = 1024) -> EvalSelection:
    """generate_eval.py's dataset, with counts of what was left out and why.

    Validate ∪ test images with metadata and ViewPosition PA or AP, sorted by dicom_id, restricted to `eval_ids`;
    an image is then skipped without a report file (`no_report`), with one that is not UTF-8
    (`undecodable_report`), without exactly one IMPRESSION (`parse_failure`) or without codes (`no_codes`).
    Entries of the original's pickle with codes of the wrong length or range are skipped as `invalid_codes`;
    generate_eval.py did not check them, but no model input can be made from them.
    """
    manual_dir = Path(manual_dir)
    require_files(manual_dir, {name: WHERE[name] for name in (SPLIT_CSV, METADATA_CSV, REPORTS_DIR)})
    eval_ids = frozenset(eval_ids)
    metadata = read_metadata_csv(manual_dir / METADATA_CSV)
    frontal = sorted((r for r in rows_of_split(read_split_csv(manual_dir / SPLIT_CSV), "validation")
                      if r.dicom_id in metadata and metadata[r.dicom_id].view in SELECTED_VIEWS),
                     key=lambda r: r.dicom_id)
    chosen = [r for r in frontal if r.dicom_id in eval_ids]
    codes = load_codes(Path(codes_path).resolve(), grid, num_codes)
    reports = ReportCache(manual_dir / REPORTS_DIR, stage=2)
    counts = collections.Counter(dict.fromkeys((*REPORT_SKIPS, "invalid_codes", "no_codes"), 0))
    counts.update(eval_ids=len(eval_ids), eval_ids_not_pa_ap_validate_test=len(eval_ids) - len(chosen))
    items = []
    for row in chosen:
        report, reason = reports.get(row.subject_id, row.study_id)
        if reason is None and row.dicom_id not in codes.by_id:
            reason = "invalid_codes" if row.dicom_id in codes.invalid else "no_codes"
        if reason is not None:
            counts[reason] += 1
            continue
        items.append(EvalItem(row.dicom_id, row.subject_id, report, np.asarray(codes.by_id[row.dicom_id])))
    counts["selected"] = len(items)
    return EvalSelection(tuple(items), dict(counts), vqgan_metadata(codes))


# ---- result files -----------------------------------------------------------------------------------------------

def results_path(out_dir: str | Path, rank: int, world: int) -> Path:
    return Path(out_dir) / f"{RESULTS_PREFIX}_{rank}_{world}.jsonl"


def _complete_lines(path: Path) -> tuple[list[str], int]:
    """The newline-terminated lines of a results file and their byte length; a torn last line is not one."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    # split on "\n" only: str.splitlines also breaks at U+2028, \x1c and others, which JSON strings may hold raw
    return decode_utf8(data[:end], path, EvalInputError).split("\n")[:-1], end


def read_jsonl(path: str | Path) -> list[dict]:
    """The JSON objects of a JSONL file, one per line; a final line without its newline (never finished) is ignored."""
    path = Path(path)
    records = []
    for n, line in enumerate(_complete_lines(path)[0], 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise EvalInputError(f"{path}:{n}: not a JSON line ({err})") from None
        if not isinstance(record, dict):
            raise EvalInputError(f"{path}:{n}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def read_results(path: str | Path) -> list[dict]:
    """The records of a results file (ours, JSONL; or the original's `.pickle` list, read without running code),
    each with exactly the original's fields in its order."""
    if Path(path).suffix == ".pickle":
        records = load_plain_pickle(path, "a list of result records", allow_none=True)
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise EvalInputError(f"{path}: expected a list of result dicts")
    else:
        records = read_jsonl(path)
    for n, record in enumerate(records, 1):
        if tuple(record) != RECORD_FIELDS:
            raise EvalInputError(f"{path}: record {n}: fields {list(record)}, expected {list(RECORD_FIELDS)}")
        if problem := _record_problem(record):
            raise EvalInputError(f"{path}: record {n} ({record['dicom_id']!r}): {problem}")
    return records


def _record_problem(record: dict) -> str | None:
    """What makes a result record unusable downstream (ids become file names, images are code lists), or None."""
    if not isinstance(record["dicom_id"], str):
        return f"dicom_id is a {type(record['dicom_id']).__name__}, not a str"
    for key in ("raw_report", "gen_report"):
        if record[key] is not None and not isinstance(record[key], str):
            return f"{key} is a {type(record[key]).__name__}, not a str or null"
    for key in ("raw_image", "gen_image"):
        value = record[key]
        if value is not None and not (isinstance(value, list) and
                                      all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
            return f"{key} is not a flat list of int codes or null"
    return None


def write_results_pickle(records: Sequence[Mapping], path: str | Path) -> None:
    """The original's results file: a pickle (protocol 4) of a list of dicts, written atomically.

    The bytes are read back with a loader that refuses every global before they are written, so the file holds
    only plain dicts, lists, str, int and None and can be opened anywhere without running code.
    """
    path = Path(path)
    data = pickle.dumps([dict(r) for r in records], protocol=4)
    try:
        restricted_load(io.BytesIO(data), str(path), {}, "plain dicts, lists, str, int and None")
    except UnsafePickleError as err:
        raise ValueError(f"results for {path} hold non-plain values (convert numpy values with .tolist()): "
                         f"{err}") from err
    write_atomic(path, data)


def _differences(before: Mapping[str, Any], now: Mapping[str, Any], prefix: str = "") -> list[str]:
    """`name: value there, value now` per setting of `now` that differs from `before`; nested names joined by dots."""
    diffs = []
    for key, value in now.items():
        if key not in before:
            diffs.append(f"{prefix}{key}: not recorded there, {value!r} now")
        elif isinstance(value, dict) and isinstance(before[key], dict):
            diffs += _differences(before[key], value, f"{prefix}{key}.")
        elif before[key] != value:
            diffs.append(f"{prefix}{key}: {before[key]!r} there, {value!r} now")
    return diffs


def _check_settings(path: Path, settings: dict, counts: Mapping[str, int]) -> None:
    """Record the run's settings and selection counts beside its results (same name, .json), and refuse to continue
    results made with other settings."""
    sidecar = path.with_suffix(".json")
    settings = json.loads(json.dumps(settings))  # compared as they read back (tuples become lists)
    if sidecar.exists():
        try:
            recorded = json.loads(sidecar.read_text())["settings"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise EvalInputError(f"{sidecar}: unreadable settings of {path.name} ({type(err).__name__}: {err}); "
                                 "use another --out directory") from None
        diffs = _differences(recorded, settings)
        if diffs:
            raise EvalInputError(f"{sidecar}: cannot resume {path.name} with other settings ({'; '.join(diffs)}); "
                                 "use another --out directory")
    write_atomic(sidecar, (json.dumps({"settings": settings, "counts": dict(counts)}, indent=1) + "\n").encode())


def _resume(path: Path, shard_ids: set[str]) -> set[str]:
    """Ids already in the results file; cuts off a torn last line so appending continues cleanly."""
    if not path.exists():
        return set()
    _, end = _complete_lines(path)
    if end < path.stat().st_size:
        with path.open("r+b") as f:
            f.truncate(end)
    done: set[str] = set()
    for n, record in enumerate(read_results(path), 1):
        dicom_id = record["dicom_id"]
        if dicom_id not in shard_ids or dicom_id in done:
            why = "repeats an earlier line" if dicom_id in done else "is not in this rank's share of the selection"
            raise EvalInputError(f"{path}:{n}: dicom_id {dicom_id!r} {why}; the file comes from another selection "
                                 "or --world; use another --out directory")
        done.add(dicom_id)
    return done


# ---- the runner -------------------------------------------------------------------------------------------------

def record_seed(seed: int, dicom_id: str) -> int:
    """The sampling seed of one image: fixed by the run seed and the id (31 bits, fits any RNG seed)."""
    return int.from_bytes(hashlib.sha256(f"{seed}\x00{dicom_id}".encode()).digest()[:4], "little") >> 1


def _generated_codes(value: Any, size: int, dicom_id: str) -> list[int] | None:
    if value is None:
        return None
    flat = np.asarray(value).reshape(-1)
    if flat.size != size or flat.dtype.kind not in "iu" or (flat < 0).any():
        raise ValueError(f"sampler returned {flat.size} codes of dtype {flat.dtype} for {dicom_id}; expected "
                         f"{size} non-negative integers or None")
    return flat.tolist()


def _generate(sampler: EvalSampler, batch: Sequence[EvalItem], seed: int, image_offset: int,
              report_tokens: int, image_tokens: int) -> list[dict]:
    ids = [item.dicom_id for item in batch]
    batch_seed = record_seed(seed, ids[0])
    texts = sampler.cxr_to_report(np.stack([item.codes for item in batch]), seed=batch_seed,
                                  instructions=[choose_instruction(seed, i, "cxr2report") for i in ids],
                                  max_new_tokens=report_tokens)
    images = sampler.report_to_cxr([item.report for item in batch], seed=batch_seed,
                                   instructions=[choose_instruction(seed, i, "report2cxr") for i in ids],
                                   max_new_tokens=image_tokens)
    if len(texts) != len(batch) or len(images) != len(batch):
        raise ValueError(f"sampler returned {len(texts)} reports and {len(images)} images for {len(batch)} inputs")
    records = []
    for item, text, image in zip(batch, texts, images):
        if not isinstance(text, str):
            raise ValueError(f"sampler returned {type(text).__name__} as the report for {item.dicom_id}, not str")
        raw_image = (item.codes.reshape(-1).astype(np.int64) + image_offset).tolist()
        records.append(dict(zip(RECORD_FIELDS, (item.dicom_id, item.subject_id, item.report, raw_image, text,
                                                _generated_codes(image, item.codes.size, item.dicom_id)))))
    return records


def run_mimic_protocol(selection: EvalSelection, make_sampler: Callable[[], EvalSampler], out_dir: str | Path, *,
                       rank: int = 0, world: int = 1, seed: int = DEFAULT_SEED, batch_size: int = 1,
                       image_offset: int = ORIGINAL_IMAGE_OFFSET, report_tokens: int = REPORT_TOKENS,
                       image_tokens: int = IMAGE_TOKENS,
                       sampler_settings: Mapping[str, Any] | None = None) -> RunSummary:
    """Generate this rank's share `selection.items[rank::world]`, appending one flushed JSON line per image.

    Ids already in the results file are not generated again; `make_sampler` is called only if work remains.
    `sampler_settings` (JSON values) say which sampler `make_sampler` builds, e.g. the model and image mode;
    they are compared on resumption with the run's own settings and the selection's codes.
    Once the shard is complete its records are also written as the original's pickle (same name, .pickle).
    """
    if not 0 <= rank < world or batch_size < 1:
        raise ValueError(f"need 0 <= rank < world and batch_size >= 1, got rank {rank}, world {world}, "
                         f"batch_size {batch_size}")
    if not selection.items:
        counts = ", ".join(f"{k}: {v}" for k, v in selection.counts.items())
        raise EvalInputError(f"nothing to evaluate: no image passed the selection ({counts})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = results_path(out_dir, rank, world)
    shard = selection.items[rank::world]
    settings = {"seed": seed, "rank": rank, "world": world, "batch_size": batch_size, "image_offset": image_offset,
                "report_tokens": report_tokens, "image_tokens": image_tokens, "codes": dict(selection.codes),
                **(sampler_settings or {})}
    _check_settings(path, settings, selection.counts)
    done = _resume(path, {item.dicom_id for item in shard})
    todo = [item for item in shard if item.dicom_id not in done]
    if todo:
        sampler = make_sampler()
        with path.open("a", encoding="utf-8") as f:
            for start in range(0, len(todo), batch_size):
                batch = todo[start:start + batch_size]
                for record in _generate(sampler, batch, seed, image_offset, report_tokens, image_tokens):
                    f.write(json.dumps(record) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
    path.touch()  # a rank with no share of a small selection still leaves its (empty) results
    pickle_path = path.with_suffix(".pickle")
    write_results_pickle(read_results(path), pickle_path)
    return RunSummary(path, len(shard), len(done), len(todo), pickle_path)


# ---- CLI --------------------------------------------------------------------------------------------------------

def _sampler_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What of `_load_sampler(args, step)` changes the outputs, recorded so a resumed run cannot switch models.

    `row_keys`: each row's random key folds in its position in the whole batch (one sampler call per batch since
    2026-11-29; before, one call per instruction group numbered its own rows), so results written before that,
    which lack the entry, are not continued with other draws at --batch_size > 1.
    """
    return {"checkpoint": checkpoint_identity(args.checkpoint), "image_mode": args.image_mode,
            "max_tries": args.max_tries, "row_keys": "position in the batch"}


def _load_sampler(args: argparse.Namespace, step: int | None) -> EvalSampler:
    """The sampler of the recorded identity: a training workdir's `step`, even if a newer one has been saved since."""
    from llmcxr_jax.generate import Sampler  # JAX and the model: imported only when there is work to do
    sampler = Sampler.from_checkpoint(args.checkpoint, vqgan_dir=args.vqgan, batch_size=args.batch_size, step=step)
    return GenerateSampler(sampler, args.image_mode, args.max_tries)


def _texts_by_id(paths: Sequence[str], key: str, id_key: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for path in paths:
        for n, record in enumerate(read_jsonl(path), 1):
            if id_key not in record or key not in record:
                raise EvalInputError(f"{path}:{n}: no field {id_key!r} or {key!r} (fields: {list(record)})")
            if record[id_key] in out:
                raise EvalInputError(f"{path}:{n}: {id_key} {record[id_key]!r} appears twice in {list(paths)}")
            if not isinstance(record[key], str):
                raise EvalInputError(f"{path}:{n}: {key} is {record[key]!r}, not a text")
            out[record[id_key]] = record[key]
    return out


def score_result_files(generated: Sequence[str], reference: Sequence[str], *, generated_key: str = "gen_report",
                       reference_key: str = "raw_report", id_key: str = "dicom_id",
                       labeler: metrics.Labeler | None = None) -> dict[str, float]:
    """Report scores of results files, pairing generated and reference texts by id; finding labels only with a
    `labeler` (the phantom report judge knows phantom reports, not MIMIC's)."""
    gen = _texts_by_id(generated, generated_key, id_key)
    ref = _texts_by_id(reference, reference_key, id_key)
    missing = sorted(set(gen) - set(ref))
    if missing:
        raise EvalInputError(f"{len(missing)} generated ids have no reference in {list(reference)}, e.g. "
                             f"{missing[:5]}")
    ids = list(gen)
    return {"n": len(ids), **metrics.report_scores([gen[i] for i in ids], [ref[i] for i in ids], labeler)}


def decode_results(paths: Sequence[str | Path], vqgan_dir: str | Path, out_dir: str | Path,
                   batch_size: int = 32) -> dict[str, Any]:
    """SPEC §14's decoding step (decode_cxr_all.py): records holding a None are dropped; each kept record's
    generated image becomes OUT/generated_imgs_jpg/<dicom_id>.jpg (saved as the original did), and
    OUT/generated_reports holds, per kept record, its dicom_id, reference report, generated report and a blank
    line. Images already there are kept, so an interrupted run resumes."""
    import vqgan_flax
    from vqgan_flax.decode import check_ids, decode_to_files

    records, origin = [], {}
    for path in paths:
        for record in read_results(path):
            records.append(record)
            origin.setdefault(record["dicom_id"], path)
    kept = [r for r in records if all(value is not None for value in r.values())]
    model = vqgan_flax.load(vqgan_dir)
    (h, w), num_codes = model.config.grid, model.config.num_codes
    codes = {}
    for r in kept:
        image = r["gen_image"]  # read_results: a flat list of ints
        if len(image) != h * w or not all(0 <= code < num_codes for code in image):
            raise EvalInputError(f"{origin[r['dicom_id']]}: gen_image of {r['dicom_id']} is not {h * w} codes in "
                                 f"[0, {num_codes}) for the {h}x{w} grid of {vqgan_dir}")
        codes[r["dicom_id"]] = np.asarray(image, dtype=np.int32).reshape(h, w)
    check_ids(codes, Path(paths[0]))
    out = Path(out_dir)
    made_from = {"vqgan": vqgan_flax.checkpoint.read_fingerprint(vqgan_dir),
                 "results": sorted(str(Path(p).resolve()) for p in paths)}
    decoded = decode_to_files(model, codes, out / "generated_imgs_jpg", batch_size, "jpg", made_from)
    reports = "".join(f"{r['dicom_id']}\n{r['raw_report']}\n{r['gen_report']}\n\n" for r in kept)
    write_atomic(out / "generated_reports", reports.encode("utf-8"))
    return {"records": len(records), "dropped_with_none": len(records) - len(kept), "decoded": decoded,
            "images": str(out / "generated_imgs_jpg"), "reports": str(out / "generated_reports")}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llmcxr_jax.evaluate", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    mimic = sub.add_parser("mimic", help="run LLM-CXR's MIMIC-CXR generation protocol (resumable)")
    mimic.add_argument("--checkpoint", required=True, help="LM checkpoint: Orbax, HF directory or training workdir")
    mimic.add_argument("--vqgan", required=True, help="VQ-GAN directory")
    mimic.add_argument("--manual_dir", required=True, type=Path, help="MIMIC-CXR files (see data/mimic_files.py)")
    mimic.add_argument("--codes", type=Path, help="codes directory or the original's pickle "
                                                  "(default: codes/ or the pickle in --manual_dir)")
    mimic.add_argument("--eval_ids", required=True, type=Path, help="LLM-CXR's data/eval_dicom_ids.pickle")
    mimic.add_argument("--out", required=True, type=Path, help="results directory")
    mimic.add_argument("--rank", type=int, default=0, help="this process's share [rank::world]; run one process "
                                                           "per accelerator, e.g. with CUDA_VISIBLE_DEVICES=rank")
    mimic.add_argument("--world", type=int, default=1, help="number of processes")
    mimic.add_argument("--seed", type=int, default=DEFAULT_SEED)
    mimic.add_argument("--batch_size", type=int, default=1, help="images per sampler call (1, as the original: "
                                                                 "each image's samples then depend only on its id)")
    mimic.add_argument("--image_mode", choices=("resample", "constrained"), default="resample",
                       help="report→CXR sampling: the original's resampling loop (bounded by --max_tries) or "
                            "constrained decoding (see llmcxr_jax.generate)")
    mimic.add_argument("--max_tries", type=int, default=10)
    mimic.add_argument("--image_offset", type=int, default=ORIGINAL_IMAGE_OFFSET,
                       help="added to codes in raw_image (the tokenizer's image offset)")
    reports = sub.add_parser("reports", help="score generated reports in results files")
    reports.add_argument("--generated", required=True, nargs="+", help="results JSONL file(s) (all ranks)")
    reports.add_argument("--reference", nargs="+", help="JSONL file(s) with the references (default: --generated, "
                                                        "whose raw_report holds them)")
    reports.add_argument("--labeler", choices=("phantom", "none"), default="none",
                         help="finding labels for P/R/F1: none (text metrics only), or the phantom report judge "
                              "(phantom reports only: it knows nothing of MIMIC's language)")
    reports.add_argument("--generated_key", default="gen_report")
    reports.add_argument("--reference_key", default="raw_report")
    reports.add_argument("--id_key", default="dicom_id")
    decode = sub.add_parser("decode", help="the original's decoding step: JPEGs and a reports file from results")
    decode.add_argument("--results", required=True, nargs="+", help="results files (.jsonl, or the original's "
                                                                     ".pickle), all ranks")
    decode.add_argument("--vqgan", required=True, help="VQ-GAN directory (the one the LM was trained with)")
    decode.add_argument("--out", required=True, type=Path, help="directory for generated_imgs_jpg/ and "
                                                                "generated_reports")
    decode.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args(argv)
    try:
        result = _run(args)
    except (ValueError, OSError) as e:  # missing or malformed inputs; the message names the file
        sys.exit(f"error: {e}")
    json.dump(result, sys.stdout, indent=1)
    print()


def _run(args: argparse.Namespace) -> dict[str, Any]:
    if args.command == "mimic":
        parallel.enable_compilation_cache()
        from vqgan_flax import checkpoint as vqgan_checkpoint

        eval_ids = read_eval_ids(args.eval_ids)
        vqgan = vqgan_checkpoint.read_config(args.vqgan)  # the codes' grid and codebook are the VQ-GAN's
        codes_path = args.codes or default_codes_path(args.manual_dir)
        selection = select_mimic_eval(args.manual_dir, codes_path, eval_ids, vqgan.grid, vqgan.num_codes)
        if selection.codes["fingerprint"]:  # the original's pickle records none
            require_vqgan(selection.codes, str(codes_path), fingerprint=vqgan_checkpoint.read_fingerprint(args.vqgan))
        settings = _sampler_settings(args)
        summary = run_mimic_protocol(selection, lambda: _load_sampler(args, settings["checkpoint"]["step"]),
                                     args.out, rank=args.rank, world=args.world, seed=args.seed,
                                     batch_size=args.batch_size, image_offset=args.image_offset,
                                     sampler_settings=settings)
        result = {"results": str(summary.path), "pickle": str(summary.pickle_path), "shard": summary.shard,
                  "resumed": summary.resumed, "written": summary.written, "selection": dict(selection.counts)}
    elif args.command == "decode":
        result = decode_results(args.results, args.vqgan, args.out, args.batch_size)
    else:
        result = score_result_files(args.generated, args.reference or args.generated,
                                    generated_key=args.generated_key, reference_key=args.reference_key,
                                    id_key=args.id_key,
                                    labeler=metrics.PHANTOM_REPORTS if args.labeler == "phantom" else None)
    return result


if __name__ == "__main__":
    main()
