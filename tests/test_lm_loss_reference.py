"""The training loss and accuracy counts against Hugging Face's own causal-LM loss on the same weights.

HF's `labels=` loss (targets shifted by one, -100 ignored, mean over the rest) is the original's training loss in
its `global` form; the accuracy counts are recomputed from HF's logits.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from hf_reference import hf_logits, save_hf, tiny_hf_model
from llmcxr_jax import lm_task
from llmcxr_jax.convert import load_hf_model

IMAGE_OFFSET = 80  # ids 80..95 play the image codes


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hf = tiny_hf_model(seed=11)
    return hf, load_hf_model(save_hf(hf, tmp_path_factory.mktemp("hf") / "hf"))


def _batch(hf) -> tuple[np.ndarray, np.ndarray]:
    """Four rows: a prompt then supervised text and image targets, one row with none, one right-padded; some
    targets are set to the model's own prediction so the accuracy counts are not all zero."""
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 96, (4, 23)).astype(np.int32)
    weights = np.zeros(ids.shape, np.float32)
    weights[0, 9:] = 1
    weights[1, 4:15] = 1
    weights[3, 12:20] = 1
    ids[3, 20:] = 0  # padding after the last target
    ids[0, 15:] = rng.integers(IMAGE_OFFSET, 96, 8)  # image targets in row 0
    for row, t in ((0, 10), (0, 12), (1, 5), (1, 9), (3, 13)):  # in order: a change never moves earlier logits
        ids[row, t] = hf_logits(hf, ids[row:row + 1])[0, t - 1].argmax()
    return ids, weights


@pytest.mark.parametrize("chunk", [0, 5])
def test_loss_and_accuracy_counts_match_hugging_face(models, chunk):
    hf, ours = models
    ids, weights = _batch(hf)
    if chunk:
        stats = lm_task.chunked_statistics(ours, jnp.asarray(ids), jnp.asarray(weights), IMAGE_OFFSET, chunk)
    else:
        stats = lm_task.token_statistics(ours(jnp.asarray(ids)), jnp.asarray(ids), jnp.asarray(weights),
                                         IMAGE_OFFSET)
    scales = lm_task.sequence_scales(jnp.asarray(weights), "global", 2)
    loss = float((scales * stats["seq_loss"]).sum())

    labels = torch.tensor(np.where(weights > 0, ids, -100), dtype=torch.long)
    with torch.no_grad():
        expected = float(hf(torch.tensor(ids, dtype=torch.long), labels=labels).loss)
    assert loss == pytest.approx(expected, rel=1e-5)

    hits = (hf_logits(hf, ids)[:, :-1].argmax(-1) == ids[:, 1:]) & (weights[:, 1:] > 0)
    image = ids[:, 1:] >= IMAGE_OFFSET
    supervised = weights[:, 1:] > 0
    assert float(stats["tokens"]) == supervised.sum() == (labels[:, 1:] != -100).sum().item()
    assert float(stats["image_tokens"]) == (supervised & image).sum() > 0
    assert float(stats["text_tokens"]) == (supervised & ~image).sum()
    assert float(stats["image_correct"]) == (hits & image).sum()
    assert float(stats["text_correct"]) == (hits & ~image).sum()
    assert hits.sum() >= 5


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk", [0, 5])
def test_training_gradients_match_hugging_face(tmp_path, tied, chunk):
    """jax.grad of the training loss (custom VJPs for the biases, the head and the chunked cross-entropy) against
    HF's loss.backward(); HF's gradients are read into our layout by the checkpoint loader (tested on logits)."""
    hf = tiny_hf_model(seed=11, tie_word_embeddings=tied)
    ours = load_hf_model(save_hf(hf, tmp_path / "hf"))
    ids, weights = _batch(hf)
    labels = torch.tensor(np.where(weights > 0, ids, -100), dtype=torch.long)
    hf(torch.tensor(ids, dtype=torch.long), labels=labels).loss.backward()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.grad)
    want = nnx.to_flat_state(nnx.state(load_hf_model(save_hf(hf, tmp_path / "grads")), nnx.Param))

    graphdef, params, rest = nnx.split(ours, nnx.Param, ...)
    cfg = lm_task.LMStepConfig(image_offset=IMAGE_OFFSET, loss_chunk=chunk)
    scales = lm_task.sequence_scales(jnp.asarray(weights), "global", 2)

    def loss(p):
        return lm_task.model_statistics(nnx.merge(graphdef, p, rest), jnp.asarray(ids), jnp.asarray(weights), cfg,
                                        scales)["loss"]

    got = dict(nnx.to_flat_state(jax.grad(loss)(params)))
    assert sorted(got) == sorted(path for path, _ in want)
    for path, expected in want:
        expected, actual = np.asarray(expected.get_value()), np.asarray(got[path].get_value())
        scale = float(np.abs(expected).max())
        assert scale > 0, path  # every parameter takes part in this loss
        np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5 * scale, err_msg=str(path))
