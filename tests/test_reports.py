"""Report parsing: expected outputs written by hand from SPEC.md §5's rules (the original's `_parse_report_*`)."""
from __future__ import annotations

import pytest

from llmcxr_jax.data.reports import ReportParseError, normalize_report, parse_report

SKIP = ReportParseError
MIMIC_LIKE = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough  // eval for PNA

 COMPARISON:  ___

 FINDINGS:

 The lungs are clear without focal consolidation.  No pleural effusion or
 pneumothorax is seen.
 
 IMPRESSION:

 No acute cardiopulmonary process.
"""

# (report text, stage-1 result, stage-2 result); SKIP = ReportParseError (the original skipped the sample).
CASES = {
    "mimic layout": (
        MIMIC_LIKE,
        "The lungs are clear without focal consolidation.  No pleural effusion or pneumothorax is seen. "
        "No acute cardiopulmonary process.",
        "No acute cardiopulmonary process."),
    "impression before findings is lost in stage 1": (
        "IMPRESSION: No acute process.\nFINDINGS: Lungs clear.",
        "Lungs clear.",
        "No acute process. FINDINGS: Lungs clear."),
    "two impressions after findings keep the literals": (
        "FINDINGS: A.\nIMPRESSION: B.\nIMPRESSION: C.",
        "A. IMPRESSION: B. IMPRESSION: C.",
        SKIP),
    "two findings fall back to the single impression": (
        "FINDINGS: A.\nFINDINGS: B.\nIMPRESSION: C.",
        "C.",
        "C."),
    "two findings and no impression": ("FINDINGS: A.\nFINDINGS: B.", SKIP, SKIP),
    "impression only": ("WET READ: ___ eval\nIMPRESSION:\nMild edema.", "Mild edema.", "Mild edema."),
    "no sections": ("Comparison: none.\nLungs clear.", SKIP, SKIP),
    "lowercase markers are not markers": ("Findings: A.\nImpression: B.", SKIP, SKIP),
    "lowercase findings, exact impression": ("findings: A.\nIMPRESSION: B.", "B.", "B."),
    "markers need the colon": ("FINDINGS A.\nIMPRESSION B.", SKIP, SKIP),
    "trailing notification stays": (
        "FINDINGS: A.\nIMPRESSION: B.\nNOTIFICATION: Dr. ___ paged at 10:00.",
        "A. B. NOTIFICATION: Dr. ___ paged at 10:00.",
        "B. NOTIFICATION: Dr. ___ paged at 10:00."),
    "empty findings leave a leading space": ("FINDINGS:\nIMPRESSION: B.", " B.", "B."),
    "empty impression leaves a trailing space": ("FINDINGS: A.\nIMPRESSION:", "A. ", ""),
    "both empty leave one space": ("FINDINGS:\n\nIMPRESSION:\n", " ", ""),
    "findings header only is an empty result": ("FINDINGS:", "", SKIP),
    "spaces inside lines are kept, lines joined by one": (
        "  FINDINGS:   Lungs   are clear.  \n\n\n   Heart normal.\t\n IMPRESSION:  \n\n  XXXX normal.  ",
        "Lungs   are clear. Heart normal. XXXX normal.",
        "XXXX normal."),
    "windows and old mac newlines": ("FINDINGS: A.\r\nB.\rIMPRESSION: C.\r\n", "A. B. C.", "C."),
    "markers glued to words": ("FINDINGS:Lungs clear.IMPRESSION:Normal.", "Lungs clear. Normal.", "Normal."),
    "empty text": ("", SKIP, SKIP),
    "blank lines only": ("\n \n\t\n", SKIP, SKIP),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("stage", [1, 2])
def test_parse_report(name, stage):
    text, *expected = CASES[name]
    want = expected[stage - 1]
    if want is SKIP:
        with pytest.raises(ReportParseError, match=f"stage {stage} needs"):
            parse_report(text, stage)
    else:
        assert parse_report(text, stage) == want


def test_normalize_report():
    assert normalize_report(" a  b \n\n c\r\n\td\t\n") == "a  b c d"


def test_parse_error_is_a_value_error_and_bad_stage_is_refused():
    assert issubclass(ReportParseError, ValueError)
    with pytest.raises(ValueError, match="stage must be 1 or 2"):
        parse_report("IMPRESSION: x", 3)
