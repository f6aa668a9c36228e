"""How attention's softmax(q kᵀ + mask) v is computed (config model.attention).

Every implementation computes the same function of the same parameters; they differ in kernels:

  einsum  explicit einsums, logits and softmax in f32, masked logits set to NEG_INF (mmjax's
          original code). Decoding steps always take it: their one query row is tiny, and
          the cache is stored heads-major, the layout its einsums read.
  xla     jax.nn.dot_product_attention(implementation="xla"): the same einsums as one jax op
          (logits in f32 as well), [batch, length, heads, head_dim] layout.
  cudnn   jax.nn.dot_product_attention(implementation="cudnn"): cuDNN's fused (flash)
          attention, which never materialises the L×L logits. It runs only on a GPU, on
          bfloat16/float16 activations, head_dim a multiple of 8 up to 128, and, with a mask
          (which cuDNN adds as a bias), even query and key lengths (its backward pass needs
          them). Chosen explicitly where it cannot run, it raises `cudnn_unsupported`'s reason
          instead of computing something else.
  auto    cudnn wherever it can run, else FALLBACK[backend] (measured: docs/benchmarks.md,
          "Attention implementations"; einsum where nothing was measured).

The queries arrive already scaled by 1/√head_dim (the einsum path's order of operations), so
the fused calls pass scale=1.0 and compute the same products.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.errors import ConfigError

ATTENTION_IMPLS = ("auto", "einsum", "xla", "cudnn")
NEG_INF = -1e9  # large, finite: a fully-masked row stays NaN-free
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
CUDNN_MAX_HEAD_DIM = 128  # Hopper allows 256, Ampere 128: the bound both accept
# auto's choice where cuDNN cannot run, per backend (jax.default_backend()). CPU: einsum's
# train steps were 2–12% faster than xla's (docs/benchmarks.md, "Attention implementations").
FALLBACK = {"cpu": "einsum"}


def cudnn_unsupported(q, k, mask) -> str | None:
    """Why cuDNN's fused attention cannot run on q [B, T, N, H], k [B, S, N, H] with `mask`
    on this backend; None when it can."""
    backend = jax.default_backend()
    if backend != "gpu":
        return f"cuDNN attention needs a GPU, the backend is {backend!r}"
    if not any(q.dtype == d for d in CUDNN_DTYPES):
        return f"cuDNN attention needs bfloat16 or float16 activations, got {q.dtype} (set --config.model.dtype=bfloat16)"
    head_dim = q.shape[-1]
    if head_dim % 8 or head_dim > CUDNN_MAX_HEAD_DIM:
        return f"cuDNN attention needs head_dim a multiple of 8 up to {CUDNN_MAX_HEAD_DIM}, got {head_dim}"
    if mask is not None and (q.shape[1] % 2 or k.shape[1] % 2):
        return f"cuDNN attention with a mask needs even query and key lengths, got {q.shape[1]} and {k.shape[1]}"
    return None


def resolve(impl: str, q, k, mask, decoding_step: bool) -> str:
    """The implementation ("einsum" | "xla" | "cudnn") that computes this call under option `impl`."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; valid: {list(ATTENTION_IMPLS)}")
    if impl == "cudnn":
        reason = "a decoding step reads the KV cache" if decoding_step else cudnn_unsupported(q, k, mask)
        if reason:
            raise ConfigError(f"model.attention='cudnn' cannot run here: {reason}; --config.model.attention=auto uses cuDNN only where it can")
        return impl
    if decoding_step:
        return "einsum"
    if impl != "auto":
        return impl
    return "cudnn" if cudnn_unsupported(q, k, mask) is None else FALLBACK.get(jax.default_backend(), "einsum")


def einsum_attention(q, k, v, mask, dtype, kv_layout: str = "bkhd"):
    """q [B, T, N, H] (scaled), k/v in `kv_layout` ("bkhd", or "bhkd" for the heads-major
    cache) -> [B, T, N, H]; logits and softmax in f32, weights cast back to `dtype`."""
    logits = jnp.einsum(f"bqhd,{kv_layout}->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = nn.with_logical_constraint(logits, ("act_batch", "act_heads", None, None))
    if mask is not None:
        logits = jnp.where(mask, logits, NEG_INF)
    weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
    return jnp.einsum(f"bhqk,{kv_layout}->bqhd", weights, v)


def fused_attention(q, k, v, mask, implementation: str):
    """q [B, T, N, H] (scaled), k/v [B, S, N, H] -> [B, T, N, H] by jax.nn.dot_product_attention.

    The logits never exist as an array here, so q, k, v carry the batch/heads sharding the
    einsum path puts on them. A mask broadcastable to [B, N, T, S] is widened to its full
    T and S (cuDNN adds it as a bias of that shape; the xla path broadcasts it anyway)."""
    q, k, v = (nn.with_logical_constraint(t, ("act_batch", None, "act_heads", None)) for t in (q, k, v))
    if mask is not None:
        mask = jnp.broadcast_to(mask, (*mask.shape[:-2], q.shape[1], k.shape[1]))
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=1.0, implementation=implementation)
