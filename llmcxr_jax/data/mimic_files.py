"""The MIMIC-CXR files a build reads from its manual directory: layout, CSV readers, report paths, view selection.

MIMIC-CXR is credentialed (PhysioNet), so nothing is downloaded: the user places the files, and a missing one is
named with where to get it. Layout of `manual_dir` (the original's `data/mimic-cxr-reports` plus the JPG CSVs):

    mimic-cxr-2.0.0-split.csv                              MIMIC-CXR-JPG 2.0.0
    mimic-cxr-2.0.0-metadata.csv                           MIMIC-CXR-JPG 2.0.0
    reports/files/pXX/pNNNNNNNN/sMMMMMMMM.txt              MIMIC-CXR 2.0.0, mimic-cxr-reports.zip
    codes/  or  mimic-cxr-256-txvloss_codebook_indices.pickle    VQ-GAN codes (see mimic_codes.py)
    mimic-cxr-2.0.0-selected-pa-ap-earlist-study.pickle    optional, from the LLM-CXR repository
    mimic-cxr-jpg_medvqa_v1/pXX/pNNNNNNNN/sMMMMMMMM.txt     optional VQA data (never released)
"""
from __future__ import annotations

import csv
import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from llmcxr_jax.data.plain_pickle import PlainPickleError, load_plain_pickle
from llmcxr_jax.data.text_files import open_utf8

SPLIT_CSV = "mimic-cxr-2.0.0-split.csv"
METADATA_CSV = "mimic-cxr-2.0.0-metadata.csv"
REPORTS_DIR = "reports"
SELECTION_PICKLE = "mimic-cxr-2.0.0-selected-pa-ap-earlist-study.pickle"
VQA_DIR = "mimic-cxr-jpg_medvqa_v1"
SPLITS = {"train": ("train",), "validation": ("validate", "test")}  # ours -> MIMIC's `split` values
SELECTED_VIEWS = ("PA", "AP")

WHERE = {
    SPLIT_CSV: "MIMIC-CXR-JPG 2.0.0 (https://physionet.org/content/mimic-cxr-jpg/2.0.0/, credentialed access): "
               "mimic-cxr-2.0.0-split.csv.gz, gunzipped",
    METADATA_CSV: "MIMIC-CXR-JPG 2.0.0 (https://physionet.org/content/mimic-cxr-jpg/2.0.0/, credentialed access): "
                  "mimic-cxr-2.0.0-metadata.csv.gz, gunzipped",
    REPORTS_DIR: "MIMIC-CXR 2.0.0 (https://physionet.org/content/mimic-cxr/2.0.0/, credentialed access): "
                 "mimic-cxr-reports.zip, unzipped into reports/ so that reports/files/p10/p10000032/s50414267.txt "
                 "exists",
}
CONVERT_SELECTION = f"""\
{SELECTION_PICKLE} from the LLM-CXR repository is read without running any code in it, so it must hold only
dicts, lists, str and int. If it holds pandas objects the read is refused; convert it once, in an environment you
trust (with pandas installed), keeping only the dicom_id keys:
    python -c "import pickle, pandas as pd; d = pd.read_pickle('{SELECTION_PICKLE}'); \\
pickle.dump(sorted(map(str, d.keys())), open('{SELECTION_PICKLE}.plain', 'wb'))"
and set `selection_path` of the builder config to the .plain file (or replace the original with it)."""


class ManualFilesMissingError(FileNotFoundError):
    """Required MIMIC-CXR files are not in the manual directory; the message says which and where to get them."""


class MimicFileError(ValueError):
    """A MIMIC-CXR input file is malformed (the message names the file, the line and the problem)."""


@dataclasses.dataclass(frozen=True)
class ImageRow:
    """One line of the split CSV (ids kept as strings, as the original read them)."""

    dicom_id: str
    subject_id: str
    study_id: str
    split: str


@dataclasses.dataclass(frozen=True)
class ImageMeta:
    """What the metadata CSV says about an image: its view and when its study was taken (raw strings)."""

    view: str
    study_date: str
    study_time: str
    line: int


def require_files(manual_dir: Path, needed: Mapping[str, str]) -> None:
    """Raise ManualFilesMissingError listing every missing path of `needed` (path -> where to get it).

    Paths are relative to `manual_dir` or absolute (a config may point outside it).
    """
    missing = [f"  {manual_dir / name}\n      from {where}" for name, where in needed.items()
               if not (manual_dir / name).exists()]
    if missing:
        raise ManualFilesMissingError(
            f"MIMIC-CXR files are missing from the manual directory {manual_dir}. Nothing is downloaded "
            "automatically (the data is credentialed). Place these and build again:\n" + "\n".join(missing))


