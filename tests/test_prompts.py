"""Prompt strings, training examples, loss weights and output post-processing (SPEC.md §3, §4, §8, §10).

tests/data/expected_ids_{cxr2report,report2cxr}.json hold full example id sequences derived by hand from SPEC.md,
independently of llmcxr_jax.prompts: `_expected_by_hand` encodes the template's pieces one by one with transformers'
tokenizer (GPT-NeoX-20B + dolly/LLM-CXR keys), writes the special keys' ids itself (50277/50278/50280) and inserts
`<`, the shifted codes and `>` by hand. Regenerate with `.venv/bin/python tests/test_prompts.py` (needs
transformers); `test_expected_files_match_hand_derivation` keeps the files and that derivation in agreement.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from llmcxr_jax import prompts
from llmcxr_jax.tokenizer import LlmCxrTokenizer

DATA = Path(__file__).parent / "data"
SPEC = Path(__file__).resolve().parents[2] / "shared" / "SPEC.md"
REPORT = "Heart size is normal. No focal consolidation, effusion, or pneumothorax. ___ was notified at 10:30."
CASES = {  # direction: (instruction index, codes seed)
    "cxr2report": (3, 2305),
    "report2cxr": (5, 11490),
}
# sha256 over the 4 templates and the 10 + 10 phrasings as test_strings_match_spec_file reads them from SPEC.md.
SPEC_STRINGS_SHA256 = "9370a262239a0eaac24f4cae708235568bf90ef0635cb51ebb7fcd76e7da083f"


@pytest.fixture(scope="module")
def tok():
    return LlmCxrTokenizer.from_pretrained()


def _spec_strings() -> list[str]:
    return [prompts.PROMPT_WITH_INPUT_FORMAT, prompts.PROMPT_NO_INPUT_FORMAT, prompts.PROMPT_FOR_GENERATION_FORMAT,
            prompts.PROMPT_FOR_GENERATION_FORMAT_NOINPUT, *prompts.CXR_VQ_INPUT_INSTRUCTION_LIST,
            *prompts.CXR_VQ_OUTPUT_INSTRUCTION_LIST]


# ---- strings (SPEC §3, §4) ----------------------------------------------------------------------------------

def test_strings_match_spec_file():
    """Byte-exact against SPEC.md where it sits beside the checkout (CI); the digest test guards it elsewhere."""
    assert hashlib.sha256("\x00".join(_spec_strings()).encode()).hexdigest() == SPEC_STRINGS_SHA256
    if not SPEC.is_file():
        return
    spec = SPEC.read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `(PROMPT_\w+)` \| `(.+)` \|$", spec, flags=re.M))
    for name, template in rows.items():
        expanded = template.replace("{INTRO_BLURB}", prompts.INTRO_BLURB).replace("\\n", "\n")
        assert getattr(prompts, name) == expanded, name
    assert len(rows) == 4
    assert f"`INTRO_BLURB` = `{prompts.INTRO_BLURB}`" in spec
    for name in ("CXR_VQ_INPUT_INSTRUCTION_LIST", "CXR_VQ_OUTPUT_INSTRUCTION_LIST"):
        section = spec.split(f"`{name}` (")[1].split("\n\n")[0]
        assert tuple(re.findall(r"^\d+\. `(.+)`$", section, flags=re.M)) == getattr(prompts, name)
    digest = hashlib.sha256("\x00".join(_spec_strings()).encode()).hexdigest()
    assert digest == SPEC_STRINGS_SHA256


def test_strings_digest():
    """Guards the verbatim strings where SPEC.md is not at hand (CI)."""
    assert hashlib.sha256("\x00".join(_spec_strings()).encode()).hexdigest() == SPEC_STRINGS_SHA256
    assert len(prompts.CXR_VQ_INPUT_INSTRUCTION_LIST) == len(prompts.CXR_VQ_OUTPUT_INSTRUCTION_LIST) == 10
    assert prompts.CXR_VQ_VQ_REPLACE_TEMPLATE == "<image>"
    assert (prompts.INPUT_KEY, prompts.RESPONSE_KEY_NL, prompts.DEFAULT_SEED) == ("Input:", "### Response:\n", 42)


# ---- full examples against the hand-derived ids -------------------------------------------------------------

def _case(direction: str) -> tuple[str, list[int]]:
    index, seed = CASES[direction]
    instructions = {"cxr2report": prompts.CXR_VQ_INPUT_INSTRUCTION_LIST,
                    "report2cxr": prompts.CXR_VQ_OUTPUT_INSTRUCTION_LIST}[direction]
    return instructions[index], np.random.default_rng(seed).integers(0, 1024, 256).tolist()


def _expected_by_hand(hf, direction: str) -> dict:
    """The SPEC §3 with-input template, piece by piece: added keys split the text, so pieces encode independently."""
    instruction, codes = _case(direction)
    enc = lambda s: hf(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    image = enc("<")[:1] + [50281 + c for c in codes] + enc(">")[:1]  # SPEC §2: `< c0 … c255 >`, shifted by 50281
    head = enc(prompts.INTRO_BLURB + "\n\n") + [50278] + enc(f"\n{instruction}\n\nInput:\n")
    if direction == "cxr2report":
        prompt, response = head + image + enc("\n\n") + [50280], enc(REPORT + "\n\n") + [50277]
    else:
        prompt, response = head + enc(REPORT + "\n\n") + [50280], image + enc("\n\n") + [50277]
    return {"direction": direction, "instruction": instruction, "report": REPORT, "codes": codes,
            "input_ids": prompt + response, "loss_weights": [0] * len(prompt) + [1] * len(response)}


def _load(direction: str) -> dict:
    return json.loads((DATA / f"expected_ids_{direction}.json").read_text())


@pytest.mark.parametrize("direction", sorted(CASES))
def test_example_matches_hand_derived_ids(tok, direction):
    expected = _load(direction)
    build = {"cxr2report": prompts.cxr_to_report_example, "report2cxr": prompts.report_to_cxr_example}[direction]
    example = build(tok, expected["report"], expected["codes"], expected["instruction"])
    assert example.input_ids.dtype == np.int32 and example.loss_weights.dtype == np.float32
    assert example.input_ids.tolist() == expected["input_ids"]
    assert example.loss_weights.tolist() == expected["loss_weights"]
    placeholder_text = {"cxr2report": dict(input="<image>", response=expected["report"]),
                        "report2cxr": dict(input=expected["report"], response="<image>")}[direction]
    text = prompts.PROMPT_WITH_INPUT_FORMAT.format(instruction=expected["instruction"], **placeholder_text)
    assert len(example.input_ids) == len(tok.encode(text)) + 255  # SPEC §2: injection makes it 255 ids longer


@pytest.mark.parametrize("direction", sorted(CASES))
def test_expected_files_match_hand_derivation(direction):
    import test_tokenizer
    assert _expected_by_hand(test_tokenizer.build_hf_reference(), direction) == _load(direction)


# ---- loss weights -------------------------------------------------------------------------------------------

def test_loss_weights_cover_response_and_end_only(tok):
    report = "Weird ### Response:\n inside the report."  # a second key in the response stays supervised
    example = prompts.cxr_to_report_example(tok, report, [7] * 16, prompts.CXR_VQ_INPUT_INSTRUCTION_LIST[0])
    ids, weights = example.input_ids.tolist(), example.loss_weights
    first = ids.index(tok.response_key_id)
    assert ids.count(tok.response_key_id) == 2
    assert not weights[:first + 1].any() and weights[first + 1:].all()
    assert ids[-1] == tok.end_id and weights[-1] == 1
    assert tok.decode(np.asarray(ids)[weights == 1]) == report + "\n\n### End"


def test_loss_weights_zero_on_padding_and_error_without_key(tok):
    ids = [5, tok.response_key_id, 6, tok.end_id, 0, 0]
    assert prompts.completion_loss_weights(ids, tok.response_key_id).tolist() == [0, 0, 1, 1, 0, 0]
    with pytest.raises(ValueError, match="no response key id 50280"):
        prompts.completion_loss_weights(tok.encode("### Response: no newline"), tok.response_key_id)


def test_loss_weights_equal_the_originals_collator(tok):
    """SPEC §8 through the original's own pieces: transformers' DataCollatorForLanguageModeling (mlm off; pad =
    <|endoftext|>, so its label -100 also covers a literal <|endoftext|> in a report) plus dolly's completion-only
    step, which masks every label up to and including the first `### Response:\n` id of each row."""
    import test_tokenizer
    import torch
    import transformers
    from llmcxr_jax.data.batching import pad_batch

    hf = test_tokenizer.build_hf_reference()
    hf.pad_token = "<|endoftext|>"
    response_id = hf.encode("### Response:\n")[0]
    codes = np.random.default_rng(0).integers(0, 1024, 256)
    examples = [
        prompts.cxr_to_report_example(tok, "No acute process. <|endoftext|> x", codes,
                                      prompts.CXR_VQ_INPUT_INSTRUCTION_LIST[3]),
        prompts.report_to_cxr_example(tok, "Small left effusion.", codes, prompts.CXR_VQ_OUTPUT_INSTRUCTION_LIST[5]),
        prompts.vqa_example(tok, "Is there an effusion?", "yes", codes),
        prompts.instruction_example(tok, "Say hi", "", "hi"),
        prompts.instruction_example(tok, "Summarise", "ctx ### Response: here", "ok")]
    collator = transformers.DataCollatorForLanguageModeling(hf, mlm=False, return_tensors="pt", pad_to_multiple_of=8)
    batch = collator([{"input_ids": e.input_ids.tolist()} for e in examples])
    labels = batch["labels"].clone()
    for row in range(len(examples)):
        first = int(torch.nonzero(batch["labels"][row] == response_id)[0, 0])
        labels[row, :first + 1] = -100
    ours = pad_batch(examples, len(examples), batch["input_ids"].shape[1])
    assert (batch["input_ids"].numpy() == ours["input_ids"]).all()
    assert ((labels.numpy() != -100) == (ours["loss_weights"] > 0)).all()
    assert 0 in examples[0].input_ids.tolist()  # the literal <|endoftext|> is in the report, and unsupervised


# ---- image injection ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, count", [("Input:\nno placeholder", 0), ("Input: <image>", 0),  # ' <' merges
                                         ("Input:\n<image>\nand\n<image>", 2)])
def test_injection_needs_exactly_one_placeholder(tok, text, count):
    with pytest.raises(ValueError, match=f"exactly one '<image>'.*found {count}"):
        prompts.inject_image(tok, tok.encode(text), [1, 2, 3])


def test_report_holding_a_placeholder_is_refused(tok):
    with pytest.raises(ValueError, match="found 2"):
        prompts.cxr_to_report_example(tok, "odd\n<image>\nreport", [1, 2, 3], "x")


def test_injection_replaces_only_the_middle_id(tok):
    ids = tok.encode("a\n<image>\nb")
    grid = np.arange(64).reshape(8, 8)  # any grid size; raster order
    out = prompts.inject_image(tok, ids, grid)
    start = ids.index(tok.image_placeholder_ids[0])
    assert out[:start + 1] == ids[:start + 1] and out[start + 65:] == ids[start + 2:]
    assert tok.ids_to_codes(out[start + 1:start + 65]) == list(range(64))
    with pytest.raises(ValueError, match="no image codes"):
        prompts.inject_image(tok, ids, [])
    with pytest.raises(ValueError, match="image codes must be ints"):
        prompts.inject_image(tok, ids, [1024])


# ---- other tasks and generation prompts ---------------------------------------------------------------------

def test_instruction_example_picks_template_by_context(tok):
    with_input = prompts.instruction_example(tok, "Summarise.", "Some context.", "Short.")
    no_input = prompts.instruction_example(tok, "Summarise.", "", "Short.")
    assert tok.decode(with_input.input_ids, clean_up_spaces=False) == prompts.PROMPT_WITH_INPUT_FORMAT.format(
        instruction="Summarise.", input="Some context.", response="Short.")
    assert tok.decode(no_input.input_ids, clean_up_spaces=False) == prompts.PROMPT_NO_INPUT_FORMAT.format(
        instruction="Summarise.", response="Short.")
    assert prompts.instruction_example(tok, "Summarise.", None, "Short.").input_ids.tolist() == \
        no_input.input_ids.tolist()
    assert tok.decode(no_input.input_ids[no_input.loss_weights == 1]) == "Short.\n\n### End"


def test_vqa_example(tok):
    example = prompts.vqa_example(tok, "Is there an effusion?", "No.", [3] * 256)
    ids = example.input_ids.tolist()
    assert tok.decode(ids, clean_up_spaces=False) == prompts.PROMPT_WITH_INPUT_FORMAT.format(
        instruction="Is there an effusion?", input="<>", response="No.")
    assert sum(tok.is_image_id(ids)) == 256
    assert tok.decode(example.input_ids[example.loss_weights == 1]) == "No.\n\n### End"


@pytest.mark.parametrize("direction", sorted(CASES))
def test_generation_prompt_is_the_training_prompt(tok, direction):
    expected = _load(direction)
    ids = expected["input_ids"]
    prompt = ids[:ids.index(50280) + 1]
    if direction == "cxr2report":
        got = prompts.generation_prompt_ids(tok, expected["instruction"], image_codes=expected["codes"])
    else:
        got = prompts.generation_prompt_ids(tok, expected["instruction"], input_text=expected["report"])
    assert got == prompt and got[-1] == tok.response_key_id


def test_generation_prompt_without_input(tok):
    ids = prompts.generation_prompt_ids(tok, "Name a colour.")
    assert tok.decode(ids, clean_up_spaces=False) == prompts.PROMPT_FOR_GENERATION_FORMAT_NOINPUT.format(
        instruction="Name a colour.")
    assert ids[-1] == tok.response_key_id
    with pytest.raises(ValueError, match="not both"):
        prompts.generation_prompt_ids(tok, "x", input_text="y", image_codes=[1])


# ---- deterministic choices ----------------------------------------------------------------------------------

def test_choices_are_fixed_per_record_and_spread():
    ids = [f"{i:08x}-dicom" for i in range(2000)]
    for direction, phrasings in (("cxr2report", prompts.CXR_VQ_INPUT_INSTRUCTION_LIST),
                                 ("report2cxr", prompts.CXR_VQ_OUTPUT_INSTRUCTION_LIST)):
        picks = [prompts.choose_instruction(42, r, direction) for r in ids]
        assert picks == [prompts.choose_instruction(42, r, direction) for r in ids]  # fixed across "epochs"
        counts = Counter(picks)
        assert set(counts) == set(phrasings) and min(counts.values()) > 140  # ~200 each
        assert picks != [prompts.choose_instruction(7, r, direction) for r in ids]  # the seed matters
    with pytest.raises(ValueError, match="direction must be one of"):
        prompts.choose_instruction(42, "x", "cxr")


def test_report_dropout_is_fixed_per_record_and_near_its_fraction():
    ids = [f"{i:08x}-dicom" for i in range(4000)]
    dropped = [prompts.drops_report(42, r, 0.1) for r in ids]
    assert dropped == [prompts.drops_report(42, r, 0.1) for r in ids]  # fixed across "epochs"
    assert 340 < sum(dropped) < 460  # ~400
    assert dropped != [prompts.drops_report(7, r, 0.1) for r in ids]  # the seed matters
    assert not any(prompts.drops_report(42, r, 0.0) for r in ids)  # the original: never
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="report dropout fraction"):
            prompts.drops_report(42, "x", bad)


# ---- output post-processing (SPEC §10) ----------------------------------------------------------------------

def test_response_text_between_keys(tok):
    prompt = prompts.generation_prompt_ids(tok, "Describe.", image_codes=[1] * 4)
    body = tok.encode("  Lungs are clear . No effusion.  ")
    assert prompts.extract_response_text(tok, prompt + body + [tok.end_id, 0, 0]) == "Lungs are clear. No effusion."
    assert prompts.extract_response_text(tok, np.asarray(prompt + body)) == "Lungs are clear. No effusion."


def test_response_text_regex_fallbacks(tok):
    # No `### Response:\n` id at all: the regexes read the decoded text (dolly's pipeline, with re.DOTALL).
    assert prompts.extract_response_text(tok, tok.encode("x ### Response: a\nb ### End tail")) == "a\nb"
    assert prompts.extract_response_text(tok, tok.encode("x ## Response:  open ended\n")) == "open ended"
    assert prompts.extract_response_text(tok, tok.encode("nothing to find")) == ""
    # Empty between the keys: the fallback finds the prompt's own key and returns what follows it.
    ids = prompts.generation_prompt_ids(tok, "Q?") + [tok.end_id]
    assert prompts.extract_response_text(tok, ids) == "#"  # the original's lazy `(.+?)` quirk, kept


def test_image_codes_extraction(tok):
    prompt = prompts.generation_prompt_ids(tok, "Draw.", input_text="Normal chest.")
    codes = list(range(100, 356))
    generated = tok.encode("<") + tok.codes_to_ids(codes) + tok.encode(">\n\n") + [tok.end_id]
    assert prompts.extract_image_codes(tok, prompt + generated, 256) == codes
    assert prompts.extract_image_codes(tok, prompt + generated[:-10], 256) is None  # too few
    assert prompts.extract_image_codes(tok, prompt + generated, 64) is None  # another grid
    assert prompts.extract_image_codes(tok, prompt + tok.encode("text"), 256) is None  # none
    image_prompt = prompts.generation_prompt_ids(tok, "Read.", image_codes=codes)
    assert prompts.extract_image_codes(tok, image_prompt + generated, 256) is None  # first image id in the prompt
    with pytest.raises(ValueError, match="no response key"):
        prompts.extract_image_codes(tok, generated, 256)


def test_small_demo_tokenizer_builds_examples():
    small = LlmCxrTokenizer.train_small(["FINDINGS: clear lungs. IMPRESSION: normal."] * 20, 320, num_image_codes=16)
    example = prompts.report_to_cxr_example(small, "clear lungs.", np.arange(16).reshape(4, 4),
                                            prompts.choose_instruction(42, "r1", "report2cxr"))
    ids = example.input_ids
    assert small.ids_to_codes(ids[small.is_image_id(ids)]) == list(range(16))
    assert small.decode(ids[example.loss_weights == 1]) == "<>\n\n### End"
    assert prompts.extract_image_codes(small, ids, 16) == list(range(16))


def _write_expected_files() -> None:
    import test_tokenizer

    hf = test_tokenizer.build_hf_reference()
    DATA.mkdir(exist_ok=True)
    for direction in CASES:
        path = DATA / f"expected_ids_{direction}.json"
        path.write_text(json.dumps(_expected_by_hand(hf, direction)) + "\n")
        print("wrote", path)


if __name__ == "__main__":
    _write_expected_files()
