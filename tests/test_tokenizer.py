"""The token layout, proven against transformers' tokenizer built from the same file as dolly/LLM-CXR built theirs."""
from __future__ import annotations

import hashlib
import importlib.resources
import json

import numpy as np
import pytest
import transformers
from tokenizers import AddedToken, Tokenizer

from llmcxr_jax.tokenizer import (LAYOUT_FILE, SPECIAL_KEYS, LlmCxrTokenizer, TokenizerLayoutError)
from train_helpers import with_two_ids_swapped

PACKAGED = importlib.resources.files("llmcxr_jax").joinpath("assets", "gpt-neox-20b-tokenizer.json")
DOLLY_KEYS = ["### End", "### Instruction:", "### Response:"]
LLMCXR_KEYS = ["### End", "### Instruction:", "### Response:\n"]

TEXTS = [
    "",
    "The lungs are clear. No pleural effusion or pneumothorax.",
    "FINDINGS: Heart size is normal.\nIMPRESSION: No acute cardiopulmonary process.",
    "Dr. ___ was paged at ___ on ___; findings discussed with XXXX XXXX.",
    "XXXX-year-old ___ with ___, eval for PNA.   Comparison:  ___ .",
    "  leading spaces and trailing   ",
    "tabs\t\tand\r\nwindows lines\n\n\n\nmany newlines \n \n",
    "    indented code:\n        return x  # comment\n",
    "unicode: café naïve résumé — “quotes” 中文 日本語 한국어 Ελληνικά русский عربى 🫁🩻 emoji",
    "NFC: e\u0301 vs \u00e9, Å vs A\u030a, ﬁ ligature, full-width ＡＢＣ",
    "numbers 1234567890 3.14159 -0.5e-3 10:30 a.m. 2023/05/19 #7 50% ~2cm",
    "### End",
    "### Instruction:",
    "### Response:",
    "### Response:\n",
    "### Response:\n\n",
    "### Response:x and ### Response: y and ###Response:\n and ## Response:\n and ### response:\n",
    "foo### Endbar### Instruction:baz### Response:\nqux",
    "### Response:\n### Response:\n### End### End",
    "<|endoftext|> and <|padding|> inside text<|endoftext|>",
    "Input:\n<image>\n\nand <image> twice <image><image> and <images> <imag e>",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nGenerate free-text radiology reports for the entered chest X-ray images.\n\nInput:\n<image>\n\n"
    "### Response:\nNo acute process.\n\n### End",
    "don't it's we're I'm you've . , ! ? ' n't 's 're",
    "".join(chr(c) for c in range(32, 127)),
    " " * 40 + "x" + "\n" * 30 + "y" + "\t" * 9,
]


ASSET_SHA256 = "56ac4821e129d2c520fdaba60abd920fa852ada51b45c0dd52bbb6bd8c985ade"  # PROVENANCE.md's, checked there
# against transformers' GPT-NeoX test vector and llama.cpp's reference tokenizations


def test_packaged_tokenizer_is_the_checked_gpt_neox_file():
    """The references below are built from the packaged file, so an edited file would pass them: pin its bytes."""
    assert hashlib.sha256(PACKAGED.read_bytes()).hexdigest() == ASSET_SHA256
    provenance = importlib.resources.files("llmcxr_jax").joinpath("assets", "PROVENANCE.md").read_text()
    assert f"sha256: {ASSET_SHA256}" in provenance


def build_hf_reference():
    """transformers' fast tokenizer from the packaged file + dolly's, then LLM-CXR's, add_special_tokens calls."""
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(PACKAGED))
    hf.add_special_tokens({"additional_special_tokens": DOLLY_KEYS})
    hf.add_special_tokens({"additional_special_tokens": LLMCXR_KEYS})
    return hf


@pytest.fixture(scope="module")
def hf():
    return build_hf_reference()


@pytest.fixture(scope="module")
def tok():
    return LlmCxrTokenizer.from_pretrained()


def hf_ids(hf, text: str) -> list[int]:
    return hf(text, add_special_tokens=False)["input_ids"]


# ---- the packaged tokenizer equals the reference ------------------------------------------------------------

@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(tok, hf, text):
    assert tok.encode(text) == hf_ids(hf, text)


def test_encode_batch_matches_transformers(tok, hf):
    assert tok.encode_batch(TEXTS) == [hf_ids(hf, t) for t in TEXTS]


@pytest.mark.parametrize("text", TEXTS)
def test_decode_matches_transformers(tok, hf, text):
    ids = hf_ids(hf, text)
    raw = hf.decode(ids, skip_special_tokens=False)
    assert tok.decode(ids, clean_up_spaces=False) == raw
    # transformers 4.28.1 (the original's) applied this cleanup by default; 5.x keeps the function but skips it for BPE.
    assert tok.decode(ids) == hf.clean_up_tokenization(raw)


