"""LLM-CXR generation: the `Sampler` (report→CXR, CXR→report, instructions) and its CLI.

    python -m llmcxr_jax.generate --checkpoint CKPT_OR_HF_DIR --vqgan DIR --task report2cxr --input "..." --out DIR
    python -m llmcxr_jax.generate --checkpoint CKPT --vqgan DIR --task cxr2report --out DIR a.png b.jpg
    python -m llmcxr_jax.generate --checkpoint CKPT --task instruct --input "What is a pleural effusion?" --out DIR

Prompts and post-processing are the original's (`llmcxr_jax.prompts`); sampling defaults to its settings
(top-p 0.92, top-k off, temperature 1). Each batch runs as one compiled loop (`llmcxr_jax.sampling.decode`).
Images are generated in a constrained mode by default: `<`, exactly the VQ-GAN grid's number of image ids
(all other ids masked), then the forced rest of a training sequence (`>`, two newlines, `### End`);
`image_mode="resample"` samples freely like the original and redraws rows that did not yield a full grid, at
most `max_tries` times. A row's random draws depend only on the seed and its index, not on the batch it falls
into; its tokens do too in float32, while in bfloat16 (the default) the logits can round differently with the
batch's row count, so a row's sample can change with how many inputs share its batch.
`guidance_scale` (constrained images only, off by default, not in the original) adds classifier-free guidance
against the same instruction with an empty report, at twice the decoding work.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import jax
import numpy as np
from flax import nnx
from PIL import Image
from tqdm import tqdm

import vqgan_flax
from llmcxr_jax import checkpoint, parallel, prompts
from llmcxr_jax.convert import HF_METADATA_FILE, load_hf_model, read_hf_metadata
from llmcxr_jax.data.text_files import open_utf8
from llmcxr_jax.lm_checkpoint import checkpoint_kind
from llmcxr_jax.model import GPTNeoX, unstack_layers
from llmcxr_jax.sampling import DecodeSpec, SamplingParams, decode, row_keys
from llmcxr_jax.tokenizer import END_KEY, LlmCxrTokenizer
from vqgan_flax.atomic import check_output_dir
from vqgan_flax.images import ImageLoadError, ImageTooSmallError, load_image, postprocess, preprocess
from vqgan_flax.parallel import DataParallel

TASKS = ("report2cxr", "cxr2report", "instruct")
IMAGE_MODES = ("constrained", "resample")
# The original's max_new_tokens (SPEC §10): 256 by default; report→CXR 300 as its eval (256 codes need room for
# the wrapper); `llmcxr_jax.evaluate` passes the eval's own 128 for CXR→report.
DEFAULT_MAX_NEW_TOKENS = {"cxr2report": 256, "report2cxr": 300, "instruct": 256}


class ImageGenerationError(RuntimeError):
    """Resampling did not give every row a full image grid within the allowed tries.

    `failed_rows` are the indices of those rows; `codes` holds the other rows' codes (None for the failed ones).
    """

    def __init__(self, message: str, failed_rows: list[int], codes: list[list[int] | None]):
        super().__init__(message)
        self.failed_rows, self.codes = failed_rows, codes


@dataclasses.dataclass
class Generated:
    """New ids per row (up to and including its end token) and the timing of the batch that made it."""

    ids: list[np.ndarray]
    timings: list[dict[str, float]]


@dataclasses.dataclass
class ImageResult:
    codes: np.ndarray  # int32 (batch, h, w)
    images: np.ndarray | None  # float32 (batch, H, W, 3) in [-1, 1]; None without a VQ-GAN
    responses: list[np.ndarray]  # the ids after each prompt (constrained: `<`, codes, forced `>` and tail)
    instructions: list[str]
    tries: list[int]
    timings: list[dict[str, float]]


@dataclasses.dataclass
class TextResult:
    texts: list[str]
    instructions: list[str]
    timings: list[dict[str, float]]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _decode_batch(graphdef: nnx.GraphDef, state: nnx.State, ids: jax.Array, valid: jax.Array, seed: jax.Array,
                  row_ids: jax.Array, attempt: jax.Array, *, spec: DecodeSpec):
    keys = jax.vmap(jax.random.fold_in, (0, None))(row_keys(seed, row_ids), attempt)
    return decode(nnx.merge(graphdef, state), ids, valid, keys, spec)


class Sampler:
    """Batched LLM-CXR generation on one device or a mesh (parameters sharded, batch over the data axes)."""

    def __init__(self, model: GPTNeoX, tokenizer: LlmCxrTokenizer, vqgan: vqgan_flax.VQGAN | None = None, *,
                 mesh: jax.sharding.Mesh | None = None, rules: parallel.Rules = parallel.DEFAULT_RULES,
                 image_grid: tuple[int, int] | None = None, batch_size: int = 8,
                 sampling: SamplingParams = SamplingParams(), prompt_multiple: int = 32):
        """`image_grid` is only needed without a VQ-GAN (codes only); `prompt_multiple` buckets prompt widths
        so that few shapes are compiled."""
        if tokenizer.vocab_size != model.config.vocab_size:
            raise ValueError(
                f"the model has {model.config.vocab_size} token rows but the tokenizer ({tokenizer.source}) gives "
                f"{tokenizer.text_vocab_size} text ids + {tokenizer.num_image_codes} image codes = "
                f"{tokenizer.vocab_size}; use the checkpoint's tokenizer and the VQ-GAN it was trained with")
        if vqgan is not None:
            if vqgan.config.num_codes != tokenizer.num_image_codes:
                raise ValueError(f"the VQ-GAN has {vqgan.config.num_codes} codes but the tokenizer has "
                                 f"{tokenizer.num_image_codes} image ids")
            if image_grid is not None and tuple(image_grid) != vqgan.config.grid:
                raise ValueError(f"image_grid {image_grid} differs from the VQ-GAN's grid {vqgan.config.grid}")
            image_grid = vqgan.config.grid
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if mesh is not None:
            parallel.shard_model(model, mesh, rules)
        self.tokenizer, self.vqgan, self.mesh, self.rules = tokenizer, vqgan, mesh, rules
        self.image_grid = None if image_grid is None else tuple(int(s) for s in image_grid)
        self.batch_size, self.sampling, self.prompt_multiple = batch_size, sampling, prompt_multiple
        self.max_positions = model.config.max_position_embeddings
        # Decoding reads each layer's weights from a buffer of its own: scanned over the stacked weights, XLA:GPU
        # copied every layer's slice for every token (NOTES.md, H200). The caller's model keeps its layout, so
        # while the caller holds it the layer weights exist twice (`from_checkpoint` holds no other copy).
        graphdef, self._state = nnx.split(unstack_layers(nnx.merge(*nnx.split(model))))
        self._decode = jax.jit(lambda *args, spec: _decode_batch(graphdef, *args, spec=spec),
                               static_argnames="spec")
        self._compiled: dict[tuple[Any, ...], Any] = {}
        self._vqgan_fns: dict[str, DataParallel] = {}
        self._image_open = tokenizer.image_placeholder_ids[0]
        # `>` then the template's tail "\n\n### End" (SPEC §3): the rest of a training sequence after the codes.
        self._image_close = [tokenizer.image_placeholder_ids[2], *tokenizer.encode("\n\n" + END_KEY)]

    # ---- loading ------------------------------------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, path: str | Path, vqgan_dir: str | Path | None = None, *,
                        mesh: jax.sharding.Mesh | None = None, dtype: str = "bfloat16", step: int | None = None,
                        **kwargs: Any) -> Sampler:
        """An HF directory, a converted checkpoint or a training workdir (its `step`, default the latest; by the
        files present), plus a VQ-GAN.

        The tokenizer is the checkpoint's tokenizer.json when there is one, else the packaged LLM-CXR one. A
        VQ-GAN whose fingerprint or grid differs from the one the LM's metadata records is refused.
        """
        model, meta, source = load_language_model(path, mesh=mesh, dtype=dtype, step=step)
        vqgan = None
        if vqgan_dir is not None:
            vqgan = vqgan_flax.load(vqgan_dir)
            check_vqgan(meta, source, vqgan_dir, vqgan)
        num_codes = vqgan.config.num_codes if vqgan else meta.get("token_layout", {}).get("num_image_codes")
        tokenizer = load_tokenizer(path, num_codes)
        check_token_layout(meta, source, tokenizer)
        grid = tuple(meta["vqgan_grid"]) if vqgan is None and meta.get("vqgan_grid") else None
        return cls(model, tokenizer, vqgan, mesh=mesh, image_grid=grid, **kwargs)

    # ---- token level --------------------------------------------------------------------------------------

    def generate(self, prompt_ids: Sequence[Sequence[int]], spec: DecodeSpec, *, seed: int,
                 row_ids: Sequence[int] | None = None, attempt: int = 0, progress: bool = False,
                 unconditional_ids: Sequence[Sequence[int]] | None = None) -> Generated:
        """New ids after each prompt, in batches of `batch_size`; row r draws from (seed, row_ids[r], attempt).

        `unconditional_ids` (one per prompt) are the twins that `spec.guidance_scale` guides away from.
        """
        if not 0 <= seed < 2**32:
            raise ValueError(f"seed must lie in [0, 2**32), got {seed}")
        if len(prompt_ids) == 0:  # nothing in, nothing out (as for every task)
            return Generated([], [])
        row_ids = list(range(len(prompt_ids)) if row_ids is None else row_ids)
        if len(row_ids) != len(prompt_ids):
            raise ValueError(f"{len(row_ids)} row ids for {len(prompt_ids)} prompts")
        if (spec.guidance_scale is None) != (unconditional_ids is None):
            raise ValueError("spec.guidance_scale and unconditional_ids go together: give both or neither")
        twins = [list(p) for p in unconditional_ids] if unconditional_ids is not None else None
        if twins is not None and len(twins) != len(prompt_ids):
            raise ValueError(f"{len(twins)} unconditional prompts for {len(prompt_ids)} prompts")
        every_prompt = [*prompt_ids, *(twins or [])]
        if any(len(p) == 0 for p in every_prompt):
            raise ValueError("empty prompt: every prompt needs at least one token")
        worst = max(range(len(every_prompt)), key=lambda i: len(every_prompt[i]), default=0)
        longest = len(every_prompt[worst]) if every_prompt else 0
        if longest + spec.max_new_tokens - 1 > self.max_positions:  # the last new token is never fed back
            which = (f"input {worst}" if worst < len(prompt_ids) else
                     f"the unconditional prompt of input {worst - len(prompt_ids)}")
            raise ValueError(f"{which}: a prompt of {longest} tokens + max_new_tokens {spec.max_new_tokens} - 1 "
                             f"exceeds the model's max_position_embeddings {self.max_positions}; shorten the input "
                             "or lower max_new_tokens")
        # Fewer prompts than batch_size decode in the next power of two of rows: few programs to compile (the
        # resampling retries and evaluation's instruction groups shrink the batch), little work on padding rows.
        bucket = 1 << max(len(prompt_ids) - 1, 0).bit_length()
        rows = min(self.batch_size, _round_up(bucket, self._data_shards()))
        ids, timings = [], []
        for start in tqdm(range(0, len(prompt_ids), rows), disable=not progress, unit="batch", desc="generate"):
            chunk = [list(p) for p in prompt_ids[start:start + rows]]
            twin_chunk = twins[start:start + rows] if twins is not None else None
            new, timing = self._generate_batch(chunk, row_ids[start:start + rows], rows, spec, seed, attempt,
                                               twin_chunk)
            ids += new
            timings += [timing] * len(chunk)
        return Generated(ids, timings)

    def _generate_batch(self, chunk: list[list[int]], row_ids: list[int], rows: int, spec: DecodeSpec,
                        seed: int, attempt: int, twins: list[list[int]] | None
                        ) -> tuple[list[np.ndarray], dict[str, float]]:
        fill = rows - len(chunk)  # fill rows repeat the last prompt and are dropped below
        padded = chunk + [chunk[-1]] * fill
        if twins is not None:  # decode's layout: the prompts, then their unconditional twins
            padded += twins + [twins[-1]] * fill
        width = _round_up(max(len(p) for p in padded), self.prompt_multiple)
        ids = np.full((len(padded), width), spec.pad_id, np.int32)
        valid = np.zeros((len(padded), width), bool)
        for r, p in enumerate(padded):
            ids[r, width - len(p):], valid[r, width - len(p):] = p, True
        ids_r = np.array(row_ids + [row_ids[-1]] * (rows - len(chunk)), np.int32)
        args = (self._state, self._put(ids), self._put(valid), np.uint32(seed), self._put(ids_r), np.uint32(attempt))
        with self._mesh_context():
            key = (rows, width, spec)
            compile_s = 0.0
            if key not in self._compiled:
                start = time.perf_counter()
                self._compiled[key] = self._decode.lower(*args, spec=spec).compile()
                compile_s = time.perf_counter() - start
            start = time.perf_counter()
            out = self._compiled[key](*args)
            tokens, steps = np.asarray(out.tokens), int(out.steps)
            seconds = time.perf_counter() - start
        timing = {"generate_s": seconds, "steps": steps, "ms_per_step": 1e3 * seconds / max(steps, 1),
                  "batch_rows": len(chunk), "prompt_width": width, "compile_s": compile_s}
        return [_trim(tokens[r], steps, spec.end_id) for r in range(len(chunk))], timing

    def _data_shards(self) -> int:
        return 1 if self.mesh is None else self.mesh.shape["data"] * self.mesh.shape["fsdp"]

    def _put(self, array: np.ndarray) -> jax.Array | np.ndarray:
        if self.mesh is None:
            return array
        axes = ("batch",) + (None,) * (array.ndim - 1)
        spec = parallel.logical_to_spec(axes, array.shape, self.mesh, self.rules)
        return jax.device_put(array, jax.sharding.NamedSharding(self.mesh, spec))

    def _mesh_context(self) -> contextlib.AbstractContextManager:
        if self.mesh is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(parallel.use_rules(self.rules))
        return stack

    # ---- tasks --------------------------------------------------------------------------------------------

    def report_to_cxr(self, reports: Sequence[str], *, instruction: str | Sequence[str] | None = None,
                      seed: int = prompts.DEFAULT_SEED, image_mode: Literal["constrained", "resample"] = "constrained",
                      max_tries: int = 10, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS["report2cxr"],
                      guidance_scale: float | None = None, progress: bool = False) -> ImageResult:
        """Chest X-ray codes (and images, with a VQ-GAN) for reports; see the module docstring for the modes.

        `guidance_scale` (constrained mode only; not in the original) guides each image away from the one the
        same instruction with an empty report would give: classifier-free guidance, `DecodeSpec`.
        """
        h, w = self._grid()
        if guidance_scale is not None and image_mode != "constrained":
            raise ValueError(f"guidance_scale needs image_mode='constrained', got image_mode={image_mode!r}")
        instructions = self._instructions(instruction, len(reports), "report2cxr", seed)
        base = [prompts.generation_prompt_ids(self.tokenizer, i, input_text=r) for i, r in zip(instructions, reports)]
        if image_mode == "constrained":
            offset = self.tokenizer.image_offset
            spec = DecodeSpec(h * w, self.sampling, pad_id=self.tokenizer.pad_id,
                              allowed=(offset, offset + self.tokenizer.num_image_codes), guidance_scale=guidance_scale)
            twins = None if guidance_scale is None else [
                prompts.generation_prompt_ids(self.tokenizer, i, input_text="") + [self._image_open]
                for i in instructions]
            gen = self.generate([p + [self._image_open] for p in base], spec, seed=seed, progress=progress,
                                unconditional_ids=twins)
            codes = [self.tokenizer.ids_to_codes(ids) for ids in gen.ids]
            responses = [np.array([self._image_open, *ids, *self._image_close], np.int32) for ids in gen.ids]
            tries, timings = [1] * len(reports), gen.timings
        elif image_mode == "resample":
            codes, responses, tries, timings = self._resample_codes(base, h * w, seed, max_tries, max_new_tokens,
                                                                    progress)
        else:
            raise ValueError(f"image_mode must be one of {IMAGE_MODES}, got {image_mode!r}")
        codes = np.asarray(codes, np.int32).reshape(len(reports), h, w)
        images = None
        if self.vqgan is not None:
            start = time.perf_counter()
            images = self._vqgan("decode", codes)
            per_image = (time.perf_counter() - start) / max(len(reports), 1)
            timings = [{**t, "vqgan_decode_s_per_image": per_image} for t in timings]
        return ImageResult(codes, images, responses, instructions, tries, timings)

    def _resample_codes(self, base: list[list[int]], num_codes: int, seed: int, max_tries: int,
                        max_new_tokens: int, progress: bool) -> tuple[list, list[np.ndarray], list[int], list[dict]]:
        """The original's loop (free sampling, extract, redraw the failures), bounded by `max_tries`."""
        if max_tries < 1:
            raise ValueError(f"max_tries must be >= 1, got {max_tries}")
        if max_new_tokens < num_codes:
            raise ValueError(f"max_new_tokens={max_new_tokens} cannot hold an image of {num_codes} codes; use "
                             f"more (default {DEFAULT_MAX_NEW_TOKENS['report2cxr']})")
        spec = DecodeSpec(max_new_tokens, self.sampling, end_id=self.tokenizer.end_id, pad_id=self.tokenizer.pad_id)
        codes: list = [None] * len(base)
        responses: list = [None] * len(base)
        tries, timings = [0] * len(base), [{}] * len(base)
        pending = list(range(len(base)))
        for attempt in range(max_tries):
            if not pending:
                break
            gen = self.generate([base[i] for i in pending], spec, seed=seed, row_ids=pending, attempt=attempt,
                                progress=progress)
            for i, new, timing in zip(pending, gen.ids, gen.timings):
                codes[i] = prompts.extract_image_codes(self.tokenizer, base[i] + new.tolist(), num_codes)
                responses[i], tries[i], timings[i] = new, attempt + 1, timing
            pending = [i for i in pending if codes[i] is None]
        if pending:
            raise ImageGenerationError(
                f"{len(pending)} of {len(base)} rows did not yield exactly {num_codes} image codes in {max_tries} "
                f"tries (image_mode='resample', max_new_tokens={max_new_tokens}); raise max_tries or "
                "max_new_tokens, or use image_mode='constrained'", pending, codes)
        return codes, responses, tries, timings

    def cxr_to_report(self, images: np.ndarray | None = None, *, codes: np.ndarray | None = None,
                      instruction: str | Sequence[str] | None = None, seed: int = prompts.DEFAULT_SEED,
                      max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS["cxr2report"], progress: bool = False) -> TextResult:
        """Reports for preprocessed images (batch, H, W, 3) in [-1, 1], or for their codes (batch, h, w)."""
        if (images is None) == (codes is None):
            raise ValueError("give images or codes, not both or neither")
        codes = self._vqgan("encode", np.asarray(images, np.float32)) if images is not None else np.asarray(codes)
        h, w = self._grid()
        if codes.ndim != 3 or codes.shape[1:] != (h, w):
            raise ValueError(f"codes must be (batch, {h}, {w}) for this model's image grid, got {codes.shape}")
        instructions = self._instructions(instruction, len(codes), "cxr2report", seed)
        ids = [prompts.generation_prompt_ids(self.tokenizer, i, image_codes=c) for i, c in zip(instructions, codes)]
        return self._text_task(ids, instructions, seed, max_new_tokens, progress)

    def instruct(self, instruction: str | Sequence[str], input: str | Sequence[str | None] | None = None, *,
                 seed: int = prompts.DEFAULT_SEED, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS["instruct"],
                 progress: bool = False) -> TextResult:
        """Dolly-style answers; one instruction with many inputs, many instructions, or pairs of both."""
        instructions = [instruction] if isinstance(instruction, str) else list(instruction)
        inputs = [input] if input is None or isinstance(input, str) else list(input)
        if len(instructions) == 1 and len(inputs) > 1:
            instructions *= len(inputs)
        if len(inputs) == 1 and len(instructions) > 1:
            inputs *= len(instructions)
        if len(inputs) != len(instructions):
            raise ValueError(f"{len(instructions)} instructions but {len(inputs)} inputs")
        ids = [prompts.generation_prompt_ids(self.tokenizer, i, input_text=x) for i, x in zip(instructions, inputs)]
        return self._text_task(ids, instructions, seed, max_new_tokens, progress)

    def _text_task(self, ids: list[list[int]], instructions: list[str], seed: int, max_new_tokens: int,
                   progress: bool) -> TextResult:
        spec = DecodeSpec(max_new_tokens, self.sampling, end_id=self.tokenizer.end_id, pad_id=self.tokenizer.pad_id)
        gen = self.generate(ids, spec, seed=seed, progress=progress)
        texts = [prompts.extract_response_text(self.tokenizer, p + new.tolist()) for p, new in zip(ids, gen.ids)]
        return TextResult(texts, instructions, gen.timings)

    def _instructions(self, instruction: str | Sequence[str] | None, n: int, direction: prompts.Direction,
                      seed: int) -> list[str]:
        """One instruction for all rows, one per row, or else the original's random phrasing per (seed, row)."""
        if instruction is None:
            return [prompts.choose_instruction(seed, str(i), direction) for i in range(n)]
        if isinstance(instruction, str):
            return [instruction] * n
        if len(instruction) != n:
            raise ValueError(f"{len(instruction)} instructions for {n} inputs; give one, one per input, or None")
        return list(instruction)

    def _grid(self) -> tuple[int, int]:
        if self.image_grid is None:
            raise ValueError("image tasks need the image grid: give a VQ-GAN (or image_grid for codes only)")
        return self.image_grid

    def _vqgan(self, op: Literal["encode", "decode"], batch: np.ndarray) -> np.ndarray:
        """VQ-GAN encode or decode in chunks of one compiled size (one compile per op)."""
        if self.vqgan is None:
            raise ValueError(f"no VQ-GAN loaded, so images cannot be {op}d; pass vqgan_dir / --vqgan")
        if len(batch) == 0:
            cfg = self.vqgan.config
            shape = (0, *cfg.grid) if op == "encode" else (0, cfg.resolution, cfg.resolution, 3)
            return np.zeros(shape, np.int32 if op == "encode" else np.float32)
        if op not in self._vqgan_fns:
            self._vqgan_fns[op] = DataParallel(getattr(vqgan_flax.VQGAN, op), self.vqgan, self.batch_size)
        run = self._vqgan_fns[op]
        return np.concatenate([run(batch[start:start + run.batch_size])
                               for start in range(0, len(batch), run.batch_size)])


