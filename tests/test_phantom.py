"""Phantom generator: reproducibility, validation, labels, visible findings on the right side, report layout."""
import numpy as np
import pytest

from llmcxr_jax.data.phantom import LABELS, Finding, labels_of, make_phantom, make_phantoms
from llmcxr_jax.data.phantom.anatomy import box_mask, ellipse_mask, make_grid, polyline_mask


def test_same_seed_and_index_give_the_same_bytes():
    a, b = make_phantom(3, 17, 64), make_phantom(3, 17, 64)
    assert a.image.tobytes() == b.image.tobytes()
    assert (a.report, a.findings, a.labels, a.id) == (b.report, b.findings, b.labels, b.id)


def test_each_case_is_reproducible_on_its_own():
    batch = list(make_phantoms(5, 10, 4, 64))
    for offset, case in enumerate(batch):
        alone = make_phantom(5, 10 + offset, 64)
        assert alone.image.tobytes() == case.image.tobytes() and alone.report == case.report


def test_different_seeds_and_indices_differ():
    images = [make_phantom(s, i, 64).image.tobytes() for s, i in ((0, 0), (0, 1), (1, 0))]
    assert len(set(images)) == 3


@pytest.mark.parametrize("size", [32, 64, 128, 256])
def test_image_is_square_uint8_at_the_requested_size_and_uses_the_range(size):
    image = make_phantom(0, 1, size).image
    assert image.shape == (size, size) and image.dtype == np.uint8
    assert image.min() < 40 and image.max() > 170  # air and bone/metal both present


def test_lungs_are_darker_than_heart_and_abdomen():
    image = make_phantom(0, 2, 128, findings=()).image.astype(float)
    lung = image[40:70, 25:40].mean()  # patient's right mid lung (image left)
    heart = image[78:92, 62:75].mean()
    abdomen = image[118:126, 30:100].mean()
    assert lung + 40 < heart and lung + 40 < abdomen


def _region_mean(finding, rows, cols, size=128, cases=6):
    """Mean brightness difference in a region: with the finding minus without, same cases otherwise."""
    diffs = []
    for i in range(cases):
        with_f = make_phantom(1, i, size, findings=(finding,)).image.astype(float)
        without = make_phantom(1, i, size, findings=()).image.astype(float)
        diffs.append(with_f[rows, cols].mean() - without[rows, cols].mean())
    return float(np.mean(diffs))


def test_right_effusion_whitens_the_image_left_base_only():
    effusion = Finding("pleural_effusion", side="right", severity="moderate")
    assert _region_mean(effusion, slice(72, 88), slice(18, 40)) > 40  # patient right = image left
    assert abs(_region_mean(effusion, slice(72, 88), slice(88, 110))) < 5


def test_left_pneumothorax_darkens_the_image_right_periphery():
    pneumothorax = Finding("pneumothorax", side="left", severity="large")
    assert _region_mean(pneumothorax, slice(35, 70), slice(100, 108)) < -15
    assert abs(_region_mean(pneumothorax, slice(35, 70), slice(20, 28))) < 5


def test_cardiomegaly_brightens_the_left_lower_chest():
    big_heart = Finding("cardiomegaly", severity="severe")
    assert _region_mean(big_heart, slice(68, 80), slice(88, 104)) > 30


@pytest.mark.parametrize("angle", [-3.0, 0.0, 3.0])
def test_shapes_drawn_in_a_window_keep_their_full_area(angle):
    size = 200
    g = make_grid(size, np.deg2rad(angle))
    circle = ellipse_mask(g, (0.85, 0.2), (0.1, 0.1))  # far from the centre, where rotation moves pixels most
    assert circle.sum() / size**2 == pytest.approx(np.pi * 0.1 * 0.1, rel=0.03)
    ellipse = ellipse_mask(g, (0.7, 0.4), (0.12, 0.06), tilt=0.5)
    assert ellipse.sum() / size**2 == pytest.approx(np.pi * 0.12 * 0.06, rel=0.03)
    box = box_mask(g, (0.3, 0.3), (0.05, 0.04))  # superellipse of power 4: area 4 a b Gamma(5/4)^2 / Gamma(3/2)
    assert box.sum() / size**2 == pytest.approx(0.05 * 0.04 * 3.708, rel=0.03)
    line = polyline_mask(g, [(0.2, 0.2), (0.2, 0.8), (0.6, 0.8)], width=0.02)
    assert line.sum() / size**2 == pytest.approx(0.02 * (0.6 + 0.4), rel=0.05)


def test_labels_follow_findings_and_no_finding_is_exclusive():
    for case in make_phantoms(2, 0, 60, 32):
        assert set(case.labels) == set(LABELS)
        assert case.labels == labels_of(case.findings)
        others = sum(v for k, v in case.labels.items() if k != "no_finding")
        assert case.labels["no_finding"] == int(others == 0) == int(not case.findings)
    positives = np.sum([[c.labels[name] for name in LABELS] for c in make_phantoms(2, 0, 300, 32)], axis=0)
    assert positives.min() >= 10, dict(zip(LABELS, positives))  # every label occurs


def test_cardiothoracic_ratio_matches_the_cardiomegaly_label():
    for case in make_phantoms(4, 0, 80, 32):
        assert (case.ctr >= 0.55) == bool(case.labels["cardiomegaly"]), (case.ctr, case.findings)


def test_report_has_one_findings_then_one_impression_and_states_sides():
    for case in make_phantoms(6, 0, 80, 32):
        text = case.report
        assert text.count("FINDINGS:") == 1 and text.count("IMPRESSION:") == 1
        assert text.index("FINDINGS:") < text.index("IMPRESSION:")
        findings = text.split("FINDINGS:")[1].split("IMPRESSION:")[0].lower()
        for f in case.findings:
            if f.kind in ("pleural_effusion", "pneumothorax"):
                assert f.side in findings or "bilateral" in findings, (f, text)
            if f.kind == "consolidation":
                assert f.side in findings or "lingula" in findings, (f, text)
        assert "pneumothorax" in findings and "effusion" in findings  # stated present or absent, always


@pytest.mark.parametrize("kwargs, message", [
    (dict(seed=-1, index=0), "seed"),
    (dict(seed=0, index=-2), "index"),
    (dict(seed=0, index=0, size=16), "size"),
    (dict(seed=0.5, index=0), "seed"),
])
def test_bad_arguments_are_refused_with_the_field_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_phantom(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="fracture"), "kind"),
    (dict(kind="pneumothorax", severity="small"), "side"),
    (dict(kind="consolidation", side="left"), "zone"),
    (dict(kind="cardiomegaly", severity="huge"), "severity"),
    (dict(kind="endotracheal_tube", side="left"), "side"),
])
def test_invalid_findings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Finding(**kwargs)
