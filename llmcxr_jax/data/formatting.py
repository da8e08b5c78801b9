"""Records -> tokenized training examples (`prompts.Example`), one formatter per kind of source.

Record fields (TFDS gives Text as bytes, in-memory lists may give str; both are accepted):
- `mimic` (image/report; phantom records use this shape too): `dicom_id`, `report`, `codes` (flat ints in the
  VQ-GAN codebook), `direction` ("cxr2report" or "report2cxr"). The instruction is a pure function of
  (seed, dicom_id, direction), so it is the same on every epoch, host and restart (SPEC §3).
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
    """An image/report record as a CXR→report or report→CXR example, per its `direction`."""

    def __init__(self, tokenizer: LlmCxrTokenizer, seed: int):
        self.tokenizer, self.seed = tokenizer, seed

    def __call__(self, record: Mapping[str, Any]) -> prompts.Example:
        direction = text(record["direction"])
        instruction = prompts.choose_instruction(self.seed, text(record["dicom_id"]), direction)
        build = prompts.cxr_to_report_example if direction == "cxr2report" else prompts.report_to_cxr_example
        return build(self.tokenizer, text(record["report"]), record["codes"], instruction)


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


def make_formatter(kind: str, tokenizer: LlmCxrTokenizer, seed: int,
                   ) -> FormatImageReport | FormatVqa | FormatInstruction:
    """The formatter of a source kind (one of KINDS); `seed` fixes the image/report instructions."""
    if kind == "mimic":
        return FormatImageReport(tokenizer, seed)
    if kind == "vqa":
        return FormatVqa(tokenizer)
    if kind == "dolly":
        return FormatInstruction(tokenizer)
    raise ValueError(f"unknown source kind {kind!r}; expected one of {KINDS}")
