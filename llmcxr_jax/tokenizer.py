"""The LLM-CXR token layout: a text BPE, then the prompt keys, then one id per VQ-GAN code (SPEC.md §2).

The layout is a rule, not a table of constants: base vocabulary (with `<|endoftext|>` = 0 as padding), the four
keys `### End`, `### Instruction:`, `### Response:`, `### Response:\\n` as its last four ids, then the image codes
(as many as the VQ-GAN codebook). Dolly-v2-3b + LLM-CXR gives 50281 text ids + 1024 codes; a small demo BPE gives
fewer of each. Every tokenizer is verified against the rule when it is built, so a wrong file fails at load.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from vqgan_flax.atomic import write_atomic
from vqgan_flax.json_object import read_json_object

PAD_TOKEN = "<|endoftext|>"
END_KEY = "### End"
INSTRUCTION_KEY = "### Instruction:"
RESPONSE_KEY = "### Response:"
RESPONSE_KEY_NL = "### Response:\n"
# Dolly-v2 added the first three (ids 50277..50279); LLM-CXR added RESPONSE_KEY_NL (50280).
SPECIAL_KEYS = (END_KEY, INSTRUCTION_KEY, RESPONSE_KEY, RESPONSE_KEY_NL)
IMAGE_PLACEHOLDER = "<image>"
DEFAULT_NUM_IMAGE_CODES = 1024

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
LAYOUT_FILE = "llmcxr_token_layout.json"
_PACKAGED = "gpt-neox-20b-tokenizer.json"
# transformers 4.28.1 (the original's) cleaned up spaces before punctuation in decode() unless told otherwise.
_HF_CLEANUPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class TokenizerLayoutError(ValueError):
    """A tokenizer (file) does not follow the LLM-CXR token layout."""


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """What a checkpoint must agree on with its tokenizer: sizes and the special ids."""

    text_vocab_size: int
    num_image_codes: int
    pad_id: int
    end_id: int
    instruction_key_id: int
    response_id: int
    response_key_id: int
    image_offset: int
    vocab_size: int


def _special_token(content: str) -> AddedToken:
    # The flags transformers' add_special_tokens uses, so our tokenizer.json equals the one dolly/LLM-CXR saved.
    return AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)


def _check(ok: bool, source: str, what: str) -> None:
    if not ok:
        raise TokenizerLayoutError(
            f"{source}: {what}. Expected the LLM-CXR layout (SPEC.md §2): base vocabulary with {PAD_TOKEN!r} = 0, "
            f"then {', '.join(map(repr, SPECIAL_KEYS))} as the last four ids, then the image codes. For dolly-v2-3b "
            "itself use LlmCxrTokenizer.from_pretrained(None), which adds the missing key.")


def _cleanup_spaces(text: str) -> str:
    for old, new in _HF_CLEANUPS:
        text = text.replace(old, new)
    return text


class LlmCxrTokenizer:
    """A verified `tokenizers.Tokenizer` plus the image-code id range that follows its text vocabulary.

    `decode` renders special tokens (as the original's `tokenizer.decode` did) and drops image ids, which have no
    strings; use `ids_to_codes` to read them.
    """

    def __init__(self, tokenizer: Tokenizer, num_image_codes: int = DEFAULT_NUM_IMAGE_CODES, *,
                 clean_up_spaces: bool = True, source: str = "tokenizer object"):
        self._tok = tokenizer
        self.clean_up_spaces = clean_up_spaces
        self.source = source
        self.layout = self._verify(tokenizer, num_image_codes, source)
        self.image_placeholder_ids = tuple(self.encode(IMAGE_PLACEHOLDER))

    @staticmethod
    def _verify(tok: Tokenizer, num_image_codes: int, source: str) -> TokenLayout:
        if not isinstance(num_image_codes, (int, np.integer)) or num_image_codes <= 0:
            raise ValueError(f"num_image_codes (the VQ-GAN codebook size) must be a positive int, got "
                             f"{num_image_codes!r}")
        vocab = tok.get_vocab(with_added_tokens=True)
        n = tok.get_vocab_size(with_added_tokens=True)
        largest = max(vocab.values(), default=-1)
        _check(len(vocab) == n and largest == n - 1, source,
               f"ids are not contiguous ({len(vocab)} tokens, largest id {largest})")
        _check(vocab.get(PAD_TOKEN) == 0, source, f"{PAD_TOKEN!r} is id {vocab.get(PAD_TOKEN)}, not 0")
        for i, key in enumerate(SPECIAL_KEYS):
            want = n - len(SPECIAL_KEYS) + i
            _check(vocab.get(key) == want, source, f"{key!r} is id {vocab.get(key)} (missing if None), expected {want}")
            got = tok.encode(key, add_special_tokens=False).ids
            _check(got == [want], source, f"{key!r} encodes to {got}, expected the single id [{want}]")
        placeholder = tok.encode(IMAGE_PLACEHOLDER, add_special_tokens=False).ids
        image = tok.encode("image", add_special_tokens=False).ids
        _check(len(placeholder) == 3 and image == placeholder[1:2], source,
               f"{IMAGE_PLACEHOLDER!r} encodes to {placeholder} and 'image' to {image}; need 3 ids with 'image' "
               "as the single middle one")
        return TokenLayout(text_vocab_size=n, num_image_codes=int(num_image_codes), pad_id=0, end_id=n - 4,
                           instruction_key_id=n - 3, response_id=n - 2, response_key_id=n - 1, image_offset=n,
                           vocab_size=n + int(num_image_codes))

    # ---- construction -------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, num_image_codes: int | None = None) -> LlmCxrTokenizer:
        """Load the packaged dolly/LLM-CXR tokenizer (`path=None`) or a checkpoint's, and verify its layout.

        `path` is a directory holding tokenizer.json (and, when we saved it, the layout file) or the file itself.
        `num_image_codes` defaults to the layout file's value, else 1024 (the LLM-CXR VQ-GAN codebook). `decode`
        removes spaces before punctuation, as transformers 4.28.1 (the original's) did by default, unless the
        directory's tokenizer_config.json sets `clean_up_tokenization_spaces` to false.
        """
        if path is None:
            text = importlib.resources.files("llmcxr_jax").joinpath("assets", _PACKAGED).read_text(encoding="utf-8")
            tok = Tokenizer.from_str(text)
            # dolly-v2-3b added END, INSTRUCTION, RESPONSE (50277..50279); LLM-CXR then added RESPONSE_NL (50280).
            tok.add_special_tokens([_special_token(k) for k in SPECIAL_KEYS[:3]])
            tok.add_special_tokens([_special_token(SPECIAL_KEYS[3])])
            return cls(tok, DEFAULT_NUM_IMAGE_CODES if num_image_codes is None else num_image_codes,
                       source=f"packaged {_PACKAGED} + dolly/LLM-CXR keys")
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no tokenizer file here (expected a checkpoint directory with "
                                    f"{TOKENIZER_FILE} or the file itself)")
        try:
            tok = Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust error says what, not which file
            raise TokenizerLayoutError(f"{file}: not a readable tokenizers JSON file ({e})") from e
        stored = _read_json(file.parent / LAYOUT_FILE)
        if num_image_codes is None:
            num_image_codes = stored.get("num_image_codes", DEFAULT_NUM_IMAGE_CODES)
        config = _read_json(file.parent / TOKENIZER_CONFIG_FILE)
        out = cls(tok, num_image_codes, clean_up_spaces=bool(config.get("clean_up_tokenization_spaces", True)),
                  source=str(file))
        for field, value in stored.items():
            if getattr(out.layout, field, None) != value:
                raise TokenizerLayoutError(
                    f"{file.parent / LAYOUT_FILE}: {field} is {value} there but {getattr(out.layout, field, None)} "
                    f"for {file} with num_image_codes={num_image_codes}; pass the checkpoint's num_image_codes (or "
                    "None to take it from that file)")
        return out

    @classmethod
    def train_small(cls, texts: Iterable[str], vocab_size: int,
                    num_image_codes: int = DEFAULT_NUM_IMAGE_CODES) -> LlmCxrTokenizer:
        """Train a small GPT-NeoX-style byte-level BPE (e.g. on phantom reports) with the same layout.

        `vocab_size` bounds the base BPE vocabulary (including `<|endoftext|>` = 0 and the 256 byte symbols); the
        four keys follow it. One `<image>` per text is added to the corpus, as every image example carries one, so
        that `image` becomes a single token.
        """
        texts = list(texts)
        tok = Tokenizer(models.BPE())
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True)
        tok.post_processor = processors.ByteLevel(trim_offsets=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD_TOKEN], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts + [IMAGE_PLACEHOLDER] * max(len(texts), 1), trainer)
        tok.add_special_tokens([_special_token(k) for k in SPECIAL_KEYS])
        return cls(tok, num_image_codes, source=f"BPE trained on {len(texts)} texts, vocab_size={vocab_size}")

    def save(self, directory: str | Path) -> Path:
        """Write tokenizer.json, a transformers tokenizer_config.json and the layout file, each whole or not at all
        (a resumed run reads them back); return the directory."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_atomic(directory / TOKENIZER_FILE, self._tok.to_str(pretty=True))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": PAD_TOKEN, "eos_token": PAD_TOKEN,
                  "unk_token": PAD_TOKEN, "pad_token": PAD_TOKEN,
                  "additional_special_tokens": [END_KEY, INSTRUCTION_KEY, RESPONSE_KEY_NL],
                  "clean_up_tokenization_spaces": self.clean_up_spaces}
        _write_json(directory / TOKENIZER_CONFIG_FILE, config)
        _write_json(directory / LAYOUT_FILE, dataclasses.asdict(self.layout))
        return directory

    def require_same_as_saved(self, directory: str | Path, what: str) -> None:
        """Refuse a directory that holds another tokenizer: weights trained there read other ids for the same
        text, even when the layout (and so every shape) is equal. A directory with none passes."""
        if not (Path(directory) / TOKENIZER_FILE).is_file():
            return
        try:
            saved = LlmCxrTokenizer.from_pretrained(directory)
        except TokenizerLayoutError as err:  # e.g. a converted dolly-v2-3b, before LLM-CXR's keys
            raise ValueError(f"{what} {directory}: its tokenizer has not LLM-CXR's token layout ({err}); a text "
                             "model such as dolly-v2-3b starts stage 1 from its HF directory (init.hf_dir)") from None
        if saved.layout != self.layout or _vocabulary(saved) != _vocabulary(self):
            raise ValueError(f"{what} {directory} was trained with another tokenizer than this run's "
                             f"({self.source}): set config.tokenizer to {directory}, or use another workdir")

    # ---- layout -------------------------------------------------------------------------------------------

    @property
    def backend(self) -> Tokenizer:
        """The underlying `tokenizers.Tokenizer` (shared, do not mutate)."""
        return self._tok

    @property
    def text_vocab_size(self) -> int:
        return self.layout.text_vocab_size

    @property
    def vocab_size(self) -> int:
        """Text ids plus image ids: the LM's embedding rows (51305 for LLM-CXR)."""
        return self.layout.vocab_size

    @property
    def num_image_codes(self) -> int:
        return self.layout.num_image_codes

    @property
    def image_offset(self) -> int:
        return self.layout.image_offset

    @property
    def pad_id(self) -> int:
        return self.layout.pad_id

    @property
    def end_id(self) -> int:
        return self.layout.end_id

    @property
    def instruction_key_id(self) -> int:
        return self.layout.instruction_key_id

    @property
    def response_key_id(self) -> int:
        """`### Response:\\n`: the last prompt token and the loss-mask boundary."""
        return self.layout.response_key_id

    # ---- text ---------------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no BOS/EOS (none are ever added in LLM-CXR)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` over many texts at once (parallel in Rust)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], *, clean_up_spaces: bool | None = None) -> str:
        """Text of the text ids (special tokens rendered, image ids dropped), cleaned as transformers 4.28 did.

        `clean_up_spaces` defaults to the tokenizer's setting (True unless its tokenizer_config.json says otherwise).
        """
        arr = self._as_ids(ids)
        text = self._tok.decode(arr[arr < self.image_offset].tolist(), skip_special_tokens=False)
        clean = self.clean_up_spaces if clean_up_spaces is None else clean_up_spaces
        return _cleanup_spaces(text) if clean else text

    # ---- image codes --------------------------------------------------------------------------------------

    def is_image_id(self, ids: int | np.ndarray | Sequence[int]) -> bool | np.ndarray:
        """Whether an id (or each id) stands for an image code."""
        arr = np.asarray(ids)
        out = (arr >= self.image_offset) & (arr < self.vocab_size)
        return bool(out) if out.ndim == 0 else out

    def codes_to_ids(self, codes: Iterable[int] | np.ndarray) -> list[int]:
        """Token ids of VQ-GAN codes, flattened in raster order."""
        arr = np.asarray(codes).reshape(-1)
        if arr.size and not (np.issubdtype(arr.dtype, np.integer)
                             and arr.min() >= 0 and arr.max() < self.num_image_codes):
            raise ValueError(f"image codes must be ints in [0, {self.num_image_codes}); got dtype {arr.dtype}, "
                             f"range [{arr.min()}, {arr.max()}]")
        return (arr.astype(np.int64) + self.image_offset).tolist()

    def ids_to_codes(self, ids: Iterable[int] | np.ndarray) -> list[int]:
        """VQ-GAN codes of image ids; every id must be an image id."""
        arr = self._as_ids(ids)
        if not np.all(self.is_image_id(arr)):
            raise ValueError(f"not image ids (need [{self.image_offset}, {self.vocab_size})): "
                             f"{arr[~self.is_image_id(arr)][:8].tolist()}")
        return (arr - self.image_offset).tolist()

    def _as_ids(self, ids: Iterable[int] | np.ndarray) -> np.ndarray:
        arr = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}); got range [{arr.min()}, {arr.max()}]")
        return arr

    def __len__(self) -> int:
        """Like len(hf_tokenizer): the text vocabulary only (50281), from which the image offset is taken."""
        return self.text_vocab_size

    def __repr__(self) -> str:
        return (f"LlmCxrTokenizer({self.source}, text_vocab_size={self.text_vocab_size}, "
                f"num_image_codes={self.num_image_codes})")


def _vocabulary(tokenizer: LlmCxrTokenizer) -> dict[str, Any]:
    """A tokenizer's JSON without the truncation and padding settings that transformers may store with it: the
    parts that decide which ids a text gets."""
    data = json.loads(tokenizer.backend.to_str())
    return {k: v for k, v in data.items() if k not in ("truncation", "padding")}


def _read_json(path: Path) -> dict:
    return read_json_object(path, TokenizerLayoutError, missing_ok=True)


def _write_json(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
