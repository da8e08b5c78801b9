"""Scores for generated reports and images: pure functions of texts, label arrays, pixels and code arrays.

Report text metrics follow the implementations papers report: BLEU as the COCO caption evaluation's Bleu scorer
(pycocoevalcap) computes it on whitespace tokens, and ROUGE-L as Google's `rouge-score` does. The COCO pipeline's
PTB tokenizer (lowercasing, punctuation removal) is not applied: case and punctuation count here, so normalise
both texts first to compare with papers that ran it. Finding
labels are read by a pluggable `Labeler`; the default reads the phantom label set (llmcxr_jax.data.phantom), a
MIMIC user plugs in e.g. CheXpert labels. Baselines (prior-matched random labels, all-normal labels) give the
floor a model must beat.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from llmcxr_jax.data.phantom import LABELS, report_label_array
from llmcxr_jax.porter import stem

__all__ = ["NO_FINDING", "PHANTOM_REPORTS", "PRF", "CodebookUsage", "Labeler",
           "all_normal_labels", "bleu", "codebook_usage", "label_frequencies", "label_scores",
           "mean_rouge_l", "prior_random_labels", "psnr", "report_scores", "rouge_l", "rouge_tokens"]

NO_FINDING = "no_finding"


# ---- BLEU (COCO caption evaluation) ------------------------------------------------------------------------------

def _ngram_counts(words: Sequence[str], max_n: int) -> Counter:
    return Counter(tuple(words[i:i + k]) for k in range(1, max_n + 1) for i in range(len(words) - k + 1))


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> tuple[float, ...]:
    """Corpus BLEU-1..max_n as pycocoevalcap's `Bleu(4).compute_score` returns it (its first value).

    Tokens are whitespace-split as given (COCO's pipeline runs its Java PTB tokenizer first; we do not). Clipped
    n-gram matches and candidate n-gram counts are summed over the corpus; the reference length of each sentence
    is the one closest to the hypothesis length (shorter on ties); the scorer's smoothing constants (1e-15 on
    matches, 1e-9 on counts and lengths) and brevity penalty exp(1 - r/c) for c < r are kept, so an empty
    hypothesis corpus scores 0.
    """
    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError(f"need as many reference lists as hypotheses, at least one: got {len(hypotheses)} "
                         f"hypotheses and {len(references)} reference lists")
    tiny, small = 1e-15, 1e-9
    correct, guess = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for i, (hypothesis, refs) in enumerate(zip(hypotheses, references)):
        if isinstance(refs, str) or not refs:
            raise ValueError(f"references[{i}] must be a non-empty list of strings, got {refs!r}")
        words = hypothesis.split()
        clip: Counter = Counter()
        lengths = []
        for ref in refs:
            ref_words = ref.split()
            lengths.append(len(ref_words))
            clip |= _ngram_counts(ref_words, max_n)
        hyp_len += len(words)
        ref_len += min((abs(n - len(words)), n) for n in lengths)[1]
        for gram, count in _ngram_counts(words, max_n).items():
            correct[len(gram) - 1] += min(clip[gram], count)
        for k in range(max_n):
            guess[k] += max(0, len(words) - k)
    scores, product = [], 1.0
    for k in range(max_n):
        product *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (hyp_len + tiny) / (ref_len + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return tuple(scores)


# ---- ROUGE-L (rouge-score) --------------------------------------------------------------------------------------

_NON_ALPHANUMERIC = re.compile(r"[^a-z0-9]+")


class PRF(NamedTuple):
    precision: float
    recall: float
    fmeasure: float


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's tokenizer with use_stemmer=True: lowercase, non-[a-z0-9] → space, Porter-stem words of 4+."""
    return [stem(t) if len(t) > 3 else t for t in _NON_ALPHANUMERIC.sub(" ", text.lower()).split()]


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(reference: str, hypothesis: str) -> PRF:
    """`RougeScorer(['rougeL'], use_stemmer=True).score(reference, hypothesis)['rougeL']`; 0s if either is empty."""
    ref, hyp = rouge_tokens(reference), rouge_tokens(hypothesis)
    if not ref or not hyp:
        return PRF(0.0, 0.0, 0.0)
    lcs = _lcs_length(ref, hyp)
    precision, recall = lcs / len(hyp), lcs / len(ref)
    f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return PRF(precision, recall, f)


