"""Attention implementations (config model.attention, mmjax.models.attention): each computes
what the "einsum" path computes, from the same parameters.

CPU, f32: "xla" runs the same products in the same order (the queries arrive scaled), so it
agrees with "einsum" to F32_TOL, layer by layer and through whole models, values and
gradients. GPU only (skipped elsewhere; conftest pins the CPU backend unless JAX_PLATFORMS
is set, so run `JAX_PLATFORMS=cuda python -m pytest tests/test_attention.py`): cuDNN's fused
attention in bf16 agrees with the einsum path in bf16 to BF16_TOL of the output's scale.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.configs import load_config
from mmjax.errors import ConfigError
from mmjax.models import attention, build_model, decoding, layers, model_numerics
from mmjax.parallel import sharding
from tests.helpers import tiny_zoo_model

# Both sides of every comparison compile alike; LLVM's optimisation is not worth its time here.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
F32_TOL = dict(rtol=1e-5, atol=1e-5)  # f32 rounding of the same sums, accumulated over a few layers
BF16_TOL = 2e-2  # of max|einsum output|: bf16 keeps 8 mantissa bits (ε ≈ 7.8e-3), a few roundings
ON_GPU = jax.default_backend() == "gpu"
gpu_only = pytest.mark.skipif(not ON_GPU, reason="cuDNN attention runs on a GPU only")
# On a GPU, f32 matmuls may run as TF32: the f32 comparisons are the CPU's.
cpu_only = pytest.mark.skipif(ON_GPU, reason="f32 comparisons at f32 tolerance: CPU")

B, T, S, WIDTH, HEADS = 3, 8, 6, 32, 2  # head_dim 16: a multiple of 8, as cuDNN needs
PAD = 0


def random_params(shapes, seed=0, scale=0.3):
    """Parameters drawn with numpy (no compile): LayerNorm scales 1 + scale·N(0, 1), the rest
    scale·N(0, 1), so that outputs depend on inputs more than at init."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        noise = scale * rng.standard_normal(leaf.shape).astype(np.float32)
        return jnp.asarray(noise + (1.0 if path[-1].key == "scale" else 0.0))

    return jax.tree_util.tree_map_with_path(draw, shapes)


def attention_io(dtype=jnp.float32):
    x = jax.random.normal(jax.random.key(0), (B, T, WIDTH), dtype)
    context = jax.random.normal(jax.random.key(1), (B, S, WIDTH), dtype)
    key_valid = jnp.arange(T)[None, :] < jnp.array([T, 5, 2])[:, None]  # padded rows
    masks = {
        "causal": jnp.tril(jnp.ones((T, T), bool))[None, None],
        "padding": key_valid[:, None, None, :],
        "causal_and_padding": jnp.tril(jnp.ones((T, T), bool))[None, None] & key_valid[:, None, None, :],
    }
    return x, context, masks


def attention_layer(impl, dtype=jnp.float32):
    """(layer, its random params) for `impl`; every impl gets the same parameters."""
    x, _, _ = attention_io()
    init = lambda: nn.unbox(layers.Attention(HEADS, dtype, impl="einsum").init(jax.random.key(0), x, x))["params"]
    return layers.Attention(HEADS, dtype, impl=impl), {"params": random_params(jax.eval_shape(init))}


def outputs_and_grads(layer, params, x, kv, mask):
    """The layer's output and the gradient of a nonlinear function of it w.r.t. params and x."""

    def loss(p, x, kv):
        out = layer.apply(p, x, kv, mask)
        return jnp.sum(jnp.sin(out.astype(jnp.float32))), out

    (_, out), grads = jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x, kv)
    return out, grads


def assert_trees_close(a, b, **tol):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), err_msg=str(path), **tol)


# --- CPU: xla == einsum in f32 ------------------------------------------------------------


@cpu_only
@pytest.mark.parametrize("mask_name", ["none", "causal", "padding", "causal_and_padding", "cross"])
def test_xla_equals_einsum_layer(mask_name):
    x, context, masks = attention_io()
    kv, mask = (context, None) if mask_name == "cross" else (x, masks.get(mask_name))
    results = [outputs_and_grads(*attention_layer(impl), x, kv, mask) for impl in ("einsum", "xla")]
    assert_trees_close(*results, **F32_TOL)


