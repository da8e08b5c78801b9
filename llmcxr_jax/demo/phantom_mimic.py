"""Phantoms laid out exactly like MIMIC-CXR's files, so the demo runs the real MIMIC path end to end.

Each phantom is one subject with one PA study and one image: `images/<dicom_id>.png`, the two CSVs and
`reports/files/pXX/pNNNNNNNN/sMMMMMMMM.txt`. Train cases are phantom indices 0..n-1 and test cases start at
the phantom builder's TEST_OFFSET, both from one seed. The labels stay beside them (`labels.json`) for scoring.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
from PIL import Image

from llmcxr_jax.data import mimic_files
from llmcxr_jax.data.cxr_phantoms_builder import STUDY_BASE, SUBJECT_BASE, TEST_OFFSET
from llmcxr_jax.data.phantom import LABELS, make_phantoms


@dataclasses.dataclass(frozen=True)
class Case:
    dicom_id: str
    split: str  # MIMIC's: "train" or "test"
    image_path: str
    report: str
    labels: tuple[int, ...]  # in LABELS order


def write_manual_dir(root: Path, *, seed: int, num_train: int, num_test: int, size: int) -> list[Case]:
    """Write images, CSVs, reports and labels.json under `root`; returns the cases in order (train, then test)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    cases, split_rows, meta_rows = [], [], []
    for split, start, count in (("train", 0, num_train), ("test", TEST_OFFSET, num_test)):
        for offset, phantom in enumerate(make_phantoms(seed, start, count, size)):
            index = start + offset
            subject, study = str(SUBJECT_BASE + index), str(STUDY_BASE + index)
            image_path = root / "images" / f"{phantom.id}.png"
            Image.fromarray(phantom.image).save(image_path)
            path = mimic_files.report_path(root / mimic_files.REPORTS_DIR, subject, study)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(phantom.report)
            split_rows.append([phantom.id, study, subject, split])
            meta_rows.append([phantom.id, "PA", "21800101", "120000.000"])
            cases.append(Case(phantom.id, split, str(image_path), phantom.report,
                              tuple(phantom.labels[k] for k in LABELS)))
    _write_csv(root / mimic_files.SPLIT_CSV, ["dicom_id", "study_id", "subject_id", "split"], split_rows)
    _write_csv(root / mimic_files.METADATA_CSV, ["dicom_id", "ViewPosition", "StudyDate", "StudyTime"], meta_rows)
    (root / "labels.json").write_text(json.dumps({"labels": list(LABELS),
                                                  "cases": [dataclasses.asdict(c) for c in cases]}))
    return cases


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def label_matrix(cases: list[Case]) -> np.ndarray:
    return np.asarray([c.labels for c in cases], np.int32).reshape(-1, len(LABELS))
