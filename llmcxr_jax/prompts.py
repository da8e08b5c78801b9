"""Prompts of LLM-CXR (dolly templates, instruction phrasings), training examples and output post-processing.

Everything here is a pure function of its arguments and a `LlmCxrTokenizer`, whose layout supplies the ids
(so a small demo tokenizer works too). Strings and rules follow SPEC.md §3, §4, §8 and §10.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Literal, NamedTuple

import numpy as np

from llmcxr_jax.tokenizer import (END_KEY, IMAGE_PLACEHOLDER, INSTRUCTION_KEY, RESPONSE_KEY, RESPONSE_KEY_NL,
                                  LlmCxrTokenizer)

__all__ = [
    "INTRO_BLURB", "INSTRUCTION_KEY", "INPUT_KEY", "RESPONSE_KEY", "END_KEY", "RESPONSE_KEY_NL", "DEFAULT_SEED",
    "PROMPT_WITH_INPUT_FORMAT", "PROMPT_NO_INPUT_FORMAT", "PROMPT_FOR_GENERATION_FORMAT",
    "PROMPT_FOR_GENERATION_FORMAT_NOINPUT", "CXR_VQ_INPUT_INSTRUCTION_LIST", "CXR_VQ_OUTPUT_INSTRUCTION_LIST",
    "CXR_VQ_VQ_REPLACE_TEMPLATE", "Direction", "Example", "choose_instruction", "inject_image",
    "completion_loss_weights", "cxr_to_report_example", "report_to_cxr_example", "instruction_example",
    "vqa_example", "generation_prompt_ids", "extract_response_text", "extract_image_codes",
]

INTRO_BLURB = ("Below is an instruction that describes a task. "
               "Write a response that appropriately completes the request.")
INPUT_KEY = "Input:"
DEFAULT_SEED = 42
CXR_VQ_VQ_REPLACE_TEMPLATE = IMAGE_PLACEHOLDER

_HEAD = f"{INTRO_BLURB}\n\n{INSTRUCTION_KEY}\n{{instruction}}\n\n"
_INPUT = f"{INPUT_KEY}\n{{input}}\n\n"
_TAIL = f"{RESPONSE_KEY}\n{{response}}\n\n{END_KEY}"
PROMPT_WITH_INPUT_FORMAT = _HEAD + _INPUT + _TAIL
PROMPT_NO_INPUT_FORMAT = _HEAD + _TAIL
PROMPT_FOR_GENERATION_FORMAT = _HEAD + _INPUT + RESPONSE_KEY_NL
PROMPT_FOR_GENERATION_FORMAT_NOINPUT = _HEAD + RESPONSE_KEY_NL

CXR_VQ_INPUT_INSTRUCTION_LIST = (
    "Generate free-text radiology reports for the entered chest X-ray images.",
    "Use the entered chest X-ray images to create corresponding free-text radiology reports.",
    "Based on the entered chest X-ray images, produce free-text radiology reports.",
    "Create free-text radiology reports that correspond to the entered chest X-ray images.",
    "Utilize the entered chest X-ray images to generate corresponding free-text radiology reports.",
    "Generate free-text radiology reports in accordance with the entered chest X-ray images.",
    "Use the entered chest X-ray images to create accurate free-text radiology reports.",
    "Produce free-text radiology reports that match the entered chest X-ray images.",
    "Create free-text radiology reports that are consistent with the entered chest X-ray images.",
    "Utilize the entered chest X-ray images to generate comprehensive free-text radiology reports.",
)
CXR_VQ_OUTPUT_INSTRUCTION_LIST = (
    "Generate a chest X-ray image that corresponds to the entered free-text radiology reports for the chest X-ray "
    "image.",
    "Use the free-text radiology reports for the chest X-ray image to produce a corresponding chest X-ray image.",
    "Utilize the entered free-text radiology reports for the chest X-ray image to create a corresponding chest X-ray "
    "image.",
    "Create a chest X-ray image that matches the free-text radiology reports entered for the chest X-ray image.",
    "Produce a chest X-ray image that is consistent with the free-text radiology reports entered for the chest X-ray "
    "image.",
    "Based on the free-text radiology reports for the chest X-ray image, generate a corresponding chest X-ray image.",
    "Use the free-text radiology reports entered for the chest X-ray image to create a corresponding chest X-ray "
    "image.",
    "Generate a chest X-ray image that is in accordance with the free-text radiology reports for the chest X-ray image "
    "entered.",
    "Create a chest X-ray image that corresponds to the free-text radiology reports entered for the chest X-ray image.",
    "Utilize the entered free-text radiology reports for the chest X-ray image to produce a corresponding chest X-ray "
    "image.",
)

Direction = Literal["cxr2report", "report2cxr"]
_INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "cxr2report": CXR_VQ_INPUT_INSTRUCTION_LIST, "report2cxr": CXR_VQ_OUTPUT_INSTRUCTION_LIST}


class Example(NamedTuple):
    """One tokenized training sequence; `loss_weights[t]` weighs the label `input_ids[t]` (HF label alignment)."""

    input_ids: np.ndarray  # int32 (length,)
    loss_weights: np.ndarray  # float32 (length,), 0 on the prompt, 1 on the response and `### End`


# ---- deterministic per-record choices ---------------------------------------------------------------------------

def _stable_draw(seed: int, record_id: str, purpose: str, n: int) -> int:
    """An index in [0, n) fixed by (seed, record id, purpose): the same on every epoch, restart and host."""
    digest = hashlib.sha256(f"{seed}\x00{purpose}\x00{record_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % n


def choose_instruction(seed: int, record_id: str, direction: Direction) -> str:
    """The instruction phrasing of a record, drawn once like the original's `random.choice` at dataset-map time."""
    if direction not in _INSTRUCTIONS:
        raise ValueError(f"direction must be one of {sorted(_INSTRUCTIONS)}, got {direction!r}")
    phrasings = _INSTRUCTIONS[direction]
    return phrasings[_stable_draw(seed, str(record_id), direction, len(phrasings))]