def mean_rouge_l(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """ROUGE-L F averaged over (hypothesis, reference) pairs, as report-generation papers tabulate it."""
    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError(f"need equally many hypotheses and references, at least one: got {len(hypotheses)} "
                         f"and {len(references)}")
    return math.fsum(rouge_l(r, h).fmeasure for h, r in zip(hypotheses, references)) / len(hypotheses)


# ---- finding labels ---------------------------------------------------------------------------------------------

class Labeler(NamedTuple):
    """Reads 0/1 findings off a batch of inputs (texts or images): `label(batch)` → int (n, len(names))."""

    names: tuple[str, ...]
    label: Callable[[Sequence], np.ndarray]


PHANTOM_REPORTS = Labeler(LABELS, report_label_array)


def _check_labels(truth: np.ndarray, predicted: np.ndarray, names: Sequence[str]) -> None:
    if truth.shape != predicted.shape or truth.ndim != 2 or truth.shape[1] != len(names):
        raise ValueError(f"label arrays must both be (n, {len(names)}) for labels {list(names)}; got "
                         f"{truth.shape} and {predicted.shape}")
    if not (np.isin(truth, (0, 1)).all() and np.isin(predicted, (0, 1)).all()):
        raise ValueError("labels must be 0 or 1 (map CheXpert's uncertain -1 and blanks to 0 or 1 first)")


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num/den, 0 where den is 0 (scikit-learn's zero_division=0)."""
    return np.divide(num, den, out=np.zeros(np.shape(num), float), where=np.asarray(den) > 0)


def label_scores(truth: np.ndarray, predicted: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    """Precision, recall, F1 (micro and macro over labels), accuracy over all cells, exact-match rate, per-label F1.

    Matches scikit-learn's `precision_recall_fscore_support(average=..., zero_division=0)`: a label with no
    predicted (or no true) positives has precision (recall) 0, and F1 = 2TP / (2TP + FP + FN), 0 when undefined.
    """
    truth, predicted = np.asarray(truth), np.asarray(predicted)
    _check_labels(truth, predicted, names)
    tp = ((truth == 1) & (predicted == 1)).sum(axis=0)
    fp = ((truth == 0) & (predicted == 1)).sum(axis=0)
    fn = ((truth == 1) & (predicted == 0)).sum(axis=0)
    per_label_f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    out = {
        "micro_precision": float(_ratio(tp.sum(), tp.sum() + fp.sum())),
        "micro_recall": float(_ratio(tp.sum(), tp.sum() + fn.sum())),
        "micro_f1": float(_ratio(2 * tp.sum(), 2 * tp.sum() + fp.sum() + fn.sum())),
        "macro_precision": float(_ratio(tp, tp + fp).mean()),
        "macro_recall": float(_ratio(tp, tp + fn).mean()),
        "macro_f1": float(per_label_f1.mean()),
        "accuracy": float((truth == predicted).mean()),
        "exact_match": float((truth == predicted).all(axis=1).mean()),
    }
    out.update({f"f1/{name}": float(f) for name, f in zip(names, per_label_f1)})
    return out


# ---- baselines --------------------------------------------------------------------------------------------------

def label_frequencies(labels: np.ndarray) -> np.ndarray:
    """Per-label positive rate of a (n, L) 0/1 array, e.g. of the training reports."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or not len(labels):
        raise ValueError(f"expected a non-empty (n, L) label array, got shape {labels.shape}")
    return labels.mean(axis=0)


def prior_random_labels(frequencies: np.ndarray, n: int, seed: int, names: Sequence[str] = LABELS,
                        no_finding: str | None = NO_FINDING) -> np.ndarray:
    """n rows where each finding is positive independently at its training frequency (a chance-level labeler).

    `no_finding`, if a name in `names`, is not drawn but derived (1 iff every other label is 0), as the phantom
    and CheXpert label sets define it; pass None to draw every label.
    """
    p = np.asarray(frequencies, float)
    if p.shape != (len(names),) or (p < 0).any() or (p > 1).any():
        raise ValueError(f"need {len(names)} frequencies in [0, 1] for labels {list(names)}, got {p}")
    out = (np.random.default_rng(seed).random((n, len(names))) < p).astype(np.int64)
    if no_finding in names:
        k = list(names).index(no_finding)
        out[:, k] = np.delete(out, k, axis=1).sum(axis=1) == 0
    return out


def all_normal_labels(n: int, names: Sequence[str] = LABELS, no_finding: str = NO_FINDING) -> np.ndarray:
    """The labels of n "no acute findings" reports: only `no_finding` positive."""
    if no_finding not in names:
        raise ValueError(f"{no_finding!r} is not one of the labels {list(names)}")
    out = np.zeros((n, len(names)), np.int64)
    out[:, list(names).index(no_finding)] = 1
    return out


# ---- whole-report and image scores ------------------------------------------------------------------------------

def report_scores(generated: Sequence[str], references: Sequence[str],
                  labeler: Labeler | None = PHANTOM_REPORTS) -> dict[str, float]:
    """BLEU-1..4 (one reference each), mean ROUGE-L F, and, with a labeler, label scores (prefixed `labels/`)."""
    out = {f"bleu{k}": s for k, s in enumerate(bleu(generated, [[r] for r in references]), 1)}
    out["rougeL"] = mean_rouge_l(generated, references)
    if labeler is not None:
        scores = label_scores(labeler.label(references), labeler.label(generated), labeler.names)
        out.update({f"labels/{k}": v for k, v in scores.items()})
    return out


def psnr(reference: np.ndarray, reconstruction: np.ndarray, data_range: float = 2.0) -> np.ndarray:
    """Per-image PSNR in dB, 10·log10(range² / MSE) over all pixels of each image; inf for identical images.

    The default range 2 is for images in [-1, 1] (the VQ-GAN's); use 255 for uint8.
    """
    ref, rec = np.asarray(reference, np.float64), np.asarray(reconstruction, np.float64)
    if ref.shape != rec.shape or ref.ndim < 2:
        raise ValueError(f"need two equally shaped image batches (B, ...), got {ref.shape} and {rec.shape}")
    mse = ((ref - rec) ** 2).reshape(len(ref), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(data_range ** 2 / mse)


class CodebookUsage(NamedTuple):
    perplexity: float  # exp(entropy) of the code histogram: the effective number of codes in use
    used: int
    dead: int  # codes never used


def codebook_usage(codes: np.ndarray, num_codes: int) -> CodebookUsage:
    """How much of the codebook a set of code maps uses (any shape of ints in [0, num_codes))."""
    flat = np.asarray(codes).reshape(-1)
    if not flat.size or flat.min() < 0 or flat.max() >= num_codes:
        raise ValueError(f"need a non-empty set of codes in 0..{num_codes - 1}")
    counts = np.bincount(flat, minlength=num_codes)
    p = counts[counts > 0] / flat.size
    used = int((counts > 0).sum())
    return CodebookUsage(float(np.exp(-(p * np.log(p)).sum())), used, num_codes - used)