def _read_csv(path: Path, columns: Sequence[str]) -> Iterable[tuple[int, dict[str, str]]]:
    """(line number, row) of a UTF-8 CSV whose header must hold `columns`; ragged rows are errors naming the line.

    Read as pandas (and so the original) reads it: a byte-order mark and blank lines are not data.
    """
    with open_utf8(path, MimicFileError, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise MimicFileError(f"{path}: empty file, expected a header with columns {list(columns)}")
        header = [header[0].removeprefix("\ufeff"), *header[1:]] if header else header
        absent = [c for c in columns if c not in header]
        if absent:
            raise MimicFileError(f"{path}: missing column(s) {absent} in header {header}")
        where = {c: header.index(c) for c in columns}
        for fields in reader:
            if not fields:
                continue
            if len(fields) != len(header):
                raise MimicFileError(f"{path}:{reader.line_num}: {len(fields)} fields, header has {len(header)}")
            yield reader.line_num, {c: fields[i].strip() for c, i in where.items()}


def read_split_csv(path: Path) -> list[ImageRow]:
    """Every image of the split CSV; unknown split names and repeated dicom_ids are errors."""
    known = {value for values in SPLITS.values() for value in values}
    rows, seen = [], {}
    for line, row in _read_csv(path, ("dicom_id", "study_id", "subject_id", "split")):
        if row["split"] not in known:
            raise MimicFileError(f"{path}:{line}: split {row['split']!r} is not one of {sorted(known)}")
        if not (row["subject_id"].isdigit() and row["study_id"].isdigit() and row["dicom_id"]):
            raise MimicFileError(f"{path}:{line}: subject_id/study_id must be digits and dicom_id non-empty, "
                                 f"got {row}")
        if row["dicom_id"] in seen:
            raise MimicFileError(f"{path}:{line}: dicom_id {row['dicom_id']} repeats line {seen[row['dicom_id']]}")
        seen[row["dicom_id"]] = line
        rows.append(ImageRow(row["dicom_id"], row["subject_id"], row["study_id"], row["split"]))
    return rows


def read_metadata_csv(path: Path) -> dict[str, ImageMeta]:
    """dicom_id -> view and study date/time from the metadata CSV (an id on two lines is an error: which view
    would count?)."""
    out: dict[str, ImageMeta] = {}
    for line, row in _read_csv(path, ("dicom_id", "ViewPosition", "StudyDate", "StudyTime")):
        if row["dicom_id"] in out:
            raise MimicFileError(f"{path}:{line}: dicom_id {row['dicom_id']} repeats line {out[row['dicom_id']].line}")
        out[row["dicom_id"]] = ImageMeta(row["ViewPosition"], row["StudyDate"], row["StudyTime"], line)
    return out


def rows_of_split(rows: Iterable[ImageRow], split: str) -> list[ImageRow]:
    """The images of our split `train` or `validation` (= MIMIC's validate ∪ test)."""
    return [r for r in rows if r.split in SPLITS[split]]


def report_path(reports_root: Path, subject_id: str, study_id: str) -> Path:
    """reports/files/p{first two digits}/p{subject}/s{study}.txt: one report per study, shared by its images."""
    return reports_root / "files" / f"p{subject_id[:2]}" / f"p{subject_id}" / f"s{study_id}.txt"


def load_selection(path: Path) -> frozenset[str]:
    """The dicom_ids of the selection pickle: the keys of a dict (as the original read it) or a list of ids."""
    try:
        obj = load_plain_pickle(path, "a dict keyed by dicom_id or a list of dicom_ids")
    except PlainPickleError as err:  # e.g. float values: only the keys count, which the recipe keeps
        raise MimicFileError(f"{err}\n{CONVERT_SELECTION}") from None
    ids = list(obj.keys()) if isinstance(obj, dict) else obj
    if not all(type(i) is str for i in ids):
        raise MimicFileError(f"{path}: dicom_ids must be strings\n{CONVERT_SELECTION}")
    return frozenset(ids)


def _when(meta: ImageMeta, path: Path) -> tuple[int, float]:
    try:
        return int(meta.study_date), float(meta.study_time)
    except ValueError:
        raise MimicFileError(f"{path}:{meta.line}: StudyDate {meta.study_date!r} / StudyTime {meta.study_time!r} "
                             "are not numbers (expected e.g. 21800506 and 213014.531)") from None


def reconstruct_selection(rows: Iterable[ImageRow], metadata: Mapping[str, ImageMeta],
                          metadata_path: Path) -> frozenset[str]:
    """Stage-2 images without the original's pickle: every PA/AP image of each subject's earliest PA/AP study.

    "Earliest" orders studies by (StudyDate, StudyTime), ties by study_id. The original's exact rule is
    undocumented (SPEC §6, unverified), so this is a reconstruction: prefer its pickle when you have it.
    """
    frontal = [r for r in rows if r.dicom_id in metadata and metadata[r.dicom_id].view in SELECTED_VIEWS]
    earliest: dict[str, tuple[int, float, str]] = {}
    for r in frontal:
        key = (*_when(metadata[r.dicom_id], metadata_path), r.study_id)
        earliest[r.subject_id] = min(earliest.get(r.subject_id, key), key)
    return frozenset(r.dicom_id for r in frontal if earliest[r.subject_id][2] == r.study_id)