def _trim(tokens: np.ndarray, steps: int, end_id: int | None) -> np.ndarray:
    """A row's new ids up to and including its first end token, else the `steps` the loop ran."""
    if end_id is not None:
        hits = np.flatnonzero(tokens[:steps] == end_id)
        if hits.size:
            return tokens[:hits[0] + 1]
    return tokens[:steps]


# ---- loading --------------------------------------------------------------------------------------------------

def load_language_model(path: str | Path, *, mesh: jax.sharding.Mesh | None = None, dtype: str = "bfloat16",
                        step: int | None = None) -> tuple[GPTNeoX, dict[str, Any], str]:
    """(model, metadata, metadata source) from an HF directory, a converted checkpoint or a training workdir
    (`step`, default its latest)."""
    path = Path(path)
    if checkpoint_kind(path) == "hf":  # an orbax-to-hf export keeps its LLM-CXR metadata beside config.json
        meta = read_hf_metadata(path)
        source = path / (HF_METADATA_FILE if meta else "config.json")
        return load_hf_model(path, dtype=dtype, mesh=mesh), meta, str(source)
    meta, source, step = checkpoint.latest_metadata(path, step)
    # Training's attention, remat and layer-loop choices do not carry over: decoding's masks need "auto" (XLA).
    model = checkpoint.load_model(path, step=step, mesh=mesh, dtype=dtype, param_dtype=dtype, attention_impl="auto",
                                  remat_policy="none", scan_layers=True)
    return model, meta, source


