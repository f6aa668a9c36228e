"""mmjax.benchmarks.profile: HLO parsing and categories (GPU-shaped HLO included), and a
traced CPU step whose op time is all accounted for."""
import math

import pytest

from mmjax.benchmarks import profile
from mmjax.configs import load_config
from tests.helpers import tiny_zoo_model

MODEL = "jit(train_step)/jvp(CLIP)/CLIP.encode_image/image_encoder/encoder/block0"
BACKWARD = "jit(train_step)/transpose(jvp(CLIP))/CLIP.encode_image/image_encoder/encoder/block0"

# What XLA's GPU backend prints: cuBLAS GEMMs and cuDNN attention as custom calls, Triton
# and loop fusions calling fused computations, a collective; the names are made up.
GPU_HLO = f"""HloModule jit_train_step, is_scheduled=true

%fused_norm (param_0: f32[8,16]) -> f32[8,16] {{
  %param_0 = f32[8,16]{{1,0}} parameter(0)
  %rsqrt.1 = f32[8,16]{{1,0}} rsqrt(%param_0), metadata={{op_name="{MODEL}/ln_attn/LayerNorm_0/rsqrt"}}
  ROOT %mul.1 = f32[8,16]{{1,0}} multiply(%rsqrt.1, %param_0), metadata={{op_name="{MODEL}/ln_attn/LayerNorm_0/mul"}}
}}

%triton_gemm (p0: bf16[4,8,16], p1: bf16[4,16,8]) -> bf16[4,8,8] {{
  %p0 = bf16[4,8,16]{{2,1,0}} parameter(0)
  %p1 = bf16[4,16,8]{{2,1,0}} parameter(1)
  ROOT %dot.2 = bf16[4,8,8]{{2,1,0}} dot(%p0, %p1), lhs_batch_dims={{0}}, lhs_contracting_dims={{2}}, rhs_batch_dims={{0}}, rhs_contracting_dims={{1}}, metadata={{op_name="{BACKWARD}/attn/bhqk,bkhd->bqhd/dot_general"}}
}}

ENTRY %main.9 (x: bf16[8,16], w: bf16[16,64], g: f32[8,16]) -> bf16[8,64] {{
  %x = bf16[8,16]{{1,0}} parameter(0)
  %w = bf16[16,64]{{1,0}} parameter(1)
  %g = f32[8,16]{{1,0}} parameter(2)
  %custom-call.3 = (bf16[8,64]{{1,0}}, s8[1024]{{0}}) custom-call(%x, %w), custom_call_target="__cublas$gemm", backend_config={{"gemm_backend_config":{{"dot_dimension_numbers":{{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}}}}, metadata={{op_name="{MODEL}/mlp/fc1/dot_general"}}
  %fusion.4 = f32[8,16]{{1,0}} fusion(%g), kind=kLoop, calls=%fused_norm, metadata={{op_name="{MODEL}/ln_attn/LayerNorm_0/mul"}}
  %fusion.5 = bf16[4,8,8]{{2,1,0}} fusion(%x, %w), kind=kCustom, calls=%triton_gemm, metadata={{op_name="{BACKWARD}/attn/bhqk,bkhd->bqhd/dot_general"}}
  %custom-call.6 = (bf16[4,8,2,8]{{3,2,1,0}}, u8[0]{{0}}) custom-call(%x, %x, %x), custom_call_target="__cudnn$fmhaSoftmax", metadata={{op_name="{MODEL}/attn/dot_product_attention"}}
  %all-reduce.7 = f32[8,16]{{1,0}} all-reduce(%g), replica_groups={{}}, to_apply=%fused_norm
  %copy.8 = bf16[16,64]{{0,1}} copy(%w)
  %multiply.9 = f32[8,16]{{1,0}} multiply(%g, %g), metadata={{op_name="jit(train_step)/mul"}}
  %subtract.10 = f32[8,16]{{1,0}} subtract(%g, %g), metadata={{op_name="jit(train_step)/jvp()/sub"}}
  ROOT %get-tuple-element.11 = bf16[8,64]{{1,0}} get-tuple-element(%custom-call.3), index=0
}}
"""


