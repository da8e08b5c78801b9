"""MIMIC-style free-text reports for phantoms: "FINDINGS: ... IMPRESSION: ...", every finding stated.

Each finding has several phrasings (picked with the phantom's own generator), absent findings are negated the way
radiologists do ("No pneumothorax."), and sides, sizes and zones are spelled out, so the report parsing rules of
SPEC section 5 and a rule-based labeler both apply unchanged.
"""
from __future__ import annotations

import numpy as np

from llmcxr_jax.data.phantom.findings import DEVICE_KINDS, Finding

SEVERITY_WORDS = {"small": ("small",), "moderate": ("moderate", "moderate-sized"), "large": ("large",),
                  "mild": ("mild",), "severe": ("severe", "marked")}
SEVERITY_ADVERBS = {"mild": ("mildly",), "moderate": ("moderately",), "severe": ("markedly", "severely")}
ZONE_PLACES = {
    ("right", "upper"): ("right upper lobe", "right upper zone", "right apex"),
    ("right", "middle"): ("right middle lobe", "right mid lung", "right mid lung zone"),
    ("right", "lower"): ("right lower lobe", "right lung base", "right base"),
    ("left", "upper"): ("left upper lobe", "left upper zone", "left apex"),
    ("left", "middle"): ("lingula", "left mid lung", "left mid lung zone"),
    ("left", "lower"): ("left lower lobe", "left lung base", "left base"),
}
LINE_ROUTE = {"right": ("internal jugular", "IJ"), "left": ("subclavian",)}

POSITIVE = {
    "cardiomegaly": ("{sev} cardiomegaly.", "the heart is {adv} enlarged.", "heart size is {adv} enlarged.",
                     "the cardiac silhouette is {adv} enlarged.",
                     "there is {sev} enlargement of the cardiac silhouette."),
    "pleural_effusion": ("{sev} {side} pleural effusion.", "there is a {sev} {side} pleural effusion.",
                         "a {sev} {side}-sided pleural effusion is present.",
                         "{sev} pleural effusion on the {side} with blunting of the costophrenic angle.",
                         "blunting of the {side} costophrenic angle reflects a {sev} pleural effusion."),
    "pneumothorax": ("there is a {sev} {side} pneumothorax.", "{sev} {side} apical pneumothorax.",
                     "a {sev} {side}-sided pneumothorax is present.",
                     "visible pleural line at the {side} apex, consistent with a {sev} pneumothorax.",
                     "{sev} pneumothorax on the {side}, with a visible visceral pleural line."),
    "consolidation": ("there is focal consolidation in the {place}.", "airspace opacity in the {place}, "
                      "concerning for pneumonia.", "new consolidation is seen in the {place}.",
                      "dense opacity within the {place} consistent with consolidation.",
                      "consolidation in the {place}."),
    "endotracheal_tube": ("endotracheal tube terminates {cm} cm above the carina.",
                          "an endotracheal tube is in place with the tip {cm} cm above the carina.",
                          "ET tube in standard position.", "the endotracheal tube is appropriately positioned."),
    "central_line": ("{side} {route} central venous catheter terminates in the mid SVC.",
                     "{side} {route} line with tip in the SVC.",
                     "a {side}-sided central venous catheter ends in the superior vena cava."),
    "pacemaker": ("{side}-sided pacemaker with leads in the right atrium and right ventricle.",
                  "a dual-chamber pacemaker is present with leads in the right atrium and right ventricle.",
                  "{side} chest wall pacer device with leads in standard position."),
}
IMPRESSION = {
    "cardiomegaly": ("cardiomegaly.", "{sev} cardiomegaly."),
    "pleural_effusion": ("{sev} {side} pleural effusion.", "{side} pleural effusion."),
    "pneumothorax": ("{sev} {side} pneumothorax.", "{side} pneumothorax."),
    "consolidation": ("{place} consolidation, concerning for pneumonia.", "{place} pneumonia.",
                      "consolidation in the {place}."),
    "endotracheal_tube": ("endotracheal tube in standard position.", "ET tube in appropriate position."),
    "central_line": ("{side} {route} line in the SVC.", "central venous catheter in appropriate position."),
    "pacemaker": ("pacemaker in place.", "pacemaker leads in standard position."),
}
NEGATIVE = {
    "pleura": ("no pleural effusion or pneumothorax.", "there is no pleural effusion or pneumothorax.",
               "no pneumothorax or pleural effusion is seen.", "pleural effusion and pneumothorax are absent."),
    "pneumothorax": ("no pneumothorax.", "there is no pneumothorax.", "no evidence of pneumothorax.",
                     "pneumothorax is not seen."),
    "pleural_effusion": ("no pleural effusion.", "there is no pleural effusion.", "no pleural effusions are seen.",
                         "negative for pleural effusion."),
    "consolidation": ("the lungs are clear.", "no focal consolidation.", "there is no focal consolidation.",
                      "lungs are clear without focal consolidation.",
                      "no focal airspace opacity to suggest pneumonia."),
    "cardiomegaly": ("heart size is normal.", "the cardiac silhouette is normal in size.", "normal heart size.",
                     "the heart is not enlarged.", "cardiomediastinal silhouette is within normal limits."),
    "impression": ("no acute cardiopulmonary process.", "no acute cardiopulmonary abnormality.",
                   "normal chest radiograph.", "no acute intrathoracic process."),
}
OTHER = ("the visualized osseous structures are unremarkable.", "mediastinal and hilar contours are normal.",
         "no acute osseous abnormality.")