def load_tokenizer(path: str | Path, num_image_codes: int | None) -> LlmCxrTokenizer:
    """The checkpoint's tokenizer.json when present, else the packaged dolly/LLM-CXR tokenizer."""
    own = Path(path) / "tokenizer.json"
    return LlmCxrTokenizer.from_pretrained(own if own.is_file() else None, num_image_codes=num_image_codes)


def check_vqgan(meta: dict[str, Any], source: str, vqgan_dir: str | Path, vqgan: vqgan_flax.VQGAN) -> None:
    """Refuse a VQ-GAN other than the one the LM's metadata records (fingerprint, grid)."""
    recorded = meta.get("vqgan_fingerprint")
    if recorded:
        found = vqgan_flax.checkpoint.read_fingerprint(vqgan_dir)
        if found != recorded:
            raise ValueError(f"{vqgan_dir}: VQ-GAN fingerprint {found[:16]}… differs from vqgan_fingerprint "
                             f"{recorded[:16]}… in {source}; its codes would mean other images to this LM. Pass the "
                             "VQ-GAN the LM was trained with")
    grid = meta.get("vqgan_grid")
    if grid and tuple(grid) != vqgan.config.grid:
        raise ValueError(f"{vqgan_dir}: VQ-GAN grid {vqgan.config.grid} differs from vqgan_grid {tuple(grid)} in "
                         f"{source}")


