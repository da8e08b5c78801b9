"""Image judge: reads the phantom labels off a radiograph with a small MLP trained on phantoms in seconds.

Images of any size are box-filtered to 32 x 32 and standardised per image (so exposure does not matter), then a
one-hidden-layer MLP scores every finding label; `no_finding` is derived (1 when nothing else fires). Training mixes
clean and blurred/noisy copies so that VQ-GAN reconstructions, which are smoother and noisier, are read as well.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image
from scipy.ndimage import gaussian_filter

from llmcxr_jax.data.phantom.findings import LABELS, label_vector
from llmcxr_jax.data.phantom.generate import make_phantoms

GRID = 32  # every image is judged at this resolution
FINDING_LABELS = LABELS[:-1]  # what the network predicts; no_finding follows from them
JUDGE_SEED = 7_000_001  # training phantoms use their own seed, disjoint from any dataset seed you pick


def _as_batch(images) -> np.ndarray:
    """uint8 (B, H, W) or (B, H, W, C) -> float32 (B, GRID, GRID), box-filtered and standardised per image."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or min(images.shape[1:3]) < 16:
        raise ValueError(f"image judge expects uint8 images (B, H, W[, C]) with H, W >= 16, got {images.dtype} "
                         f"{images.shape}; convert decoded [-1, 1] floats with "
                         "np.uint8(np.clip((x + 1) * 127.5, 0, 255))")
    if images.ndim == 4:
        images = images.mean(axis=-1)
    images = images.astype(np.float32)
    b, h, w = images.shape
    if h % GRID == 0 and w % GRID == 0:
        small = images.reshape(b, GRID, h // GRID, GRID, w // GRID).mean(axis=(2, 4))
    else:
        small = np.stack([np.asarray(Image.fromarray(im).resize((GRID, GRID), Image.BOX)) for im in images])
    mean = small.mean(axis=(1, 2), keepdims=True)
    std = small.std(axis=(1, 2), keepdims=True) + 1.0
    return (small - mean) / std


def degrade(images: np.ndarray, rng: np.random.Generator, blur: float = 1.0, noise: float = 0.06) -> np.ndarray:
    """Blur and noise like a VQ-GAN reconstruction, on standardised GRID x GRID batches.

    `blur` is the largest Gaussian sigma in pixels, `noise` the largest noise std (images have unit std).
    """
    sigma = rng.uniform(0.3, blur, size=len(images))
    out = np.stack([gaussian_filter(im, s) for im, s in zip(images, sigma)])
    return out + rng.uniform(0, noise, size=(len(images), 1, 1)) * rng.standard_normal(out.shape, dtype=np.float32)


def _logits(params, x):
    h = jax.nn.gelu(x.reshape(x.shape[0], -1) @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


@functools.partial(jax.jit, static_argnames="optimizer")
def _step(params, opt_state, x, y, optimizer):
    def loss(p):
        return optax.sigmoid_binary_cross_entropy(_logits(p, x), y).mean()

    updates, opt_state = optimizer.update(jax.grad(loss)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state


@dataclasses.dataclass(frozen=True)
class ImageJudge:
    """A fitted MLP; `predict` gives 0/1 per name in `LABELS`."""

    params: dict

    @classmethod
    def fit(cls, images, labels, *, seed: int = 0, hidden: int = 256, steps: int = 1000, batch: int = 256,
            learning_rate: float = 1e-3) -> ImageJudge:
        """Train on uint8 images and (B, len(LABELS)) 0/1 labels; clean and degraded copies of every image."""
        x = _as_batch(images)
        y = np.asarray(labels, dtype=np.float32)
        if y.shape != (len(x), len(LABELS)):
            raise ValueError(f"labels shape {y.shape}: expected ({len(x)}, {len(LABELS)}) in LABELS order")
        rng = np.random.default_rng(seed)
        x = np.concatenate([x, degrade(x, rng)])
        y = np.concatenate([y, y])[:, :len(FINDING_LABELS)]
        key1, key2 = jax.random.split(jax.random.key(seed))
        d = GRID * GRID
        params = {"w1": jax.random.normal(key1, (d, hidden)) / np.sqrt(d), "b1": jnp.zeros(hidden),
                  "w2": jax.random.normal(key2, (hidden, y.shape[1])) / np.sqrt(hidden), "b2": jnp.zeros(y.shape[1])}
        optimizer = optax.adamw(optax.cosine_decay_schedule(learning_rate, steps), weight_decay=1e-3)
        opt_state = optimizer.init(params)
        for _ in range(steps):
            idx = rng.integers(len(x), size=batch)
            params, opt_state = _step(params, opt_state, x[idx], y[idx], optimizer)
        return cls(params=jax.tree.map(np.asarray, params))

    def predict_proba(self, images) -> np.ndarray:
        """(B, len(FINDING_LABELS)) probabilities."""
        return np.asarray(jax.nn.sigmoid(_logits(self.params, jnp.asarray(_as_batch(images)))))

    def predict(self, images) -> np.ndarray:
        """(B, len(LABELS)) int 0/1 in `LABELS` order."""
        found = (self.predict_proba(images) > 0.5).astype(np.int64)
        return np.concatenate([found, (found.sum(axis=1, keepdims=True) == 0).astype(np.int64)], axis=1)


def phantom_arrays(seed: int, count: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(images (count, size, size) uint8, labels (count, len(LABELS))) of phantoms 0 .. count - 1 of `seed`."""
    cases = list(make_phantoms(seed, 0, count, size))
    return np.stack([p.image for p in cases]), np.stack([label_vector(p.labels) for p in cases])


@functools.lru_cache(maxsize=4)
def train_image_judge(size: int = 64, seed: int = JUDGE_SEED, count: int = 2000) -> ImageJudge:
    """A judge fitted on `count` fresh phantoms rendered at `size` (cached per process)."""
    return ImageJudge.fit(*phantom_arrays(seed, count, size), seed=seed)