def test_added_tokens_serialize_like_transformers(tok, hf):
    ours = json.loads(tok.backend.to_str())["added_tokens"]
    theirs = json.loads(hf.backend_tokenizer.to_str())["added_tokens"]
    assert ours == theirs


def test_spec_section2_asserts(tok, hf):
    assert len(tok) == len(hf) == 50281
    assert (tok.text_vocab_size, tok.vocab_size, tok.image_offset) == (50281, 51305, 50281)
    assert (tok.pad_id, tok.end_id, tok.instruction_key_id, tok.response_key_id) == (0, 50277, 50278, 50280)
    assert hf.convert_ids_to_tokens([0, 50277, 50278, 50279, 50280]) == ["<|endoftext|>", *SPECIAL_KEYS]
    for key, want in zip(SPECIAL_KEYS, (50277, 50278, 50279, 50280)):
        assert tok.encode(key) == hf_ids(hf, key) == [want]
    assert tok.encode("<image>") == hf_ids(hf, "<image>") == [29, 5695, 31]
    assert tok.image_placeholder_ids == (29, 5695, 31)
    assert tok.encode("image") == [5695]


@pytest.mark.parametrize("text", ["a### Response:\nb", "### Response:\n\n\n", "x ### Response:\n### Response:\n",
                                  "### Response:\r\n", "\n### Response:\n\n### End"])
def test_response_key_nl_is_always_one_token(tok, hf, text):
    ids = tok.encode(text)
    assert ids == hf_ids(hf, text)
    assert ids.count(50280) == text.count("### Response:\n")
    assert ids.count(50279) == text.count("### Response:") - text.count("### Response:\n")  # only before "\r\n"


# ---- image ids ----------------------------------------------------------------------------------------------

def test_image_code_ids_round_trip(tok):
    codes = np.arange(1024).reshape(32, 32)
    ids = tok.codes_to_ids(codes)
    assert ids == list(range(50281, 51305))
    assert tok.ids_to_codes(ids) == codes.reshape(-1).tolist()
    assert tok.is_image_id(50281) and tok.is_image_id(51304)
    assert not tok.is_image_id(50280) and not tok.is_image_id(51305)
    assert tok.is_image_id([0, 50281]).tolist() == [False, True]


def test_decode_drops_image_ids(tok):
    text_ids = tok.encode("Input:\n<image>\n\n")
    with_image = text_ids[:3] + tok.codes_to_ids([0, 5, 1023]) + text_ids[3:]
    assert tok.decode(with_image) == tok.decode(text_ids)


@pytest.mark.parametrize("codes", [[1024], [-1], [0.5], [True]])
def test_bad_codes_are_refused(tok, codes):
    with pytest.raises(ValueError, match="image codes"):
        tok.codes_to_ids(codes)


def test_bad_ids_are_refused(tok):
    with pytest.raises(ValueError, match="not image ids"):
        tok.ids_to_codes([50280])
    with pytest.raises(ValueError, match=r"\[0, 51305\)"):
        tok.decode([51305])


# ---- files --------------------------------------------------------------------------------------------------

def test_save_and_load_round_trip(tok, tmp_path):
    directory = tok.save(tmp_path / "ckpt")
    for path in (directory, directory / "tokenizer.json"):
        loaded = LlmCxrTokenizer.from_pretrained(path)
        assert loaded.layout == tok.layout
        assert loaded.encode_batch(TEXTS) == tok.encode_batch(TEXTS)
    hf_loaded = transformers.AutoTokenizer.from_pretrained(directory)
    assert len(hf_loaded) == 50281
    assert [hf_ids(hf_loaded, t) for t in TEXTS] == tok.encode_batch(TEXTS)


def test_layout_file_must_agree(tok, tmp_path):
    directory = tok.save(tmp_path)
    with pytest.raises(TokenizerLayoutError, match=f"{LAYOUT_FILE}.*num_image_codes"):
        LlmCxrTokenizer.from_pretrained(directory, num_image_codes=64)


def test_settings_from_arguments_and_config(tok, tmp_path):
    with pytest.raises(ValueError, match="positive int"):
        LlmCxrTokenizer.from_pretrained(None, num_image_codes=0)
    assert LlmCxrTokenizer.from_pretrained(None, num_image_codes=64).vocab_size == 50281 + 64
    directory = tok.save(tmp_path)
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    assert config["clean_up_tokenization_spaces"] is True
    config_file.write_text(json.dumps({**config, "clean_up_tokenization_spaces": False}))
    ids = tok.encode("a . b")
    assert (tok.decode(ids), LlmCxrTokenizer.from_pretrained(directory).decode(ids)) == ("a. b", "a . b")


def _write_tokenizer(tmp_path, keys: list[str]) -> str:
    raw = Tokenizer.from_file(str(PACKAGED))
    raw.add_special_tokens([AddedToken(k, special=True, normalized=False) for k in keys])
    path = tmp_path / "tokenizer.json"
    raw.save(str(path))
    return str(path)