def check_token_layout(meta: dict[str, Any], source: str, tokenizer: LlmCxrTokenizer) -> None:
    """Refuse a tokenizer whose layout differs from the one training recorded."""
    recorded = meta.get("token_layout", {})
    if "text_vocab_size" not in recorded:  # HF directories and synthetic-data runs record none
        return
    found = dataclasses.asdict(tokenizer.layout)
    differing = sorted(k for k in recorded if recorded[k] != found.get(k))
    if differing:
        raise ValueError(f"{source}: token_layout differs from the tokenizer ({tokenizer.source}) in "
                         + ", ".join(f"{k} ({recorded[k]} vs {found.get(k)})" for k in differing))


# ---- CLI ------------------------------------------------------------------------------------------------------


def _mesh_shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated integers, e.g. 1,-1,1") from None

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llmcxr_jax.generate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="HF directory, converted checkpoint or training workdir")
    p.add_argument("--vqgan", help="VQ-GAN directory (vqgan_flax); needed for PNGs and for image inputs")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--input", action="append", default=[], help="one input (repeatable): a report for report2cxr, "
                   "an instruction for instruct (or its Input: when --instruction is given)")
    p.add_argument("--input_file", help="inputs, one per line")
    p.add_argument("images", nargs="*", help="cxr2report: image files (JPG, PNG, DICOM)")
    p.add_argument("--images", nargs="+", default=[], dest="image_flags", metavar="PATH",
                   help="cxr2report: image files")
    p.add_argument("--instruction", help="fixed instruction (default: the original's random phrasing per sample)")
    p.add_argument("--out", required=True, help="directory for results.jsonl and PNGs")
    p.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    p.add_argument("--top_p", type=float, default=0.92)
    p.add_argument("--top_k", type=int, default=0, help="0 = off")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=prompts.DEFAULT_SEED)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, help=f"default per task: {DEFAULT_MAX_NEW_TOKENS} (report2cxr: "
                   "resample mode only; the constrained mode always makes exactly the grid's codes)")
    p.add_argument("--image_mode", choices=IMAGE_MODES, default="constrained")
    p.add_argument("--max_tries", type=int, default=10, help="resample mode: draws per row before giving up")
    p.add_argument("--guidance_scale", type=float, help="report2cxr, constrained mode: classifier-free guidance "
                   "against an empty report (not in the original; 1 = none, larger = closer to the report)")
    p.add_argument("--dtype", default="bfloat16", help="LM parameter and compute dtype")
    p.add_argument("--mesh", default=None, type=_mesh_shape,
                   help="mesh shape data,fsdp,tensor (e.g. 1,-1,1); default one device")
    return p.parse_args(argv)