def check_report_dropout(fraction: float) -> float:
    """`fraction`, refused unless in [0, 1) (1 would leave no report→CXR record its report)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"report dropout fraction must be in [0, 1), got {fraction}")
    return fraction


def drops_report(seed: int, record_id: str, fraction: float) -> bool:
    """Whether a report→CXR record trains with an empty report (`fraction` of records, fixed per record like its
    instruction): the unconditional twin that classifier-free guidance samples against (not in the original)."""
    return check_report_dropout(fraction) > 0 and _stable_draw(seed, str(record_id), "report_dropout", 1 << 30) < fraction * (1 << 30)


# ---- token ids --------------------------------------------------------------------------------------------------

def inject_image(tokenizer: LlmCxrTokenizer, ids: Sequence[int], codes: Sequence[int] | np.ndarray) -> list[int]:
    """Replace the `image` of the one `<image>` window by the image ids: `… < c0 … cN-1 > …` (SPEC §2)."""
    image_ids = tokenizer.codes_to_ids(codes)
    if not image_ids:
        raise ValueError("no image codes given")
    ids = list(ids)
    window = list(tokenizer.image_placeholder_ids)
    starts = [i for i in range(len(ids) - len(window) + 1) if ids[i:i + len(window)] == window]
    if len(starts) != 1:
        raise ValueError(f"the token ids must hold exactly one {IMAGE_PLACEHOLDER!r} (ids {window}); found "
                         f"{len(starts)}. Put it once in the text, after a newline (a space before it merges "
                         "into ' <').")
    middle = starts[0] + 1
    return ids[:middle] + image_ids + ids[middle + 1:]


def completion_loss_weights(ids: Sequence[int] | np.ndarray, response_key_id: int, pad_id: int = 0) -> np.ndarray:
    """1 after the first `### Response:\\n`, 0 up to and including it and on padding (dolly's collator, SPEC §8)."""
    arr = np.asarray(ids)
    hits = np.flatnonzero(arr == response_key_id)
    if hits.size == 0:
        raise ValueError(f"no response key id {response_key_id} ({RESPONSE_KEY_NL!r}) in the sequence, so nothing "
                         "separates prompt from response; build it with a PROMPT_* template")
    weights = np.zeros(arr.shape, np.float32)
    weights[hits[0] + 1:] = 1.0
    weights[arr == pad_id] = 0.0
    return weights


def _example(tokenizer: LlmCxrTokenizer, text: str, codes: Sequence[int] | np.ndarray | None) -> Example:
    ids = tokenizer.encode(text)
    if codes is not None:
        ids = inject_image(tokenizer, ids, codes)
    return Example(np.asarray(ids, np.int32), completion_loss_weights(ids, tokenizer.response_key_id,
                                                                      tokenizer.pad_id))


def cxr_to_report_example(tokenizer: LlmCxrTokenizer, report: str, codes: Sequence[int] | np.ndarray,
                          instruction: str) -> Example:
    """CXR→report: the image is the input, the report the supervised response."""
    text = PROMPT_WITH_INPUT_FORMAT.format(instruction=instruction, input=IMAGE_PLACEHOLDER, response=report)
    return _example(tokenizer, text, codes)


def report_to_cxr_example(tokenizer: LlmCxrTokenizer, report: str, codes: Sequence[int] | np.ndarray,
                          instruction: str) -> Example:
    """Report→CXR: the report is the input, `<` + image ids + `>` the supervised response."""
    text = PROMPT_WITH_INPUT_FORMAT.format(instruction=instruction, input=report, response=IMAGE_PLACEHOLDER)
    return _example(tokenizer, text, codes)


def vqa_example(tokenizer: LlmCxrTokenizer, question: str, answer: str, codes: Sequence[int] | np.ndarray) -> Example:
    """CXR-VQA: the question is the instruction, the image the input."""
    text = PROMPT_WITH_INPUT_FORMAT.format(instruction=question, input=IMAGE_PLACEHOLDER, response=answer)
    return _example(tokenizer, text, codes)


def instruction_example(tokenizer: LlmCxrTokenizer, instruction: str, context: str | None, response: str) -> Example:
    """A Dolly record: the with-input template iff `context` is non-empty, as dolly's trainer does."""
    if context:
        text = PROMPT_WITH_INPUT_FORMAT.format(instruction=instruction, input=context, response=response)
    else:
        text = PROMPT_NO_INPUT_FORMAT.format(instruction=instruction, response=response)
    return _example(tokenizer, text, None)


def generation_prompt_ids(tokenizer: LlmCxrTokenizer, instruction: str, input_text: str | None = None,
                          image_codes: Sequence[int] | np.ndarray | None = None) -> list[int]:
    """Prompt ids for sampling, ending with `### Response:\\n`: no input, a text input, or an image input."""
    if input_text is not None and image_codes is not None:
        raise ValueError("give input_text or image_codes, not both")
    if input_text is None and image_codes is None:
        return tokenizer.encode(PROMPT_FOR_GENERATION_FORMAT_NOINPUT.format(instruction=instruction))
    text_input = IMAGE_PLACEHOLDER if image_codes is not None else input_text
    ids = tokenizer.encode(PROMPT_FOR_GENERATION_FORMAT.format(instruction=instruction, input=text_input))
    return ids if image_codes is None else inject_image(tokenizer, ids, image_codes)


# ---- output post-processing (SPEC §10) ------------------------------------------------------------------------

_RESPONSE_TO_END = re.compile(r"#+\s*Response:\s*(.+?)#+\s*End", flags=re.DOTALL)
_RESPONSE_TO_EOS = re.compile(r"#+\s*Response:\s*(.+)", flags=re.DOTALL)


def _first(ids: list[int], token_id: int) -> int | None:
    return ids.index(token_id) if token_id in ids else None


def extract_response_text(tokenizer: LlmCxrTokenizer, ids: Sequence[int] | np.ndarray) -> str:
    """The generated answer: text strictly between the first `### Response:\\n` and the first `### End`, stripped.

    As dolly's pipeline: if that is empty (or there is no response key), search the whole decoded sequence with
    the `#+\\s*Response:` regexes; "" when nothing matches.
    """
    ids = np.asarray(ids).reshape(-1).tolist()
    start, end = _first(ids, tokenizer.response_key_id), _first(ids, tokenizer.end_id)
    text = tokenizer.decode(ids[start + 1:end]).strip() if start is not None else ""
    if text:
        return text
    full = tokenizer.decode(ids)
    match = _RESPONSE_TO_END.search(full) or _RESPONSE_TO_EOS.search(full)
    return match.group(1).strip() if match else ""


def extract_image_codes(tokenizer: LlmCxrTokenizer, ids: Sequence[int] | np.ndarray,
                        num_codes: int) -> list[int] | None:
    """The generated image: all image ids of the sequence as codes, or None (SPEC §10 `get_extract_vq_fun`).

    None when there are no image ids, when the first lies in the prompt (so an image-input prompt always gives
    None), or when their count is not `num_codes` (the grid size, 256 for LLM-CXR). `<`/`>` are not checked.
    """
    arr = np.asarray(ids).reshape(-1)
    keys = np.flatnonzero(arr == tokenizer.response_key_id)
    if keys.size == 0:
        raise ValueError(f"no response key id {tokenizer.response_key_id} in the sequence; pass prompt + generation")
    is_image = tokenizer.is_image_id(arr)
    if not is_image.any() or np.argmax(is_image) <= keys[0] or is_image.sum() != num_codes:
        return None
    return tokenizer.ids_to_codes(arr[is_image])
