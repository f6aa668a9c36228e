"""Every contrastive implementation equals the dense reference, in value and gradient.

Small B and d (Pallas runs interpreted on CPU). B = 300 is a multiple of no tile size used,
so the padding masks are always exercised; logit_scale = log(100), the clamp, puts logits
at ±100 where a careless exp overflows.
"""
import contextlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mmjax.kernels import contrastive_blockwise, contrastive_pallas
from mmjax.objectives import contrastive

B, D = 300, 32
MAX_SCALE = np.log(100.0)
F32_RTOL = 1e-5
# bf16 inputs: the tiled engines round G = ∂ℓ/∂L to bf16 before the gradient matmuls (as
# autodiff of the dense loss rounds its cotangent), and tiles sum in another order.
BF16_RTOL = 1e-2


def embeddings(seed, n=B, d=D, dtype=jnp.float32):
    x = jax.random.normal(jax.random.key(seed), (2, n, d))
    x = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x[0].astype(dtype), x[1].astype(dtype)


def loss_and_grads(kind, impl, img, txt, t=MAX_SCALE, b=-10.0, **kw):
    """(loss, d_img, d_txt, d_scale[, d_bias]) under jit."""
    t, b = jnp.float32(t), jnp.float32(b)
    if kind == "clip":
        fn = lambda i, x, t: contrastive.clip_loss(i, x, t, impl=impl, **kw)
        args = (img, txt, t)
    else:
        fn = lambda i, x, t, b: contrastive.siglip_loss(i, x, t, b, impl=impl, **kw)
        args = (img, txt, t, b)
    loss, grads = jax.jit(jax.value_and_grad(fn, argnums=tuple(range(len(args)))))(*args)
    return (loss, *grads)


def assert_close(actual, expected, rtol):
    """Each output within rtol of the reference, relative to the reference's norm."""
    chex.assert_tree_all_finite(actual)
    for a, e in zip(actual, expected, strict=True):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        assert a.shape == e.shape
        err = np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-30)
        assert err <= rtol, f"relative error {err:.2e} > {rtol:.0e}"


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize(
    "impl, block_size",
    [("blockwise", 64), ("blockwise", 128), ("blockwise", 512), ("pallas", 64), ("pallas", 128)],
)
def test_f32_matches_dense(kind, impl, block_size):
    img, txt = embeddings(0)
    expected = loss_and_grads(kind, "dense", img, txt)
    actual = loss_and_grads(kind, impl, img, txt, block_size=block_size)
    assert_close(actual, expected, F32_RTOL)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("impl", ["blockwise", "pallas"])
def test_bf16_matches_dense(kind, impl):
    img, txt = embeddings(1, dtype=jnp.bfloat16)
    expected = loss_and_grads(kind, "dense", img, txt)
    actual = loss_and_grads(kind, impl, img, txt, block_size=128)
    assert [x.dtype for x in actual[1:3]] == [jnp.bfloat16] * 2
    assert_close(actual, expected, BF16_RTOL)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("impl", ["blockwise", "pallas"])
def test_extreme_logits_stay_finite(kind, impl):
    """Logits of exactly ±100: every row has one match, one opposite, and orthogonals."""
    basis = jnp.eye(64, D)
    img = jnp.concatenate([basis, basis, -basis])[:150]
    txt = jnp.concatenate([basis, -basis, basis])[:150]
    expected = loss_and_grads(kind, "dense", img, txt)
    actual = loss_and_grads(kind, impl, img, txt, block_size=64)
    assert_close(actual, expected, F32_RTOL)


def test_scale_grad_at_small_scale():
    """At t = 0 logits are cosines; checks dℓ/dt away from the clamp too."""
    img, txt = embeddings(2)
    for kind in ("clip", "siglip"):
        expected = loss_and_grads(kind, "dense", img, txt, t=0.0, b=0.5)
        actual = loss_and_grads(kind, "blockwise", img, txt, t=0.0, b=0.5, block_size=128)
        assert_close(actual, expected, F32_RTOL)


@pytest.mark.parametrize("n_img, n_txt", [(200, 300), (20, 7)])
def test_pallas_interpret_equals_blockwise(n_img, n_txt):
    """Engine level, rectangular (as the ring calls it), rows and columns both padded."""
    img = embeddings(3, n=n_img)[0]
    txt = embeddings(4, n=n_txt)[1]
    scale, bias, coef = jnp.float32(100.0), jnp.float32(-10.0), jnp.float32(0.01)
    kw = dict(block_size=64)
    row, col = contrastive_blockwise.clip_lse(img, txt, scale, **kw)
    outputs = {}
    for name, engine in (("blockwise", contrastive_blockwise), ("pallas", contrastive_pallas)):
        outputs[name] = (
            *engine.clip_lse(img, txt, scale, **kw),
            *engine.clip_grads(img, txt, scale, row, col, coef, **kw),
            engine.siglip_softplus_sum(img, txt, scale, bias, **kw),
            *engine.siglip_grads(img, txt, scale, bias, coef, **kw),
        )
    assert_close(outputs["pallas"], outputs["blockwise"], F32_RTOL)


