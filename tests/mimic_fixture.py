"""A small MIMIC-CXR-shaped tree for tests, written into a temporary directory, with its own description.

The description (`Fixture`) says, for every image and study, what was written: split, view, study date and time,
which kind of report (or none) and which kind of codes (valid, missing, wrong length, out of range). Tests derive
their expectations from it, never from the code under test. No MIMIC data is involved: every id and text is made up.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import pickle
from pathlib import Path

import numpy as np

from vqgan_flax.codes import CodesMeta, CodesWriter, import_pickle

GRID = (16, 16)
NUM_CODES = 1024
FINGERPRINT = "fixture-vqgan-a"
REPORT_KINDS = ("findings_impression", "impression_only", "findings_only", "neither", "missing")
CODE_KINDS = ("valid", "missing", "wrong_length", "out_of_range")
VIEWS = ("PA", "LATERAL", "AP", "LL", "PA", "AP")
OUR_SPLITS = {"train": ("train",), "validation": ("validate", "test")}  # built split -> MIMIC's


@dataclasses.dataclass(frozen=True)
class Study:
    subject_id: str
    study_id: str
    date: str
    time: str
    report: str  # one of REPORT_KINDS

    @property
    def findings(self) -> str:
        return f"Findings of study {self.study_id}: lungs   clear."

    @property
    def impression(self) -> str:
        return f"No acute process in {self.study_id}."

    def text(self) -> str:
        """The report file: a header, then the sections its kind has, with ragged lines and blank lines."""
        head = "                FINAL REPORT\n EXAMINATION:  CHEST\n\n INDICATION:  ___ with cough\n\n"
        findings = f" FINDINGS:\n\n {self.findings}\n \n"
        impression = f" IMPRESSION:\n {self.impression}\n"
        body = {"findings_impression": findings + impression, "impression_only": impression,
                "findings_only": findings, "neither": " COMPARISON: none.\n"}[self.report]
        return head + body


@dataclasses.dataclass(frozen=True)
class Image:
    dicom_id: str
    study: Study
    split: str  # MIMIC's: train / validate / test
    view: str
    codes: str  # one of CODE_KINDS
    index: int  # seeds its code values

    def code_values(self) -> list[int]:
        values = ((np.arange(GRID[0] * GRID[1]) * (self.index + 3) + self.index) % NUM_CODES).tolist()
        if self.codes == "wrong_length":
            return values[:-1]
        if self.codes == "out_of_range":
            return values[:-1] + [NUM_CODES]
        return values


@dataclasses.dataclass(frozen=True)
class Fixture:
    root: Path
    images: tuple[Image, ...]
    studies: tuple[Study, ...]
    codes_path: Path
    codes_format: str  # "dir" (as the encoder writes it), "pickle" (the original's) or "imported" (pickle -> dir)
    selection_file: frozenset[str] | None  # ids written to the selection pickle, if one was written


def describe() -> tuple[tuple[Study, ...], tuple[Image, ...]]:
    """10 subjects (6 train, 2 validate, 2 test), 1-3 studies each, 1-3 images per study: 40-odd images.

    Study ids do not follow dates, so "earliest" must come from StudyDate/StudyTime; subject 3 has two studies
    on one day (time decides). Report and code kinds cycle so that every kind occurs in both splits.
    """
    splits = ("train",) * 6 + ("validate",) * 2 + ("test",) * 2
    studies, images = [], []
    for s, split in enumerate(splits):
        subject = f"{10 + s % 2}{s:06d}"
        for k in range(3 if s == 3 else 1 + s % 3):
            date = "21800101" if (s == 3 and k < 2) else f"2180{(k * 7 + s) % 12 + 1:02d}{k + 10}"
            time = f"{(k + 1) * 31111 % 235959}.5" if s == 3 else "101010.125"
            study = Study(subject, f"5{s:02d}{(9 - k) * 1111:05d}", date, time,
                          REPORT_KINDS[len(studies) % len(REPORT_KINDS)])
            studies.append(study)
            for j in range(1 + (s + k) % 3):
                n = len(images)
                codes = "valid" if n % 5 else CODE_KINDS[1 + (n // 5) % 3]
                images.append(Image(f"{hashlib.md5(str(n).encode()).hexdigest()[:8]}-{s}{k}{j}", study, split,
                                    VIEWS[(n + k) % len(VIEWS)], codes, n))
    return tuple(studies), tuple(images)


def reconstructed_selection(fx: Fixture) -> set[str]:
    """Expected stage-2 ids without a selection file: all PA/AP images of each subject's earliest PA/AP
    study by (date, time), from the description."""
    frontal = [i for i in fx.images if i.view in ("PA", "AP")]
    first = {}
    for i in frontal:
        when = (int(i.study.date), float(i.study.time))
        if i.study.subject_id not in first or when < first[i.study.subject_id][0]:
            first[i.study.subject_id] = (when, i.study.study_id)
    return {i.dicom_id for i in frontal if first[i.study.subject_id][1] == i.study.study_id}


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def write_mimic_tree(root: Path, *, codes_format: str = "dir", selection: bool = False) -> Fixture:
    """Write the described tree under `root`; the selection pickle, if asked for, deliberately differs from the
    reconstruction (one non-frontal image in, the first frontal image out), so tests can tell which was used."""
    studies, images = describe()
    root.mkdir(parents=True, exist_ok=True)
    _write_csv(root / "mimic-cxr-2.0.0-split.csv", ["dicom_id", "study_id", "subject_id", "split"],
               [[i.dicom_id, i.study.study_id, i.study.subject_id, i.split] for i in images])
    _write_csv(root / "mimic-cxr-2.0.0-metadata.csv",
               ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
                "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
                "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"],
               [[i.dicom_id, i.study.subject_id, i.study.study_id, "CHEST (PA AND LAT)", i.view, "3056", "2544",
                 i.study.date, i.study.time, "CHEST (PA AND LAT)", "postero-anterior", "Erect"] for i in images])
    for study in studies:
        if study.report != "missing":
            path = (root / "reports" / "files" / f"p{study.subject_id[:2]}" / f"p{study.subject_id}"
                    / f"s{study.study_id}.txt")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(study.text())
    present = [i for i in images if i.codes != "missing"]
    if codes_format == "dir":
        codes_path = root / "codes"
        valid = [i for i in present if i.codes == "valid"]
        writer = CodesWriter(codes_path, CodesMeta(FINGERPRINT, GRID, NUM_CODES, {"name": "fixture"}))
        for chunk in (valid[:7], valid[7:]):  # two shards
            writer.write([i.dicom_id for i in chunk],
                         np.stack([np.asarray(i.code_values()).reshape(GRID) for i in chunk]))
    else:
        codes_path = root / "mimic-cxr-256-txvloss_codebook_indices.pickle"
        codes_path.write_bytes(pickle.dumps({i.dicom_id: i.code_values() for i in present}))
        if codes_format == "imported":
            import_pickle(codes_path, root / "codes", CodesMeta(FINGERPRINT, GRID, NUM_CODES, {"name": "fixture"}))
            codes_path.unlink()
            codes_path = root / "codes"
    chosen = None
    if selection:
        frontal = [i for i in images if i.view in ("PA", "AP")]
        lateral = next(i for i in images if i.view == "LATERAL")
        chosen = frozenset(i.dicom_id for i in frontal[1:]) | {lateral.dicom_id}
        (root / "mimic-cxr-2.0.0-selected-pa-ap-earlist-study.pickle").write_bytes(
            pickle.dumps({dicom_id: "selected" for dicom_id in sorted(chosen)}))
    return Fixture(root, images, studies, codes_path, codes_format, chosen)


def write_vqa_tree(root: Path, studies: tuple[Study, ...]) -> dict[tuple[str, str], list[tuple[str, str]]]:
    """One VQA file per study: three good pairs and three malformed items each. The third good one carries its
    own subject_id, which the original overwrote from the path, leaving 4 keys; the malformed ones are a dict
    without an answer, a dict with an extra key, and a string. Returns (subject, study) -> its good pairs."""
    good = {}
    for study in studies:
        pairs = [(f"Is there an effusion in {study.study_id}?", "No."), ("What view is this?", "Frontal."),
                 ("Any devices?", f"None in {study.study_id}.")]
        items = [{"question": q, "answer": a} for q, a in pairs[:2]]
        items += [{"question": pairs[2][0], "answer": pairs[2][1], "subject_id": 999}, {"question": "q"},
                  {"question": "q", "answer": "a", "x": 1}, "not a dict"]
        path = root / f"p{study.subject_id[:2]}" / f"p{study.subject_id}" / f"s{study.study_id}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(repr(items) + "\n")
        good[(study.subject_id, study.study_id)] = pairs
    return good