INDICATIONS = ("with dyspnea", "with chest pain", "with cough and fever", "with hypoxia", "for preoperative evaluation",
               "with weakness", "with shortness of breath", "after a fall")
IMPRESSION_ORDER = ("consolidation", "pleural_effusion", "pneumothorax", "cardiomegaly", "endotracheal_tube",
                    "central_line", "pacemaker")  # acute findings first, devices last


def _pick(rng: np.random.Generator, options):
    return options[rng.integers(len(options))]


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:]


def _fill(rng: np.random.Generator, template: str, f: Finding) -> str:
    words = {"side": f.side or "", "cm": int(rng.integers(3, 7))}
    if f.severity:
        words["sev"] = _pick(rng, SEVERITY_WORDS[f.severity])
        words["adv"] = _pick(rng, SEVERITY_ADVERBS.get(f.severity, ("",)))
    if f.zone:
        words["place"] = _pick(rng, ZONE_PLACES[f.side, f.zone])
    if f.kind == "central_line":
        words["route"] = _pick(rng, LINE_ROUTE[f.side])
    return _sentence(template.format_map(words))


def _bilateral_effusion(rng: np.random.Generator, right: Finding, left: Finding) -> str:
    if right.severity == left.severity:
        sev = _pick(rng, SEVERITY_WORDS[right.severity])
        return _sentence(_pick(rng, (f"{sev} bilateral pleural effusions.",
                                     f"there are {sev} pleural effusions bilaterally.")))
    return _sentence(f"{_pick(rng, SEVERITY_WORDS[right.severity])} right and "
                     f"{_pick(rng, SEVERITY_WORDS[left.severity])} left pleural effusions.")


def _stated(rng: np.random.Generator, findings: tuple[Finding, ...], kind: str) -> list[str]:
    present = [f for f in findings if f.kind == kind]
    if kind == "pleural_effusion" and len(present) == 2:
        return [_bilateral_effusion(rng, *present)]
    return [_fill(rng, _pick(rng, POSITIVE[kind]), f) for f in present]


def _findings_section(rng: np.random.Generator, findings: tuple[Finding, ...]) -> list[str]:
    """Sentences in the usual order: tubes and lines, lungs, pleura, heart, bones."""
    kinds = {f.kind for f in findings}
    out = [s for kind in DEVICE_KINDS + ("consolidation",) for s in _stated(rng, findings, kind)]
    if "consolidation" not in kinds:
        out.append(_pick(rng, NEGATIVE["consolidation"]))
    out += _stated(rng, findings, "pleural_effusion") + _stated(rng, findings, "pneumothorax")
    if not kinds & {"pleural_effusion", "pneumothorax"}:
        out.append(_pick(rng, NEGATIVE["pleura"]))
    elif "pneumothorax" not in kinds:
        out.append(_pick(rng, NEGATIVE["pneumothorax"]))
    elif "pleural_effusion" not in kinds:
        out.append(_pick(rng, NEGATIVE["pleural_effusion"]))
    out += _stated(rng, findings, "cardiomegaly") or [_pick(rng, NEGATIVE["cardiomegaly"])]
    if rng.random() < 0.5:
        out.append(_pick(rng, OTHER))
    return [_sentence(s) for s in out]


def _impression(rng: np.random.Generator, findings: tuple[Finding, ...]) -> str:
    lines = [_fill(rng, _pick(rng, IMPRESSION[f.kind]), f)
             for kind in IMPRESSION_ORDER for f in findings if f.kind == kind]
    if all(f.kind in DEVICE_KINDS for f in findings):
        lines.append(_sentence(_pick(rng, NEGATIVE["impression"])))
    if len(lines) > 1 and rng.random() < 0.5:
        return " ".join(f"{i}. {line}" for i, line in enumerate(lines, 1))
    return " ".join(lines)


def write_report(findings: tuple[Finding, ...], rng: np.random.Generator) -> str:
    """A report stating every finding (and the absence of the others), with an optional MIMIC-like header."""
    header = ""
    if rng.random() < 0.5:
        header = (f"EXAMINATION: CHEST (PA)\n\nINDICATION: ___-year-old {_pick(rng, ('man', 'woman'))} "
                  f"{_pick(rng, INDICATIONS)}.\n\n")
    return (f"{header}FINDINGS:\n\n{' '.join(_findings_section(rng, findings))}\n\n"
            f"IMPRESSION:\n\n{_impression(rng, findings)}\n")
