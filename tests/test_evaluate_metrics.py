"""Report and image metrics against reference values: the metric packages' own test cases, values computed by the
reference packages (each block says which package, version and call), and arrays whose scores are known by hand.

Reference environment (a throwaway venv, not a project dependency): pycocoevalcap 1.2, rouge-score 0.1.2 with
nltk 3.10.4, scikit-learn 1.9.1, on Python 3.11. Beyond the cases below, our BLEU and ROUGE-L were compared with
those packages on 30 random corpora / 508 pairs of phantom reports (bit-identical), and our Porter stemmer with
nltk's on 132,826 words (the GPT-NeoX vocabulary's alphanumeric tokens plus suffixed variants): no difference.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from llmcxr_jax.data.phantom import LABELS, make_phantoms
from llmcxr_jax.metrics import (all_normal_labels, bleu, codebook_usage, label_frequencies, label_scores,
                                mean_rouge_l, prior_random_labels, psnr, report_scores, rouge_l, rouge_tokens)
from llmcxr_jax.porter import stem

# ---- BLEU -------------------------------------------------------------------------------------------------------
# Expected values: pycocoevalcap 1.2,
#   Bleu(4).compute_score({i: refs_i}, {i: [hyp_i]}, verbose=0)[0]
# on exactly these (already whitespace-tokenized) strings.
BLEU_CASES = {
    "identical": (["no acute cardiopulmonary process ."], [["no acute cardiopulmonary process ."]],
                  (0.9999999996000004, 0.9999999995750004, 0.9999999995388893, 0.9999999994791672)),
    "empty hypothesis": ([""], [["no acute cardiopulmonary process ."]], (0.0, 0.0, 0.0, 0.0)),
    # Papineni et al.'s modified-precision example: BLEU-1 = 2/7 (clipped "the").
    "papineni": (["the the the the the the the"], [["the cat is on the mat", "there is a cat on the mat"]],
                 (0.2857142856326532, 6.900655591369778e-09, 2.119679665233836e-11, 1.2421889947162098e-12)),
    "corpus, several references": (
        ["small left pleural effusion .", "no pneumothorax", "heart size is normal . lungs are clear ."],
        [["small left pleural effusion is seen .", "left effusion ."], ["no pneumothorax is seen .",
                                                                          "no pneumothorax ."],
         ["lungs are clear . heart size is normal ."]],
        (0.9999999999375, 0.9607689227635462, 0.8645271658191466, 0.7539221179639423)),
    # lengths 4 and 8 are equally close to 6: the shorter wins, so no brevity penalty
    "closest length tie": (["a b c d e f"], [["a b c d", "a b c d e f g h"]],
                           (0.9999999998333334, 0.9999999998166668, 0.9999999997944446, 0.9999999997625002)),
    # corpus length 4 against closest references 2 + 4: brevity penalty exp(1 - 6/4)
    "one empty hypothesis": (["", "small left pleural effusion"], [["no effusion"], ["small left pleural effusion"]],
                             (0.6065306594093685, 0.6065306593840964, 0.6065306593419763, 0.6065306592451)),
}


@pytest.mark.parametrize("name", BLEU_CASES)
def test_bleu_equals_coco_caption_scorer(name):
    hypotheses, references, expected = BLEU_CASES[name]
    assert bleu(hypotheses, references) == pytest.approx(expected, rel=1e-12, abs=1e-300)


def test_bleu_papineni_unigram_precision_is_two_sevenths():
    assert bleu(*BLEU_CASES["papineni"][:2])[0] == pytest.approx(2 / 7, rel=1e-9)


def test_bleu_rejects_mismatched_or_empty_input():
    with pytest.raises(ValueError, match="as many reference lists"):
        bleu(["a b"], [["a b"], ["c"]])
    with pytest.raises(ValueError, match="non-empty list of strings"):
        bleu(["a b"], ["a b"])
    with pytest.raises(ValueError, match="at least one"):
        bleu([], [])


# ---- ROUGE-L ----------------------------------------------------------------------------------------------------

def test_rouge_l_published_rouge_score_cases():
    """rouge-score 0.1.2 rouge_scorer_test.py: testRougeLConsecutive, testRougeLNonConsecutive, testRougeEmpty."""
    assert rouge_l("testing one two", "testing one") == pytest.approx((1, 2 / 3, 4 / 5))
    assert rouge_l("testing one two", "testing two") == pytest.approx((1, 2 / 3, 4 / 5))
    assert rouge_l("testing one two", "") == (0, 0, 0)


def test_rouge_tokens_published_tokenizer_cases():
    """rouge-score 0.1.2 tokenize_test.py and tokenizers_test.py (test_default_tokenizer_with_stemmer_init)."""
    assert rouge_tokens("one Two three") == ["one", "two", "three"]
    assert rouge_tokens("one\n Two \nthree") == ["one", "two", "three"]
    assert rouge_tokens("the friends had a meeting") == ["the", "friend", "had", "a", "meet"]


# Expected: rouge-score 0.1.2 (nltk 3.10.4), tokenizers.DefaultTokenizer(use_stemmer=True).tokenize(text)
ROUGE_TOKENS = {
    "Running RUNS ran; 2 effusions, X-ray's e.g. Pneumothoraces":
        ["run", "run", "ran", "2", "effus", "x", "ray", "s", "e", "g", "pneumothorac"],
    "café naïve Straße": ["caf", "na", "ve", "stra", "e"],
}


@pytest.mark.parametrize("text", ROUGE_TOKENS)
def test_rouge_tokens_equal_rouge_score(text):
    assert rouge_tokens(text) == ROUGE_TOKENS[text]


# Expected: rouge-score 0.1.2 (nltk 3.10.4),
#   tuple(RougeScorer(["rougeL"], use_stemmer=True).score(reference, hypothesis)["rougeL"])
ROUGE_CASES = [
    ("The patient runs.", "patient running", (1.0, 0.6666666666666666, 0.8)),  # runs/running -> run
    ("Small left pleural effusion; no pneumothorax.", "No pneumothorax. Small left-sided pleural effusions.",
     (0.5714285714285714, 0.6666666666666666, 0.6153846153846153)),
    ("Heart size is normal. Lungs are clear.", "Lungs are clear. Heart size is normal.",
     (0.5714285714285714, 0.5714285714285714, 0.5714285714285714)),
    ("1. Right lower lobe consolidation, concerning for pneumonia. 2. Left pneumothorax.",
     "Right lower lobe opacities concerning for pneumonia; left apical pneumothorax.",
     (0.8, 0.7272727272727273, 0.761904761904762)),
    ("No acute cardiopulmonary process.", "No acute cardiopulmonary process.", (1.0, 1.0, 1.0)),
    ("No acute cardiopulmonary process.", "", (0, 0, 0)),
    ("", "No acute cardiopulmonary process.", (0, 0, 0)),
    ("!!!", "...", (0, 0, 0)),  # no tokens at all
]


@pytest.mark.parametrize("reference, hypothesis, expected", ROUGE_CASES)
def test_rouge_l_equals_rouge_score(reference, hypothesis, expected):
    assert tuple(rouge_l(reference, hypothesis)) == pytest.approx(expected, rel=1e-15)


def test_mean_rouge_l_averages_pairs():
    refs, hyps, expected = zip(*ROUGE_CASES)
    assert mean_rouge_l(hyps, refs) == pytest.approx(sum(f for _, _, f in expected) / len(expected), rel=1e-15)


# Expected: nltk 3.10.4, nltk.stem.porter.PorterStemmer().stem(word) (the NLTK_EXTENSIONS mode rouge-score uses).
# The words are Porter's (1980) examples of every rule, NLTK's extensions (irregular forms, ies/ied on four-letter
# words, y after a consonant, alli recursion, fulli, logi, two-letter *o) and report words.
PORTER_NLTK = {
    "caresses": "caress", "ponies": "poni", "ties": "tie", "caress": "caress", "cats": "cat", "feed": "feed",
    "agreed": "agre", "plastered": "plaster", "bled": "bled", "motoring": "motor", "sing": "sing",
    "conflated": "conflat", "troubled": "troubl", "sized": "size", "hopping": "hop", "tanned": "tan",
    "falling": "fall", "hissing": "hiss", "fizzed": "fizz", "failing": "fail", "filing": "file", "happy": "happi",
    "sky": "sky", "relational": "relat", "conditional": "condit", "rational": "ration", "valenci": "valenc",
    "hesitanci": "hesit", "digitizer": "digit", "conformabli": "conform", "radicalli": "radic",
    "differentli": "differ", "vileli": "vile", "analogousli": "analog", "vietnamization": "vietnam",
    "predication": "predic", "operator": "oper", "feudalism": "feudal", "decisiveness": "decis",
    "hopefulness": "hope", "callousness": "callous", "formaliti": "formal", "sensitiviti": "sensit",
    "sensibiliti": "sensibl", "triplicate": "triplic", "formative": "form", "formalize": "formal",
    "electriciti": "electr", "electrical": "electr", "hopeful": "hope", "goodness": "good", "revival": "reviv",
    "allowance": "allow", "inference": "infer", "airliner": "airlin", "gyroscopic": "gyroscop",
    "adjustable": "adjust", "defensible": "defens", "irritant": "irrit", "replacement": "replac",
    "adjustment": "adjust", "dependent": "depend", "adoption": "adopt", "homologou": "homolog",
    "communism": "commun", "activate": "activ", "angulariti": "angular", "homologous": "homolog",
    "effective": "effect", "bowdlerize": "bowdler", "probate": "probat", "rate": "rate", "cease": "ceas",
    "controll": "control", "roll": "roll", "dies": "die", "tied": "tie", "cried": "cri", "spied": "spi",
    "enjoy": "enjoy", "spy": "spi", "fly": "fli", "try": "tri", "dying": "die", "lying": "lie", "tying": "tie",
    "news": "news", "innings": "inning", "outings": "outing", "cannings": "canning", "howe": "howe",
    "proceed": "proceed", "exceed": "exceed", "succeed": "succeed", "skies": "sky", "hopefulli": "hope",
    "analogi": "analog", "geologi": "geolog", "radically": "radic", "conditionally": "condit", "owing": "owe",
    "oed": "o", "syzygy": "syzygi", "toy": "toy", "yyyy": "yyyi", "running": "run", "runs": "run", "ran": "ran",
    "effusions": "effus", "effusion": "effus", "pneumothorax": "pneumothorax", "pneumothoraces": "pneumothorac",
    "consolidation": "consolid", "opacities": "opac", "cardiomegaly": "cardiomegali", "enlarged": "enlarg",
    "unchanged": "unchang", "bilateral": "bilater", "atelectasis": "atelectasi", "pleural": "pleural",
    "interval": "interv", "increased": "increas", "findings": "find", "impression": "impress",
    "mediastinal": "mediastin", "silhouette": "silhouett", "generously": "gener", "generalization": "gener",
    "catheter": "cathet", "unremarkable": "unremark", "visualized": "visual",
}


def test_porter_stems_equal_nltk():
    assert {word: stem(word) for word in PORTER_NLTK} == PORTER_NLTK


# ---- finding labels ---------------------------------------------------------------------------------------------
# A hand-made table over labels a, b, c, d. Per label (TP, FP, FN): a (2, 1, 1), b (1, 1, 1), c (0, 0, 0: never
# true nor predicted), d (2, 2, 1). The expected numbers are these counts worked out by hand; scikit-learn 1.9.1
# `precision_recall_fscore_support(T, P, average=..., zero_division=0)` and `accuracy_score` give the same.
NAMES = ("a", "b", "c", "d")
TRUTH = [[1, 0, 0, 1], [1, 1, 0, 0], [0, 0, 0, 1], [1, 0, 0, 0], [0, 1, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]]
PRED = [[1, 0, 0, 0], [0, 1, 0, 1], [0, 0, 0, 1], [1, 1, 0, 0], [0, 0, 0, 1], [1, 0, 0, 0], [0, 0, 0, 1]]


def test_label_scores_on_hand_made_table():
    scores = label_scores(TRUTH, PRED, NAMES)
    assert scores == pytest.approx({
        "micro_precision": 5 / 9, "micro_recall": 5 / 8, "micro_f1": 10 / 17,
        "macro_precision": (2 / 3 + 1 / 2 + 0 + 2 / 4) / 4, "macro_recall": (2 / 3 + 1 / 2 + 0 + 2 / 3) / 4,
        "macro_f1": (2 / 3 + 1 / 2 + 0 + 4 / 7) / 4,
        "accuracy": 21 / 28, "exact_match": 1 / 7,
        "f1/a": 2 / 3, "f1/b": 1 / 2, "f1/c": 0.0, "f1/d": 4 / 7}, rel=1e-12)
    assert scores["macro_f1"] == pytest.approx(0.4345238095238095, rel=1e-12)  # scikit-learn 1.9.1, macro


def test_label_scores_reject_bad_shapes_and_values():
    with pytest.raises(ValueError, match=r"\(n, 4\)"):
        label_scores(TRUTH, np.asarray(PRED)[:, :3], NAMES)
    with pytest.raises(ValueError, match="0 or 1"):
        label_scores(TRUTH, np.where(np.asarray(PRED) == 1, -1, 0), NAMES)


def test_report_scores_with_the_phantom_labeler():
    reports = [p.report for p in make_phantoms(3, 0, 20, 32)]
    perfect = report_scores(reports, reports)
    assert perfect["rougeL"] == 1.0 and perfect["bleu4"] == pytest.approx(1.0, rel=1e-8)
    assert perfect["labels/micro_f1"] == 1.0 and perfect["labels/exact_match"] == 1.0
    shifted = report_scores(reports[1:] + reports[:1], reports)
    assert shifted["labels/micro_f1"] < 1.0 and shifted["rougeL"] < 1.0
    assert "labels/micro_f1" not in report_scores(reports, reports, labeler=None)


def test_the_phantom_image_judge_scores_held_out_phantoms_against_their_reports():
    """The judge (trained in ~10 s on CPU) on held-out phantoms, scored against the labels of their own reports, as
    the demo scores report→CXR outputs against their input reports."""
    from llmcxr_jax.data.phantom import report_label_array, train_image_judge
    cases = list(make_phantoms(11, 0, 200, 64))
    images, targets = np.stack([c.image for c in cases]), report_label_array([c.report for c in cases])
    judged = train_image_judge(64).predict(images)
    matched = label_scores(targets, judged, LABELS)
    assert matched["macro_f1"] > 0.9 and matched["accuracy"] > 0.97
    assert label_scores(np.roll(targets, 1, axis=0), judged, LABELS)["macro_f1"] < 0.6


# ---- image metrics ----------------------------------------------------------------------------------------------

def test_psnr_on_known_arrays():
    ref = np.zeros((3, 8, 8, 3))
    rec = ref.copy()
    rec[0] += 0.1  # MSE 0.01 in range 2: 10·log10(4 / 0.01)
    rec[1, ::2] = 1.0  # half the pixels off by 1: MSE 0.5
    assert psnr(ref, rec) == pytest.approx([10 * math.log10(400), 10 * math.log10(8), math.inf])
    full_scale = psnr(np.zeros((1, 4, 4), np.uint8), np.full((1, 4, 4), 255, np.uint8), data_range=255)
    assert full_scale == pytest.approx([0.0])


def test_codebook_usage_on_known_arrays():
    uniform = codebook_usage(np.arange(8).reshape(2, 2, 2).repeat(3, axis=0), num_codes=16)
    assert uniform.perplexity == pytest.approx(8.0) and (uniform.used, uniform.dead) == (8, 8)
    skewed = codebook_usage([0, 0, 0, 1], num_codes=4)  # p = (3/4, 1/4): exp(H) = (4/3)^(3/4) · 4^(1/4)
    assert skewed.perplexity == pytest.approx((4 / 3) ** 0.75 * 4 ** 0.25) and (skewed.used, skewed.dead) == (2, 2)
    assert codebook_usage([5, 5], num_codes=6).perplexity == pytest.approx(1.0)
    with pytest.raises(ValueError, match="0..3"):
        codebook_usage([4], num_codes=4)


# ---- baselines --------------------------------------------------------------------------------------------------

def test_prior_random_labels_follow_training_frequencies():
    train = np.random.default_rng(0).random((5000, len(LABELS))) < np.linspace(0.05, 0.5, len(LABELS))
    freq = label_frequencies(train.astype(int))
    drawn = prior_random_labels(freq, 20000, seed=1)
    findings = [i for i, name in enumerate(LABELS) if name != "no_finding"]
    assert np.abs(drawn.mean(axis=0)[findings] - freq[findings]).max() < 0.015
    assert (drawn[:, LABELS.index("no_finding")] == (drawn[:, findings].sum(axis=1) == 0)).all()
    assert (drawn == prior_random_labels(freq, 20000, seed=1)).all()
    assert (drawn != prior_random_labels(freq, 20000, seed=2)).any()
    plain = prior_random_labels([1.0, 0.0], 5, seed=0, names=("x", "y"), no_finding=None)
    assert plain.tolist() == [[1, 0]] * 5


def test_all_normal_labels_are_the_labels_of_a_normal_report():
    from llmcxr_jax.data.phantom import report_label_array
    normal = report_label_array(["No acute cardiopulmonary process. No pleural effusion or pneumothorax."] * 3)
    assert (all_normal_labels(3) == normal).all()
    with pytest.raises(ValueError, match="not one of the labels"):
        all_normal_labels(2, names=("x",))