def test_gpu_shaped_hlo_categories_and_flops():
    attribution = profile.Attribution(GPU_HLO)
    assert attribution.module == "jit_train_step"
    expected = {
        "custom-call.3": ("matmul: MLP", 2 * 8 * 64 * 16),
        "fusion.4": ("normalisation", 0.0),
        "fusion.5": ("matmul: attention scores", 2 * 4 * 8 * 8 * 16),
        "custom-call.6": ("attention: fused kernel", 0.0),
        "all-reduce.7": ("communication", 0.0),
        "copy.8": ("copies/transposes", 0.0),
        "multiply.9": ("optimizer", 0.0),
        "subtract.10": ("loss", 0.0),
        "not-in-this-program": ("unattributed", 0.0),
    }
    assert {op: attribution.category(op) for op in expected} == expected


def test_summarise_keeps_what_it_cannot_attribute():
    attribution = profile.Attribution(GPU_HLO)
    ops = [
        profile.OpTime("custom-call.3", "jit_train_step", "sm90_xmma_gemm", 4.0),
        profile.OpTime("fusion.4", None, "loop_fusion", 2.0),
        profile.OpTime("fusion.4", "jit_other", "loop_fusion", 1.0),  # another program's op
        profile.OpTime(None, None, "MemcpyD2D", 1.0),
        profile.OpTime(None, None, "some_kernel", 2.0),
    ]
    totals, top = profile.summarise(ops, attribution, steps=2)
    rows = {r["category"]: r for r in profile.rows(totals, peak_tflops=1.0)}
    assert rows["matmul: MLP"]["seconds_per_step"] == 2.0
    assert rows["matmul: MLP"]["tflops"] == pytest.approx(2 * 8 * 64 * 16 / 2 / 2 / 1e12)
    assert rows["normalisation"]["seconds_per_step"] == 1.0
    assert rows["copies/transposes"]["seconds_per_step"] == 0.5
    assert rows["unattributed"]["seconds_per_step"] == 1.5
    assert set(rows["unattributed"]["names"]) == {"jit_other:fusion.4", "-:some_kernel"}
    assert math.isclose(sum(r["share"] for r in rows.values()), 1.0)
    assert top[0]["op"] == "custom-call.3"


def test_nested_events_count_their_own_time_only():
    outer, inner = profile.OpTime("while.1", None, "while", 10.0), profile.OpTime("dot.2", None, "dot", 4.0)
    profile._exclusive([(0, 10_000_000_000, outer), (3_000_000_000, 7_000_000_000, inner)])  # ns
    assert (outer.seconds, inner.seconds) == (6.0, 4.0)


def test_traced_cpu_step_accounts_for_all_op_time():
    config = load_config("configs/clip.py")
    # depth 2: a CLIP tower's last block attends from one query (its pooled position), whose
    # scores XLA computes without a batched matmul; the first block has them.
    config.model = tiny_zoo_model("configs/clip.py", depth=2)
    config.batch_size = 16  # 8 simulated devices: a data-parallel step with an all-reduce
    rows, total, top = profile.profile(config, steps=1)
    by_category = {r["category"]: r for r in rows}
    assert [r["category"] for r in rows] == list(profile.CATEGORIES)
    assert math.isclose(sum(r["share"] for r in rows), 1.0)
    for category in ("matmul: MLP", "matmul: attention projections", "matmul: attention scores",
                     "normalisation", "optimizer"):
        assert by_category[category]["seconds_per_step"] > 0, category
    assert by_category["matmul: MLP"]["gflop_per_step"] > 0
    assert by_category["unattributed"]["share"] < 0.05, by_category["unattributed"]
    assert total["source"] == "host" and total["op_seconds_per_step"] > 0 and top
