"""Synthetic chest X-ray phantoms with MIMIC-style reports, and judges that read the same labels off both.

MIMIC-CXR is credentialed, so tests and the demo use these instead: `make_phantom(seed, index, size)` gives one
reproducible case (image, structured findings, labels, report); `report_labels(text)` and
`train_image_judge(size).predict(images)` map reports and images back to the label set `LABELS`, to score
generated text and images.
"""
from llmcxr_jax.data.phantom.findings import (KINDS, LABELS, SIDES, ZONES, Finding, label_vector, labels_of,
                                              sample_findings)
from llmcxr_jax.data.phantom.generate import Phantom, make_phantom, make_phantoms
from llmcxr_jax.data.phantom.report_judge import report_label_array, report_labels
from llmcxr_jax.data.phantom.reports import write_report

_IMAGE_JUDGE = ("ImageJudge", "phantom_arrays", "train_image_judge")


def __getattr__(name: str):
    """The image judge needs JAX; import it only when asked for, so the data builders stay light."""
    if name in _IMAGE_JUDGE:
        from llmcxr_jax.data.phantom import image_judge
        return getattr(image_judge, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["KINDS", "LABELS", "SIDES", "ZONES", "Finding", "Phantom", "label_vector", "labels_of", "make_phantom",
           "make_phantoms", "report_label_array", "report_labels", "sample_findings", "write_report", *_IMAGE_JUDGE]