@cpu_only
def test_a_fully_masked_row_averages_the_values_in_both():
    """No key visible (a mask the models never build, but possible): both give the plain mean
    of the values rather than NaN."""
    x, _, _ = attention_io()
    nothing_visible = jnp.zeros((1, 1, T, T), bool)
    einsum, xla = (layer.apply(p, x, x, nothing_visible) for layer, p in map(attention_layer, ("einsum", "xla")))
    assert np.isfinite(einsum).all()
    np.testing.assert_allclose(einsum, xla, **F32_TOL)


@cpu_only
def test_xla_runs_sharded_over_a_mesh():
    """Batch over data × fsdp, heads over tensor (the fused path constrains q, k, v as the
    einsum path constrains its logits): the unsharded einsum output."""
    x, _, masks = attention_io()
    x, mask = jnp.concatenate([x, x[:1]]), jnp.concatenate([masks["causal_and_padding"]] * 2)[:4]
    (einsum, params), (xla, _) = attention_layer("einsum"), attention_layer("xla")
    expected = jit(einsum.apply)(params, x, x, mask)
    mesh_cfg = load_config("configs/coca.py").mesh
    mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor = 2, 2, 2
    mesh, rules = sharding.make_mesh(mesh_cfg), sharding.rules_from_config(mesh_cfg)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        sharded = jit(xla.apply, in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh), None, None))
        np.testing.assert_allclose(sharded(params, x, x, mask), expected, **F32_TOL)


def tiny_model(config_file, impl, dtype="float32"):
    model_cfg = tiny_zoo_model(config_file, depth=1)
    model_cfg.attention, model_cfg.dtype = impl, dtype
    contrastive = "siglip" if "siglip" in config_file else "clip"
    return build_model(model_cfg, 64, PAD, contrastive=contrastive)


MODEL_BATCH = dict(
    images=np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8),
    tokens=np.array([[1, 7, 9, 2, PAD, PAD, PAD], [1, 5, 3, 8, 6, 11, 2]], np.int32),  # one padded row
)


def model_params(model, seed=0):
    shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), *MODEL_BATCH.values()))["params"])
    return random_params(shapes, seed, scale=0.1)


def model_outputs_and_grads(model, params):
    def loss(p):
        out = model.apply({"params": p}, MODEL_BATCH["images"], MODEL_BATCH["tokens"])
        return sum(jnp.sum(jnp.sin(o)) for o in jax.tree.leaves(out)), out

    return jit(jax.value_and_grad(loss, has_aux=True))(params)


@cpu_only
@pytest.mark.parametrize("config_file", ["configs/clip.py", "configs/siglip.py", "configs/coca.py"])
def test_xla_equals_einsum_whole_model(config_file):
    """Every Attention of the model takes the option: ViT blocks, text towers, CoCa's poolers
    and decoder cross-attention, SigLIP's MAP head."""
    einsum, xla = (tiny_model(config_file, impl) for impl in ("einsum", "xla"))
    params = model_params(einsum)
    (_, out_einsum), grads_einsum = model_outputs_and_grads(einsum, params)
    (_, out_xla), grads_xla = model_outputs_and_grads(xla, params)
    assert_trees_close(out_einsum, out_xla, **F32_TOL)
    assert_trees_close(grads_einsum, grads_xla, **F32_TOL)


DECODE_IDS = dict(text_len=MODEL_BATCH["tokens"].shape[1] + 1, bos_id=1, eos_id=2, pad_id=PAD)


@functools.cache
def decoded(impl, use_cache):
    """Greedy captions of random image tokens by a tiny CoCa with random parameters (the
    same for every impl: rows differ and finish at different lengths)."""
    model = tiny_model("configs/coca.py", impl)
    shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), *MODEL_BATCH.values()))["params"])
    image_tokens = jax.random.normal(jax.random.key(5), (6, 8, 32))
    fn = lambda p, t: decoding.caption_from_image_tokens(model, p, t, use_cache=use_cache, **DECODE_IDS)
    return np.asarray(jit(fn)(random_params(shapes, seed=2), image_tokens))


@cpu_only
@pytest.mark.parametrize("impl", ["auto", "xla"])
def test_cached_decoding_equals_uncached(impl):
    """The prefill runs the chosen implementation, the steps the einsum path: still the same
    tokens as the uncached decoder's, and as the einsum model's."""
    cached = decoded(impl, True)
    np.testing.assert_array_equal(cached, decoded(impl, False))
    np.testing.assert_array_equal(cached, decoded("einsum", True))
    assert len({tuple(row) for row in cached}) > 1, cached  # rows differ: the test has teeth


