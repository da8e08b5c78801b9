"""Records -> tokenized training examples (`prompts.Example`), one formatter per kind of source.

Record fields (TFDS gives Text as bytes, in-memory lists may give str; both are accepted):
- `mimic` (image/report; phantom records use this shape too): `dicom_id`, `report`, `codes` (flat ints in the
  VQ-GAN codebook), `direction` ("cxr2report" or "report2cxr"). The instruction is a pure function of
  (seed, dicom_id, direction), so it is the same on every epoch, host and restart (SPEC §3); so is whether a
  report→CXR record drops its report (`report_dropout`, 0 in the original).
- `vqa`: `question`, `answer`, `codes`.
- `dolly`: `instruction`, `context` (may be empty), `response`.
Formatters are module-level classes so that Grain can pickle them into worker processes.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmcxr_jax import prompts
from llmcxr_jax.tokenizer import LlmCxrTokenizer

KINDS = ("mimic", "vqa", "dolly")


def text(value: Any) -> str:
    """A Text feature as str (TFDS returns bytes)."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class FormatImageReport:
    """An image/report record as a CXR→report or report→CXR example, per its `direction`; `report_dropout` of
    the report→CXR records (`prompts.drops_report`) get an empty report."""

    def __init__(self, tokenizer: LlmCxrTokenizer, seed: int, report_dropout: float = 0.0):
        self.tokenizer, self.seed = tokenizer, seed
        self.report_dropout = prompts.check_report_dropout(report_dropout)  # before any record is read

    def __call__(self, record: Mapping[str, Any]) -> prompts.Example:
        direction, dicom_id = text(record["direction"]), text(record["dicom_id"])
        instruction = prompts.choose_instruction(self.seed, dicom_id, direction)
        if direction == "cxr2report":
            return prompts.cxr_to_report_example(self.tokenizer, text(record["report"]), record["codes"], instruction)
        dropped = prompts.drops_report(self.seed, dicom_id, self.report_dropout)
        report = "" if dropped else text(record["report"])
        return prompts.report_to_cxr_example(self.tokenizer, report, record["codes"], instruction)


class FormatVqa:
    """A VQA record: the question is the instruction, the image the input, the answer the response."""

    def __init__(self, tokenizer: LlmCxrTokenizer):
        self.tokenizer = tokenizer

    def __call__(self, record: Mapping[str, Any]) -> prompts.Example:
        return prompts.vqa_example(self.tokenizer, text(record["question"]), text(record["answer"]), record["codes"])


class FormatInstruction:
    """A Dolly record, with or without its context."""

    def __init__(self, tokenizer: LlmCxrTokenizer):
        self.tokenizer = tokenizer

    def __call__(self, record: Mapping[str, Any]) -> prompts.Example:
        return prompts.instruction_example(self.tokenizer, text(record["instruction"]), text(record["context"]),
                                           text(record["response"]))


def make_formatter(kind: str, tokenizer: LlmCxrTokenizer, seed: int, report_dropout: float = 0.0,
                   ) -> FormatImageReport | FormatVqa | FormatInstruction:
    """The formatter of a source kind (one of KINDS); `seed` fixes the image/report instructions and which
    report→CXR records drop their report (`report_dropout`, image/report records only)."""
    if kind == "mimic":
        return FormatImageReport(tokenizer, seed, report_dropout)
    if kind == "vqa":
        return FormatVqa(tokenizer)
    if kind == "dolly":
        return FormatInstruction(tokenizer)
    raise ValueError(f"unknown source kind {kind!r}; expected one of {KINDS}")
