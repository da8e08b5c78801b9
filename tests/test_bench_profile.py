"""The profiling helper the GPU scripts rely on (a lease is too short to debug it there): traced ops are totalled
by name and tied back to the compiled HLO's shapes and source ops."""

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp

_SPEC = importlib.util.spec_from_file_location("profile_ops", Path(__file__).parents[1] / "bench" / "profile_ops.py")
profile_ops = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(profile_ops)


def test_hlo_sources_key_instructions_by_their_kernel_names():
    hlo = """
  %gemm_fusion_dot.1085 = bf16[1,10240]{1,0} fusion(%a, %b), kind=kCustom, \
metadata={op_name="jit(run)/ne,em->nm/dot_general" stack_frame_id=3}
  ROOT %tuple-reduce.7 = (f32[16]{0}, s32[16]{0}) fusion(%c), kind=kLoop
"""
    sources = profile_ops.hlo_sources(hlo)
    assert sources["gemm_fusion_dot_1085"] == {"shape": "bf16[1,10240]{1,0}", "op": "jit(run)/ne,em->nm/dot_general"}
    assert sources["tuple_reduce_7"] == {"shape": "(f32[16]{0}, s32[16]{0})", "op": ""}


def test_profiled_ops_carry_the_shape_and_source_of_their_instruction(tmp_path):
    @jax.jit
    def step(x, w):
        return jnp.tanh(x @ w).sum()

    x, w = jnp.ones((256, 512)), jnp.ones((512, 256))
    hlo = step.lower(x, w).compile().as_text()
    out = tmp_path / "ops.jsonl"
    rows = profile_ops.profile_top_ops(lambda: step(x, w).block_until_ready(), "cpu test", out,
                                       plane_prefix="/host:CPU", hlo_text=hlo)
    assert rows and [json.loads(line) for line in out.read_text().splitlines()] == rows
    sources = profile_ops.hlo_sources(hlo)
    matched = [r for r in rows if "shape" in r]
    assert matched and all(r["label"] == "cpu test" for r in rows)
    assert all({"shape": r["shape"], "op": r["op"]} == sources[profile_ops.kernel_key(r["name"])] for r in matched)
    assert any(r["op"].startswith("jit(step)/") for r in matched)  # XLA:CPU may fuse the dot with the rest