def read_inputs(args: argparse.Namespace) -> list[str]:
    """Text inputs from --input and --input_file, or image paths for cxr2report."""
    if args.task == "cxr2report":
        paths = args.images + args.image_flags
        if not paths or args.input or args.input_file:
            raise ValueError("cxr2report takes image paths (positional or --images), not --input/--input_file")
        return paths
    if args.images or args.image_flags:
        raise ValueError(f"image paths are only for cxr2report, not {args.task}")
    texts = list(args.input)
    if args.input_file:
        text = open_utf8(Path(args.input_file), ValueError).read().removeprefix("\ufeff")  # a BOM (Notepad)
        lines = [line.rstrip("\r") for line in text.split("\n")]  # splitlines() also splits at \x0c, \u2028...
        if not (given := [line for line in lines if line.strip()]):
            raise ValueError(f"--input_file {args.input_file}: no inputs in it (one per line; blank lines are skipped)")
        texts += given
    if not texts:
        raise ValueError(f"{args.task} needs --input TEXT or --input_file FILE")
    return texts


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Generate for every input and write `results.jsonl` (and PNGs for report2cxr) to `args.out`."""
    inputs = read_inputs(args)
    if args.instruction is not None and not args.instruction.strip():
        raise ValueError("--instruction is empty; leave it out for the original's instruction phrasings")
    if args.guidance_scale is not None and args.task != "report2cxr":
        raise ValueError(f"--guidance_scale is only for report2cxr, not {args.task}")
    sampling = SamplingParams(greedy=args.greedy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    # Unreadable image files fail before the (minutes-long) model load; ImageLoadError names the file.
    pixels = [load_image(path) for path in inputs] if args.task == "cxr2report" else []
    max_new = DEFAULT_MAX_NEW_TOKENS[args.task] if args.max_new_tokens is None else args.max_new_tokens
    if max_new < 1:
        raise ValueError(f"--max_new_tokens must be >= 1, got {max_new}")
    out = check_output_dir(args.out)
    out.mkdir(parents=True, exist_ok=True)  # before the (minutes-long) model load, like the image files
    mesh = parallel.make_mesh(args.mesh) if args.mesh else None
    sampler = Sampler.from_checkpoint(args.checkpoint, args.vqgan, mesh=mesh, dtype=args.dtype,
                                      batch_size=args.batch_size, sampling=sampling)
    common = dict(seed=args.seed, max_new_tokens=max_new, progress=True)
    records = []
    if args.task == "report2cxr":
        try:
            result = sampler.report_to_cxr(inputs, instruction=args.instruction, image_mode=args.image_mode,
                                           max_tries=args.max_tries, guidance_scale=args.guidance_scale, **common)
        except ImageGenerationError as err:  # keep the rows that did come back before failing
            _write_results(out, [{"task": args.task, "index": i, "input": inputs[i], "seed": args.seed,
                                  "output": codes, **({} if codes is not None else {"error": "no full image grid"})}
                                 for i, codes in enumerate(err.codes)])
            raise
        pngs = postprocess(result.images) if result.images is not None else [None] * len(inputs)
        for i, png in enumerate(pngs):
            record = {"output": result.codes[i].tolist(), "tries": result.tries[i]}
            if png is not None:
                Image.fromarray(png).save(out / f"{i:05d}.png")
                record["image"] = f"{i:05d}.png"
            records.append(record)
    elif args.task == "cxr2report":
        if sampler.vqgan is None:
            raise ValueError("cxr2report needs --vqgan to turn the images into codes")
        size = sampler.vqgan.config.resolution
        images = []
        for path, image in zip(inputs, pixels):
            try:
                images.append(preprocess(image, size))
            except ImageTooSmallError as err:
                raise ValueError(f"{path}: {err}") from None
        images = np.stack(images)
        result = sampler.cxr_to_report(images, instruction=args.instruction, **common)
        records = [{"output": text} for text in result.texts]
    else:
        instructions, task_inputs = (args.instruction, inputs) if args.instruction is not None else (inputs, None)
        result = sampler.instruct(instructions, task_inputs, **common)
        records = [{"output": text} for text in result.texts]
    for i, record in enumerate(records):
        record.update(task=args.task, index=i, instruction=result.instructions[i], input=inputs[i], seed=args.seed,
                      timings=result.timings[i])
    _write_results(out, records)
    return records


def _write_results(out: Path, records: list[dict[str, Any]]) -> None:
    with (out / "results.jsonl").open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    parallel.enable_compilation_cache()
    try:
        records = run(args)
    except ImageGenerationError as e:
        sys.exit(f"error: {e}; the rows that came back are in {Path(args.out) / 'results.jsonl'}")
    except (ValueError, OSError, ImageLoadError) as e:  # incl. CheckpointError; OSError names its path
        sys.exit(f"error: {e}")
    if args.task != "report2cxr":
        for record in records:
            print(f"[{record['index']}] {record['output']}")
    print(f"wrote {len(records)} results to {Path(args.out) / 'results.jsonl'}")


if __name__ == "__main__":
    main()