# --- choosing an implementation -----------------------------------------------------------


def test_resolve_keeps_decoding_steps_on_einsum_and_rejects_unknown_names():
    x, _, masks = attention_io()
    q = k = x.reshape(B, T, HEADS, WIDTH // HEADS)
    for impl in ("auto", "einsum", "xla"):
        assert attention.resolve(impl, q, k, None, decoding_step=True) == "einsum"
    assert attention.resolve("xla", q, k, masks["causal"], decoding_step=False) == "xla"
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        attention.resolve("flash", q, k, None, decoding_step=False)
    model_cfg = tiny_zoo_model("configs/clip.py")
    model_cfg.attention = "flash"
    with pytest.raises(ValueError, match="unknown model.attention 'flash'"):
        model_numerics(model_cfg)


@pytest.mark.skipif(ON_GPU, reason="the CPU backend's choices")
def test_auto_on_cpu_takes_the_measured_fallback_and_cudnn_says_why_not():
    x, _, _ = attention_io()
    q = k = x.reshape(B, T, HEADS, WIDTH // HEADS)
    assert attention.resolve("auto", q, k, None, decoding_step=False) == attention.FALLBACK["cpu"]
    layer, params = attention_layer("cudnn")
    with pytest.raises(ConfigError, match="cuDNN attention needs a GPU, the backend is 'cpu'.*model.attention=auto"):
        layer.apply(params, x, x)


# --- GPU: cuDNN == einsum in bf16 ---------------------------------------------------------


def assert_bf16_close(actual, expected):
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    assert np.abs(actual - expected).max() <= BF16_TOL * np.abs(expected).max()


@gpu_only
@pytest.mark.parametrize("mask_name", ["none", "causal", "causal_and_padding", "cross"])
def test_cudnn_equals_einsum_in_bf16(mask_name):
    x, context, masks = attention_io(jnp.bfloat16)
    kv, mask = (context, None) if mask_name == "cross" else (x, masks.get(mask_name))
    (out_einsum, grads_einsum), (out_cudnn, grads_cudnn) = (
        outputs_and_grads(*attention_layer(impl, jnp.bfloat16), x, kv, mask) for impl in ("einsum", "cudnn")
    )
    assert_bf16_close(out_cudnn, out_einsum)
    for g_cudnn, g_einsum in zip(jax.tree.leaves(grads_cudnn), jax.tree.leaves(grads_einsum)):
        assert_bf16_close(g_cudnn, g_einsum)


@gpu_only
def test_auto_takes_cudnn_where_it_runs_and_cudnn_refuses_elsewhere():
    x, _, masks = attention_io(jnp.bfloat16)
    q = k = x.reshape(B, T, HEADS, WIDTH // HEADS)
    assert attention.resolve("auto", q, k, masks["causal"], decoding_step=False) == "cudnn"
    odd = q[:, :-1]  # a mask with an odd length: cuDNN's backward cannot take it
    assert attention.resolve("auto", odd, odd, masks["causal"][..., :-1, :-1], decoding_step=False) == "einsum"
    with pytest.raises(ConfigError, match="even query and key lengths"):
        attention.resolve("cudnn", odd, odd, masks["causal"][..., :-1, :-1], decoding_step=False)
    with pytest.raises(ConfigError, match="bfloat16 or float16"):
        attention.resolve("cudnn", q.astype(jnp.float32), k.astype(jnp.float32), None, decoding_step=False)
    with pytest.raises(ConfigError, match="decoding step"):
        attention.resolve("cudnn", q, k, None, decoding_step=True)


@gpu_only
@pytest.mark.parametrize("config_file", ["configs/clip.py", "configs/coca.py"])
def test_auto_equals_einsum_whole_model_in_bf16(config_file):
    """auto: cuDNN wherever it can run (the ViT, poolers, CoCa's decoder; not CLIP's causal
    text tower of odd length), einsum elsewhere."""
    einsum, auto = (tiny_model(config_file, impl, "bfloat16") for impl in ("einsum", "auto"))
    params = model_params(einsum)
    apply = lambda model: jit(model.apply)({"params": params}, *MODEL_BATCH.values())
    for a, e in zip(jax.tree.leaves(apply(auto)), jax.tree.leaves(apply(einsum))):
        assert_bf16_close(a, e)
