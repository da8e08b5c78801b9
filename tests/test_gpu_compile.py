"""The decoding step as XLA:GPU compiles it for an H100, on this CPU machine (deviceless compilation through
the CUDA plugin, bench/gpu_compile.py): each weight matmul is a GEMM kernel at batch 1 too, attention reads
the KV cache in place, its softmax and value product one kernel, and no top-k kernel reads the vocabulary."""
from __future__ import annotations

import math
import re
import sys
from collections import Counter

import jax
import jax.numpy as jnp
import pytest

from llmcxr_jax import aot, sampling
from llmcxr_jax.model import GPTNeoXConfig, gelu
from train_helpers import ROOT

DATA = ROOT / "tests" / "data"

sys.path.insert(0, str(ROOT / "bench"))
import gpu_compile  # noqa: E402  bench/gpu_compile.py

# pythia-70m's widths with 2 layers: every weight matrix is under XLA:GPU's 10M-element threshold, below which
# a one-row product used to become a multiply of the whole kernel plus a reduce.
CONFIG = GPTNeoXConfig(vocab_size=51305, hidden_size=512, num_hidden_layers=2, num_attention_heads=8,
                       intermediate_size=2048, dtype="bfloat16", param_dtype="bfloat16")
CACHE = 96


def _shapes(kernel: str) -> list[list[int]]:
    """The dimensions of each array a kernel writes (one, or a tuple's)."""
    return [[int(d) for d in dims.split(",") if d] for dims in re.findall(r"\[([\d,]*)\]", kernel)]


@pytest.fixture(scope="module", params=[(1, None), (4, None), (1, (50281, 51305))],
                ids=["batch1", "batch4", "batch1_image_codes"])
def decode_kernels(request):
    batch, vocab_range = request.param
    # The suite's "highest" matmul precision (for the parity tests) keeps bf16 dots out of XLA's GEMM kernels.
    with jax.default_matmul_precision("default"):
        hlo = gpu_compile.decode_step_hlo(CONFIG, batch, CACHE, vocab_range)
    return batch, gpu_compile.kernels(hlo)


def test_every_weight_matmul_is_a_gemm_kernel(decode_kernels):
    _, kernels = decode_kernels
    gemms = sum(n for k, n in kernels.items() if k.startswith("gemm_fusion"))
    assert gemms >= 4 * CONFIG.num_hidden_layers + 1, kernels  # qkv, out, up, down per layer, then the LM head
    smallest_kernel = CONFIG.hidden_size * CONFIG.hidden_size
    weight_sized = {k: n for k, n in kernels.items() if not k.startswith("gemm_fusion") and "update_slice" not in k
                    and any(math.prod(dims) >= smallest_kernel for dims in _shapes(k))}
    assert not weight_sized, f"a weight-sized intermediate outside a GEMM (a strength-reduced matmul): {weight_sized}"


def test_attention_reads_the_cache_in_place(decode_kernels):
    batch, kernels = decode_kernels
    over_cache = {k: n for k, n in kernels.items() if any({CACHE, CONFIG.head_dim} <= set(d) for d in _shapes(k))}
    # Only the two cache writes per layer produce outputs over positions and channels: no copy or transpose
    # of the cache, no materialised probabilities x values product.
    assert set(over_cache) == {f"loop_dynamic_update_slice_fusion bf16[{CONFIG.num_hidden_layers},{batch},"
                          f"{CONFIG.num_attention_heads},{CACHE},{CONFIG.head_dim}]"}, over_cache
    assert sum(over_cache.values()) == 2 * CONFIG.num_hidden_layers


def test_sampling_never_runs_a_top_k_kernel_over_the_vocabulary():
    """XLA:GPU's top-k kernel runs a row in one thread block (0.18 ms a call over 51,305 logits on the H200):
    the candidates come from two top-k's over block maxima and the best blocks instead."""
    device = jax.sharding.SingleDeviceSharding(aot.topology_devices("h100:1")[0])
    logits = jax.ShapeDtypeStruct((1, CONFIG.vocab_size), jnp.float32, sharding=device)
    seed = jax.ShapeDtypeStruct((), jnp.uint32, sharding=device)

    def draw(logits, seed):
        return sampling.select_tokens(logits, sampling.row_keys(seed, jnp.arange(1)), sampling.SamplingParams())

    with jax.default_matmul_precision("default"):
        hlo = jax.jit(draw).lower(logits, seed).compile().as_text()
    shapes = dict(re.findall(r"%(\S+) = (\w+\[[\d,]*\])", hlo))
    top_k_inputs = [shapes[arg] for arg in re.findall(r'custom-call\(%([^),]+)\).*custom_call_target="__gpu\$TopK"',
                                                      hlo)]
    assert top_k_inputs, "no top-k kernel: the test no longer looks at the candidates' selection"
    assert all(math.prod(dims) <= 16 * 128 for shape in top_k_inputs for dims in _shapes(shape)), top_k_inputs