def _mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("ring_tiles", ["blockwise", "pallas"])
def test_ring_on_8_devices_matches_dense(kind, ring_tiles):
    assert jax.device_count() == 8
    mesh = _mesh((8,), ("data",))
    img, txt = embeddings(5, n=8 * 40)
    expected = loss_and_grads(kind, "dense", img, txt)
    sharded = NamedSharding(mesh, P("data"))
    actual = loss_and_grads(
        kind, "ring", jax.device_put(img, sharded), jax.device_put(txt, sharded),
        block_size=32, mesh=mesh, axis_names=("data",), ring_tiles=ring_tiles,
    )
    assert_close(actual, expected, F32_RTOL)
    assert actual[1].sharding.spec == P("data")  # d_img stays where img lives


def test_ring_over_two_batch_axes_with_a_replicated_axis():
    """Ring over (data, fsdp) = 4 devices, replicated over `tensor`; via contrastive_loss."""
    mesh = _mesh((2, 2, 2), ("data", "fsdp", "tensor"))
    img, txt = embeddings(6, n=4 * 50)
    t, b = jnp.float32(MAX_SCALE), jnp.float32(-10.0)

    def grads(impl, **kw):
        fn = lambda i, x, t, b: contrastive.contrastive_loss("siglip", i, x, t, b, impl=impl, **kw)
        return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))(img, txt, t, b)

    expected = grads("dense")
    actual = grads("ring", block_size=64, mesh=mesh, axis_names=("data", "fsdp"))
    assert_close(jax.tree.leaves(actual), jax.tree.leaves(expected), F32_RTOL)


@pytest.mark.parametrize("impl", ["blockwise", "pallas"])
def test_memory_is_linear_in_batch(impl):
    """Compiled loss + grad temporaries at B = 8192 stay far below one B×B f32 array,
    which dense needs several of: autodiff through the tiles would keep them all."""
    n, d = 8192, 64
    x = jax.ShapeDtypeStruct((n, d), jnp.float32)
    t = jax.ShapeDtypeStruct((), jnp.float32)

    def temp_bytes(impl):
        fn = lambda i, x, t: contrastive.clip_loss(i, x, t, impl=impl, block_size=256)
        compiled = jax.jit(jax.grad(fn, argnums=(0, 1, 2))).lower(x, x, t).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    logits_bytes = n * n * 4
    assert temp_bytes("dense") >= logits_bytes
    assert temp_bytes(impl) < logits_bytes / 16


def test_errors_name_the_problem_and_the_fix():
    img, txt = embeddings(7, n=8)
    t = jnp.float32(0.0)
    with pytest.raises(ValueError, match=r"same \[batch, dim\].*one text per image"):
        contrastive.clip_loss(img, txt[:4], t)
    with pytest.raises(ValueError, match=r"float32 but txt_emb is bfloat16: cast both"):
        contrastive.clip_loss(img, txt.astype(jnp.bfloat16), t)
    with pytest.raises(ValueError, match=r"\[batch, dim\] array.*pool and project"):
        contrastive.clip_loss(img[None], txt[None], t)
    with pytest.raises(ValueError, match=r"logit_scale must be a scalar"):
        contrastive.clip_loss(img, txt, jnp.zeros((1,)))
    with pytest.raises(ValueError, match=r"logit_bias must be a scalar"):
        contrastive.siglip_loss(img, txt, t, None)
    with pytest.raises(ValueError, match=r"impl must be one of"):
        contrastive.clip_loss(img, txt, t, impl="flash")
    with pytest.raises(ValueError, match=r"needs the device mesh: pass mesh="):
        contrastive.clip_loss(img, txt, t, impl="ring")
    with pytest.raises(ValueError, match=r"must divide evenly.*multiple of 8"):
        contrastive.clip_loss(img[:6], txt[:6], t, impl="ring", mesh=_mesh((8,), ("data",)))
    with pytest.raises(ValueError, match=r"kind must be 'clip' or 'siglip'"):
        contrastive.contrastive_loss("infonce", img, txt, t)
    with pytest.raises(ValueError, match=r"clip has no logit_bias"):
        contrastive.contrastive_loss("clip", img, txt, t, t)


def _lowering_target(platform):
    """jax >= 0.11 lowers Triton for the GPU it sees; with none attached, name an H100."""
    if platform != "gpu":
        return contextlib.nullcontext()
    h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="gpu")
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100))


@pytest.mark.parametrize(
    "platform, custom_call", [("gpu", "__gpu$xla.gpu.triton"), ("tpu", "tpu_custom_call")]
)
def test_kernels_lower_for_gpu_and_tpu(platform, custom_call, monkeypatch):
    """CI has no accelerator: lowering for one checks the kernels against the Triton and
    Mosaic TPU lowering rules (block shapes, ops), which interpret mode does not."""
    monkeypatch.setattr(contrastive_pallas, "_backend", lambda: contrastive_pallas.backend_for(platform))
    x = jax.ShapeDtypeStruct((1000, 256), jnp.bfloat16)
    s = jax.ShapeDtypeStruct((), jnp.float32)
    for kind in ("clip", "siglip"):
        fn = lambda i, x, t, b: contrastive.contrastive_loss(
            kind, i, x, t, b if kind == "siglip" else None, impl="pallas", block_size=256
        )
        with _lowering_target(platform):
            traced = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3))).trace(x, x, s, s)
            hlo = traced.lower(lowering_platforms=("cuda" if platform == "gpu" else "tpu",)).as_text()
        assert hlo.count(custom_call) == 2  # the forward kernel and the backward kernel
