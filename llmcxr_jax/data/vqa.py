"""CXR-VQA pairs in the original's per-study format, and their merge onto the selected images (SPEC §6 "VQA").

Files `pXX/pNNNNNNNN/sMMMMMMMM.txt` hold one line: a Python-literal list of dicts, read with
`ast.literal_eval` (never `eval`). As in the original, subject_id/study_id come from the path and a dict is kept
iff, with those two keys added, it has exactly 4 keys including `question` and `answer` (so: just a question and
an answer). Values that are not strings become text as the original's `str.format` wrote them (`2` → "2");
None is dropped (its `dropna`; `ast.literal_eval` cannot give NaN). Each kept pair repeats once for every image of
its study that is in the split, has valid codes and is in the stage-2 selection; pairs with no such image are
dropped (the original's right merge + `dropna`). Everything dropped is counted.
"""
from __future__ import annotations

import ast
import collections
import dataclasses
import logging
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path

from llmcxr_jax.data.mimic_files import ImageRow
from llmcxr_jax.data.text_files import open_utf8

_SUBJECT_DIR = re.compile(r"p(\d+)")
_STUDY_FILE = re.compile(r"s(\d+)\.txt")
_ADDED_KEYS = frozenset(("subject_id", "study_id"))

log = logging.getLogger(__name__)


class VqaFileError(ValueError):
    """A VQA file is misplaced, not UTF-8, or not one line holding a Python-literal list of dicts."""


@dataclasses.dataclass(frozen=True)
class QaPair:
    subject_id: int
    study_id: int
    question: str
    answer: str


@dataclasses.dataclass(frozen=True)
class VqaRecord:
    """A QA pair on one image; `codes` are looked up by dicom_id when written."""

    dicom_id: str
    subject_id: str
    study_id: str
    question: str
    answer: str


def _ids_from_path(path: Path) -> tuple[int, int]:
    subject, study = _SUBJECT_DIR.fullmatch(path.parent.name), _STUDY_FILE.fullmatch(path.name)
    if not (subject and study):
        raise VqaFileError(f"{path}: expected a path .../pNNNNNNNN/sMMMMMMMM.txt (subject and study ids)")
    return int(subject.group(1)), int(study.group(1))


def _is_qa(item: object) -> bool:
    return (isinstance(item, dict) and len(set(item) | _ADDED_KEYS) == 4 and item.get("question") is not None
            and item.get("answer") is not None)


def read_vqa_file(path: Path) -> tuple[list[QaPair], int]:
    """The well-formed pairs of one study file and how many items were not (dropped, as the original did)."""
    subject_id, study_id = _ids_from_path(path)
    lines = open_utf8(path, VqaFileError).read().splitlines()
    if len(lines) != 1:
        raise VqaFileError(f"{path}: expected exactly one line, found {len(lines)}")
    try:
        items = ast.literal_eval(lines[0])
    except (ValueError, SyntaxError, MemoryError, RecursionError) as err:
        raise VqaFileError(f"{path}:1: not a Python literal ({type(err).__name__}: {err})") from None
    if not isinstance(items, list):
        raise VqaFileError(f"{path}:1: expected a list of dicts, got a {type(items).__name__}")
    pairs = [QaPair(subject_id, study_id, str(item["question"]), str(item["answer"])) for item in items
             if _is_qa(item)]
    return pairs, len(items) - len(pairs)


def read_vqa_dir(root: Path) -> tuple[list[QaPair], dict]:
    """All pairs under `root` in sorted path order, and counts `files`, `pairs`, `malformed`."""
    pairs, malformed = [], 0
    files = sorted(root.glob("**/*.txt"))
    for path in files:
        file_pairs, file_malformed = read_vqa_file(path)
        pairs.extend(file_pairs)
        malformed += file_malformed
    log.info("VQA %s: %d files, %d pairs, %d malformed items dropped", root, len(files), len(pairs), malformed)
    return pairs, {"files": len(files), "pairs": len(pairs), "malformed": malformed}


def merge_onto_images(pairs: Iterable[QaPair], rows: Sequence[ImageRow], usable: Collection[str],
                      study_splits: Mapping[tuple[int, int], str], split: str) -> tuple[list[VqaRecord], dict]:
    """Records of `split`: each pair of a study in this split on each of its `usable` images (sorted by dicom_id).

    `rows` are the split's images, `usable` the dicom_ids with valid codes inside the selection, `study_splits`
    maps every (subject, study) of the split CSV to our split name. Counts: `records`, `pairs` (of this split's
    studies), `no_selected_image` (pairs dropped for want of an image); pairs of studies in no split at all are
    counted as `unknown_study` (reported with each split, since they belong to none).
    """
    images = collections.defaultdict(list)
    for row in sorted(rows, key=lambda r: r.dicom_id):
        if row.dicom_id in usable:
            images[(int(row.subject_id), int(row.study_id))].append(row)
    records, counts = [], collections.Counter(records=0, pairs=0, no_selected_image=0, unknown_study=0)
    for pair in pairs:
        study = (pair.subject_id, pair.study_id)
        if study not in study_splits:
            counts["unknown_study"] += 1
            continue
        if study_splits[study] != split:
            continue
        counts["pairs"] += 1
        if not images[study]:
            counts["no_selected_image"] += 1
        records.extend(VqaRecord(r.dicom_id, r.subject_id, r.study_id, pair.question, pair.answer)
                       for r in images[study])
    counts["records"] = len(records)
    log.info("VQA %s: %d records from %d pairs; %d pairs without a selected image, %d of unknown studies",
             split, counts["records"], counts["pairs"], counts["no_selected_image"], counts["unknown_study"])
    return records, dict(counts)
