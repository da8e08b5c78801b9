"""Token selection with Hugging Face's warpers, and the compiled decoding loop, as pure functions.

`decode` is one traced program: prefill of a left-padded batch, then one token per step over the KV cache in a
`lax.while_loop`, so no token goes back to the host until the whole batch is done. `warp_logits` reproduces
`generate(do_sample=True)`'s TemperatureLogitsWarper → TopKLogitsWarper → TopPLogitsWarper, in that order.

No full sort of the vocabulary: the `candidates` largest scores (`top_k`, blockwise: two small top-k's) and the
full log-partition function give each candidate's exact probability. If the mass outside them is small enough
that HF would drop the next token too, the kept set lies among the candidates: its floor is read there and the
draw is among them. Otherwise (for any row of the batch) the floor comes from a bisection over the float order
of the scores (32 masked sums) and the draw is over the whole vocabulary. Either way a token is kept iff HF
keeps it, by HF's rule (ascending cumulative probability > 1 - top_p, at least one token); sums run in another
order than torch's, so a token within float rounding (~1e-6) of the boundary could differ, and of exactly tied
scores at the boundary we keep all (HF keeps those its unstable sort puts last).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from llmcxr_jax import parallel
from llmcxr_jax.model import GPTNeoX, KVCache


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """`generate` settings; the defaults are LLM-CXR's (SPEC §10): sampling, top-p 0.92, top-k off, temperature 1.

    `greedy` ignores the rest (HF's `do_sample=False`). `candidates` only affects speed, never the result.
    """

    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.92
    candidates: int = 16

    def __post_init__(self) -> None:
        if not self.greedy and not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0 (use greedy=True for argmax), got "
                             f"{self.temperature}")
        if not (isinstance(self.top_k, (int, np.integer)) and self.top_k >= 0):
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in [0, 1] (1 = off), got {self.top_p}")
        if self.candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {self.candidates}")


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """What one compiled loop does: its length, token selection, stop token and allowed id range.

    `end_id` stops a row once sampled (later positions get `pad_id`), None never stops. `allowed = (start, stop)`
    restricts every step to ids in [start, stop), as if all other logits were -inf before the warpers.
    `guidance_scale` (not in the original) turns on classifier-free guidance: each row has an unconditional
    twin prompt, and tokens are drawn from u + scale · (c - u) of the two rows' logits (1 = the conditional
    model alone, larger = follow the condition more closely); both rows are fed the drawn token.
    """

    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    end_id: int | None = None
    pad_id: int = 0
    allowed: tuple[int, int] | None = None
    guidance_scale: float | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.allowed is not None and not 0 <= self.allowed[0] < self.allowed[1]:
            raise ValueError(f"allowed must be an id range (start, stop) with 0 <= start < stop, got {self.allowed}")
        if self.guidance_scale is not None and not (math.isfinite(self.guidance_scale) and self.guidance_scale >= 0):
            raise ValueError(f"guidance_scale must be a finite number >= 0 (None = off), got {self.guidance_scale}")


class Decoded(NamedTuple):
    tokens: jax.Array  # (batch, max_new_tokens) int32, pad after a row's end token and after the last step
    steps: jax.Array  # () int32: loop iterations run (< max_new_tokens when every row stopped early)


class _Candidates(NamedTuple):
    scores: jax.Array  # (batch, vocab) fp32 after temperature and top-k
    top: jax.Array  # (batch, k) the largest scores, descending, after top-k (-inf where it removed them)
    top_ids: jax.Array  # (batch, k) their token ids


def top_k(x: jax.Array, k: int, block: int = 128) -> tuple[jax.Array, jax.Array]:
    """`lax.top_k` over the last axis of float (rows, n), in two small top-k's instead of one over n.

    The k largest entries lie in the k blocks with the largest maxima: a block holding one of them has a
    maximum at least that large, and k other blocks with larger maxima would hold k larger entries. So: the
    maximum of each `block`-wide slice, the top k of those, then the top k of the k·block entries they hold.
    XLA:GPU's top-k kernel runs a row in one thread block: 0.18 ms per call over 51,305 logits on the H200
    (NOTES.md), where the blockwise form reads the logits once in a parallel reduce. Equal to `lax.top_k` except
    in which of exactly tied entries it returns. On a row with fewer than k entries above -inf, the ids of its
    -inf results are in range but may repeat (the padding's become n - 1): no use for anything but a draw.
    """
    rows, n = x.shape
    blocks = -(-n // block)
    if blocks <= k:
        return jax.lax.top_k(x, k)
    tiles = jnp.pad(x, ((0, 0), (0, blocks * block - n)), constant_values=-jnp.inf).reshape(rows, blocks, block)
    _, best = jax.lax.top_k(tiles.max(-1), k)
    values, where = jax.lax.top_k(jnp.take_along_axis(tiles, best[:, :, None], axis=1).reshape(rows, k * block), k)
    ids = jnp.take_along_axis(best, where // block, axis=1) * block + where % block
    return values, jnp.minimum(ids, n - 1)  # the padding's ids, on rows with fewer than k entries above -inf


def _candidates(logits: jax.Array, params: SamplingParams) -> _Candidates:
    """TemperatureLogitsWarper and TopKLogitsWarper, plus the candidate set the later steps start from."""
    scores = logits.astype(jnp.float32)
    if params.temperature != 1.0:
        scores = scores / params.temperature
    vocab = scores.shape[-1]
    # One more than top_k, so that the first removed score shows the kept set lies inside.
    top, top_ids = top_k(scores, min(vocab, max(params.candidates, params.top_k + 1 if params.top_k else 0)))
    if params.top_k:
        kth = top[:, min(params.top_k, vocab) - 1, None]  # scores below the k-th largest go (ties stay)
        scores, top = jnp.where(scores < kth, -jnp.inf, scores), jnp.where(top < kth, -jnp.inf, top)
    return _Candidates(scores, top, top_ids)


def _ordered(x: jax.Array) -> jax.Array:
    """float32 → uint32 with the same order (sign-magnitude to offset binary)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _unordered(key: jax.Array) -> jax.Array:
    """The inverse of `_ordered`."""
    bits = jnp.where(key >> 31 == 1, key & jnp.uint32(0x7FFFFFFF), ~key)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _kept_by_top_p(mass_above: jax.Array, limit: np.float32) -> jax.Array:
    """HF keeps a token iff its ascending cumulative probability, 1 - the mass ranked above it, exceeds 1 - top_p."""
    return (1.0 - mass_above) > limit


def _top_p_floor_search(scores: jax.Array, limit: np.float32) -> jax.Array:
    """The smallest score HF's top-p keeps, per row, by bisection over the float order: 32 masked sums, no sort."""
    probs = jnp.exp(scores - jax.nn.logsumexp(scores, axis=-1, keepdims=True))
    keys = _ordered(scores)

    def halve(_, bounds):
        lo, hi = bounds  # invariant: the value at `lo` is removed, the one at `hi` kept (or the row's maximum)
        mid = lo + (hi - lo) // 2
        kept = _kept_by_top_p(jnp.where(keys > mid[:, None], probs, 0.0).sum(-1), limit)
        return jnp.where(kept, lo, mid), jnp.where(kept, mid, hi)

    _, hi = jax.lax.fori_loop(0, 32, halve, (keys.min(-1) - 1, keys.max(-1)))
    return _unordered(hi)


def _floor(c: _Candidates, params: SamplingParams):
    """(per row: whether its kept set lies among the candidates; the floor read from them; the exact floor).

    The floor is the smallest kept score; the exact one is a thunk, for `lax.cond` to run only when some row
    needs it.
    """
    vocab, k = c.scores.shape[-1], c.top.shape[-1]
    if params.top_p < 1.0:
        limit = np.float32(1.0 - params.top_p)  # torch compares its float32 cumsum with the float cast to float32
        probs = jnp.exp(c.top - jax.nn.logsumexp(c.scores, axis=-1, keepdims=True))
        kept = _kept_by_top_p(jnp.cumsum(probs, axis=-1) - probs, limit).at[:, 0].set(True)  # min_tokens_to_keep
        inside = jnp.take_along_axis(c.top, kept.sum(-1, keepdims=True) - 1, axis=-1)[:, 0]
        # The best score outside has all of the candidates' mass above it: HF drops it iff not kept by that rule.
        covered = ~_kept_by_top_p(probs.sum(-1), limit)
        return covered, inside, lambda: _top_p_floor_search(c.scores, limit)
    floor = c.top[:, min(params.top_k, vocab) - 1] if params.top_k else jnp.full(c.top.shape[:1], -jnp.inf)
    covered = c.top[:, -1] == -jnp.inf if params.top_k and k < vocab else jnp.full(c.top.shape[:1], k == vocab)
    return covered, floor, lambda: floor


def warp_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """HF's temperature, top-k and top-p warpers on (batch, vocab) logits: fp32 scores, -inf where removed."""
    c = _candidates(logits, params)
    covered, inside, exact = _floor(c, params)
    floor = jax.lax.cond(jnp.all(covered), lambda: inside, lambda: jnp.where(covered, inside, exact()))
    return jnp.where(c.scores < floor[:, None], -jnp.inf, c.scores)


def select_tokens(logits: jax.Array, keys: jax.Array, params: SamplingParams) -> jax.Array:
    """Next token per row from (batch, vocab) logits: argmax, or one draw per row key from the warped scores.

    When a row's kept set lies among the candidates its draw is among them (a few random numbers, not one per
    id), else over the vocabulary; the choice is the row's own, so its draws do not depend on its neighbours.
    """
    if params.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    c = _candidates(logits, params)
    covered, inside, exact = _floor(c, params)
    draw = jax.vmap(jax.random.categorical)

    def among_candidates():
        choice = draw(keys, jnp.where(c.top < inside[:, None], -jnp.inf, c.top))
        return jnp.take_along_axis(c.top_ids, choice[:, None], axis=-1)[:, 0]

    def row_by_row():
        over_vocabulary = draw(keys, jnp.where(c.scores < exact()[:, None], -jnp.inf, c.scores))
        return jnp.where(covered, among_candidates(), over_vocabulary)

    return jax.lax.cond(jnp.all(covered), among_candidates, row_by_row).astype(jnp.int32)


def row_keys(seed: jax.Array, row_ids: jax.Array) -> jax.Array:
    """One PRNG key per row from the run's seed and each row's own id, so a row's draws ignore its neighbours."""
    return jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(seed), row_ids)