@pytest.mark.parametrize("keys, problem", [
    ([], "'### End' is id None"),  # plain GPT-NeoX-20B
    (DOLLY_KEYS, "'### End' is id 50277 .*expected 50276"),  # dolly-v2-3b: `### Response:\n` missing
    (["### Instruction:", "### End", "### Response:", "### Response:\n"], "'### End' is id 50278"),
    ([*SPECIAL_KEYS, "### Extra"], "'### End' is id 50277 .*expected 50278"),
])
def test_wrong_layout_names_the_file(tmp_path, keys, problem):
    path = _write_tokenizer(tmp_path, keys)
    with pytest.raises(TokenizerLayoutError, match=problem) as err:
        LlmCxrTokenizer.from_pretrained(tmp_path)
    assert path in str(err.value)


def test_missing_or_unreadable_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        LlmCxrTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerLayoutError, match="tokenizer.json: not a readable"):
        LlmCxrTokenizer.from_pretrained(tmp_path)


# ---- a small demo tokenizer follows the same rule -----------------------------------------------------------

PHANTOM_REPORTS = [
    f"FINDINGS: {a} {b}\nIMPRESSION: {c}"
    for a in ("The lungs are clear.", "There is a small left pleural effusion.", "Mild cardiomegaly is present.")
    for b in ("No pneumothorax.", "The heart size is normal.", "Bony structures are intact.")
    for c in ("No acute process.", "Small effusion.", "Cardiomegaly without edema.")
]


@pytest.fixture(scope="module")
def small():
    return LlmCxrTokenizer.train_small(PHANTOM_REPORTS, vocab_size=400, num_image_codes=64)


def test_small_tokenizer_layout(small):
    n = small.backend.get_vocab_size(with_added_tokens=False) + 4
    assert n <= 404 and small.text_vocab_size == n and small.vocab_size == n + 64
    assert small.backend.id_to_token(0) == "<|endoftext|>"
    assert [small.backend.id_to_token(i) for i in range(n - 4, n)] == list(SPECIAL_KEYS)
    assert (small.end_id, small.instruction_key_id, small.response_key_id) == (n - 4, n - 3, n - 1)
    assert len(small.image_placeholder_ids) == 3
    assert small.codes_to_ids([0, 63]) == [n, n + 63]
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        small.codes_to_ids([64])


def test_small_tokenizer_saves_for_transformers(small, tmp_path):
    directory = small.save(tmp_path)
    loaded = LlmCxrTokenizer.from_pretrained(directory)  # num_image_codes comes from the layout file
    assert loaded.layout == small.layout
    hf_loaded = transformers.AutoTokenizer.from_pretrained(directory)
    texts = PHANTOM_REPORTS[:5] + ["### Instruction:\nx<image>\n\n### Response:\ny\n\n### End", "unseen wörds 42"]
    assert [hf_ids(hf_loaded, t) for t in texts] == loaded.encode_batch(texts)
    assert [loaded.decode(hf_ids(hf_loaded, t), clean_up_spaces=False) for t in texts] == texts


def test_a_saved_tokenizer_is_recognised_and_another_refused(small, tmp_path):
    small.require_same_as_saved(tmp_path / "nothing-saved", "--workdir")
    directory = small.save(tmp_path / "w")
    small.require_same_as_saved(directory, "--workdir")
    LlmCxrTokenizer.from_pretrained(directory).require_same_as_saved(directory, "--workdir")
    other = with_two_ids_swapped(small)
    assert other.layout == small.layout and other.encode_batch(PHANTOM_REPORTS) != small.encode_batch(PHANTOM_REPORTS)
    with pytest.raises(ValueError, match=f"--workdir {directory} was trained with another tokenizer than this "
                                         r"run's \(ids swapped\)"):
        other.require_same_as_saved(directory, "--workdir")
    saved = json.loads((directory / "tokenizer.json").read_text())  # transformers may store these settings too
    saved.update(truncation={"max_length": 2048, "strategy": "LongestFirst", "stride": 0, "direction": "Right"},
                 padding={"strategy": "BatchLongest", "direction": "Right", "pad_id": 0, "pad_type_id": 0,
                          "pad_token": "<|endoftext|>", "pad_to_multiple_of": None})
    (directory / "tokenizer.json").write_text(json.dumps(saved))
    small.require_same_as_saved(directory, "--workdir")
    (directory / "tokenizer.json").write_text(Tokenizer.from_str(small.backend.to_str()).to_str()
                                              .replace('"### End"', '"### Fin"'))
    with pytest.raises(ValueError, match=f"init.workdir {directory}: its tokenizer has not LLM-CXR's token layout "
                                         r"\(.*\); a text model such as dolly-v2-3b starts stage 1 from its HF"):
        small.require_same_as_saved(directory, "init.workdir")


def test_small_tokenizer_too_small_to_hold_image(tmp_path):
    with pytest.raises(TokenizerLayoutError, match="'image'"):
        LlmCxrTokenizer.train_small(PHANTOM_REPORTS, vocab_size=258, num_image_codes=64)
