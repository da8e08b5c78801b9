"""Which MIMIC-CXR images become records, with which report text and task direction (SPEC §6), and why not.

The original's loop, made explicit: `ids = sorted(split ids − ids with invalid codes)`; id number i gets
CXR→report if i is even, report→CXR if odd, and i advances over every id, also those then skipped. An id is
skipped, in this order, when it is outside the stage-2 selection, has no codes, has no report file, or its
report is not UTF-8 (logged with the file and byte offset) or yields no text for the stage (`parse_report`).
The original skipped silently; here every skip is counted by reason.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

from llmcxr_jax.data.mimic_codes import Codes
from llmcxr_jax.data.mimic_files import ImageMeta, ImageRow, report_path
from llmcxr_jax.data.reports import ReportParseError, parse_report
from llmcxr_jax.data.text_files import NotUtf8Error, open_utf8

DIRECTIONS = ("cxr2report", "report2cxr")  # by i % 2
REPORT_SKIPS = ("no_report", "undecodable_report", "parse_failure")  # ReportCache's reasons
SKIP_REASONS = ("invalid_codes", "outside_selection", "no_codes", *REPORT_SKIPS)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PlannedRecord:
    """One image record, all but its codes (fetched when written)."""

    dicom_id: str
    subject_id: str
    study_id: str
    view: str
    report: str
    direction: str


class ReportCache:
    """Parsed report text per study (`None` + reason when unusable), read once for all images of the study."""

    def __init__(self, reports_root: Path, stage: int):
        self._root, self._stage = reports_root, stage
        self._cache: dict[tuple[str, str], tuple[str | None, str | None]] = {}

    def get(self, subject_id: str, study_id: str) -> tuple[str | None, str | None]:
        key = (subject_id, study_id)
        if key not in self._cache:
            self._cache[key] = self._load(report_path(self._root, subject_id, study_id))
        return self._cache[key]

    def _load(self, path: Path) -> tuple[str | None, str | None]:
        try:
            text = open_utf8(path).read()
        except FileNotFoundError:
            return None, "no_report"
        except NotUtf8Error as err:
            log.warning("report skipped: %s", err)
            return None, "undecodable_report"
        if not text.strip():  # counted with the reports that have no usable section, as the original did
            log.warning("report skipped: %s is empty", path)
            return None, "parse_failure"
        try:
            return parse_report(text, self._stage), None
        except ReportParseError:
            return None, "parse_failure"


def plan_split(rows: Sequence[ImageRow], metadata: Mapping[str, ImageMeta], codes: Codes, reports_root: Path,
               stage: int, selection: Collection[str] | None, split: str) -> tuple[list[PlannedRecord], dict]:
    """The records of one split in sorted dicom_id order, and counts: `kept` plus one entry per SKIP_REASONS.

    `selection` is None for stage 1 (all views); for stage 2 it holds the selected dicom_ids.
    """
    counts = collections.Counter({reason: 0 for reason in ("kept", *SKIP_REASONS)})
    reports = ReportCache(reports_root, stage)
    usable = sorted((r for r in rows if r.dicom_id not in codes.invalid), key=lambda r: r.dicom_id)
    counts["invalid_codes"] = len(rows) - len(usable)
    planned = []
    for i, row in enumerate(usable):
        if selection is not None and row.dicom_id not in selection:
            counts["outside_selection"] += 1
            continue
        if row.dicom_id not in codes.by_id:
            counts["no_codes"] += 1
            continue
        report, reason = reports.get(row.subject_id, row.study_id)
        if reason is not None:
            counts[reason] += 1
            continue
        meta = metadata.get(row.dicom_id)
        planned.append(PlannedRecord(row.dicom_id, row.subject_id, row.study_id, meta.view if meta else "",
                                     report, DIRECTIONS[i % 2]))
        counts["kept"] += 1
    log.info("MIMIC-CXR stage %d %s: %d of %d images kept; skipped: %s", stage, split, counts["kept"], len(rows),
             ", ".join(f"{k} {counts[k]}" for k in SKIP_REASONS))
    return planned, dict(counts)