def test_gelu_compiles_to_erf_without_an_erfc_expansion():
    """The 2.8B step's GELU passes were compute-bound on an H200 (NOTES.md): erfc's expansion is two polynomials,
    two divides and an exp per element, each branch computed. erf is one op; the gradient adds one exp."""
    device = jax.sharding.SingleDeviceSharding(aot.topology_devices("h100:1")[0])
    x = jax.ShapeDtypeStruct((256, 2048), jnp.bfloat16, sharding=device)
    grad = jax.grad(lambda x: gelu(x).astype(jnp.float32).sum())
    ops = {}
    for name, fn in (("forward", gelu), ("gradient", grad)):
        hlo = jax.jit(fn).lower(x).compile().as_text()
        ops[name] = {op: len(re.findall(rf"= f32\[[\d,]*\]\{{[\d,]*\}} {op}\(", hlo))
                     for op in ("erf", "exponential", "divide")}
    assert ops == {"forward": {"erf": 1, "exponential": 0, "divide": 0},
                   "gradient": {"erf": 1, "exponential": 1, "divide": 0}}, ops


def test_traffic_counts_each_loop_trip_and_only_the_slices_a_trip_touches():
    """bench/gpu_compile.py --train ranks the training step's kernels by the memory they move: a scan over
    stacked weights reads one layer's slice and writes one slice of its stacked outputs per trip."""
    device = jax.sharding.SingleDeviceSharding(aot.topology_devices("h100:1")[0])
    layers, width, rows = 8, 512, 128
    stacked = jax.ShapeDtypeStruct((layers, width, width), jnp.float32, sharding=device)
    x = jax.ShapeDtypeStruct((rows, width), jnp.float32, sharding=device)

    def forward(weights, h):
        def layer(h, w):
            h = jnp.tanh(h @ w)
            return h, h
        return jax.lax.scan(layer, h, weights)

    with jax.default_matmul_precision("default"):
        _assert_slices_per_trip(jax.jit(forward).lower(stacked, x).compile().as_text(), layers, width, rows)
    # the same program as jax 0.12's XLA compiles it: its dynamic slices are async fusion-start/fusion-done pairs
    _assert_slices_per_trip((DATA / "scan_async_slices_h100_jax012.hlo").read_text(), layers, width, rows)


def _assert_slices_per_trip(hlo_text: str, layers: int, width: int, rows: int) -> None:
    rows_moved = gpu_compile.traffic(hlo_text)
    per_trip = [r for r in rows_moved if r.runs == layers]
    assert per_trip, rows_moved
    weight_bytes, stack_bytes = layers * width * width * 4, layers * rows * width * 4
    assert all(r.bytes_per_run < weight_bytes / 2 for r in per_trip), per_trip  # slices, never a stack
    assert sum(r.bytes_per_run * r.runs for r in per_trip) >= weight_bytes + stack_bytes, per_trip


@pytest.fixture(scope="module")
def train_hlo() -> str:
    return gpu_compile.train_step_hlo(batch=8, seq_len=32, variant="tiny")  # configs/stage1.py:tiny, 2 layers


def test_the_training_step_compiles_for_an_h100_with_one_run_of_each_layer_kernel_per_layer(train_hlo):
    runs = Counter(r.runs for r in gpu_compile.traffic(train_hlo))
    assert set(runs) == {1, 2, 4} and runs[2] > runs[4], runs  # entry, forward/backward layer scans, loss chunks


def test_the_layer_backward_assembles_the_qkv_gradient_by_concatenation(train_hlo):
    """Splitting q/k/v and the rotary channels with `jnp.split` makes their gradients one concatenate; sliced
    by indexing, each gradient was a zero pad of the whole qkv width and the pads were added, inside the qkv
    bias gradient's column reduce: the slowest kernel of the H200 profile for its traffic (NOTES.md)."""
    layer_ops = [line for line in train_hlo.splitlines() if "while/body" in line]
    assert any(" concatenate(" in line and "transpose(jvp())" in line for line in layer_ops)
    assert not [line for line in layer_ops if " pad(" in line]


def test_deviceless_compiles_stay_out_of_the_persistent_compilation_cache(tmp_path):
    """An executable compiled for devices that are not there cannot be read back from JAX's cache: with the
    cache on (as the CLIs turn it on), each repeat compile warned. Asking for topology devices turns it off."""
    import warnings

    saved = {name: getattr(jax.config, name) for name in ("jax_compilation_cache_dir", "jax_enable_compilation_cache",
                                                         "jax_persistent_cache_min_compile_time_secs")}
    try:
        jax.config.update("jax_compilation_cache_dir", str(tmp_path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_enable_compilation_cache", True)
        jax.jit(lambda x: x + 1)(1.0)  # a compile with the cache on: JAX decides once per process to use it
        device = jax.sharding.SingleDeviceSharding(aot.topology_devices("h100:1")[0])
        x = jax.ShapeDtypeStruct((64, 64), jnp.float32, sharding=device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                jax.jit(lambda x: jnp.tanh(x @ x)).lower(x).compile()
        assert not [w for w in caught if "compilation cache" in str(w.message)], [str(w.message) for w in caught]
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)