def _select(logits: jax.Array, keys: jax.Array, spec: DecodeSpec) -> jax.Array:
    """Token ids from logits over the whole vocabulary, or over `spec.allowed` only (offset back to ids)."""
    token = select_tokens(logits, keys, spec.sampling)
    return token if spec.allowed is None else token + spec.allowed[0]


def _constrain_cache(cache: KVCache) -> KVCache:
    """Shard the cache over the batch like the activations (a no-op without a mesh)."""
    kv_axes = ("layers", "batch", "heads", "length", "head_dim")
    return cache._replace(k=parallel.constrain(cache.k, kv_axes), v=parallel.constrain(cache.v, kv_axes),
                          valid=parallel.constrain(cache.valid, ("batch", "length")))


def guided_logits(logits: jax.Array, scale: float) -> jax.Array:
    """Classifier-free guidance over (2·batch, vocab) logits, conditional rows first: u + scale · (c - u), fp32."""
    cond, uncond = jnp.split(logits.astype(jnp.float32), 2)
    return uncond + scale * (cond - uncond)


def decode(model: GPTNeoX, prompt_ids: jax.Array, prompt_valid: jax.Array, keys: jax.Array,
           spec: DecodeSpec) -> Decoded:
    """Generate up to `spec.max_new_tokens` tokens after left-padded prompts (rows, width); traceable, pure.

    The prompt's last column (a real token in every row, by left padding) is fed as the loop's first step, so the
    prefill never computes vocabulary logits it would throw away. The cache uses the model's compute dtype.
    With `spec.guidance_scale`, rows are the batch's prompts then their unconditional twins (rows = 2·batch,
    one key per batch row) and the result has batch rows.
    """
    rows, width = prompt_ids.shape
    guided = spec.guidance_scale is not None
    batch = keys.shape[0]
    expected = 2 * batch if guided else batch
    if rows != expected:
        raise ValueError(f"{rows} prompt rows for {batch} keys, expected {expected}"
                         + (" (the prompts, then their unconditional twins)" if guided else ""))
    cache = _constrain_cache(model.init_cache(rows, width - 1 + spec.max_new_tokens))
    _, cache = model.extend(prompt_ids[:, :-1], cache, prompt_valid[:, :-1])
    out = jnp.full((batch, spec.max_new_tokens), spec.pad_id, jnp.int32)

    def cond(carry):
        _, _, _, done, step = carry
        return (step < spec.max_new_tokens) & ~jnp.all(done)

    def body(carry):
        cache, fed, out, done, step = carry
        logits, cache = model.extend(fed[:, None], cache, vocab_range=spec.allowed)
        logits = guided_logits(logits[:, -1], spec.guidance_scale) if guided else logits[:, -1]
        step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, step)
        token = jnp.where(done, spec.pad_id, _select(logits, step_keys, spec))
        out = jax.lax.dynamic_update_slice(out, token[:, None], (0, step))
        if spec.end_id is not None:
            done = done | (token == spec.end_id)
        return cache, jnp.concatenate([token, token]) if guided else token, out, done, step + 1

    init = (cache, prompt_ids[:, -1].astype(jnp.int32), out, jnp.zeros((batch,), bool), jnp.zeros((), jnp.int32))
    _, _, out, _, steps = jax.lax.while_loop(cond, body, init)
    return Decoded(out, steps)
