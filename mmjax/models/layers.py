"""Transformer building blocks shared by every tower (ViT, text decoders, poolers).

Every parameter is created with logical axis names (`embed`, `mlp`, `heads`, `kv`, `vocab`, ...);
`mmjax.parallel.sharding` maps them to mesh axes with the config's rules table. Activations
are constrained with `act_*` names so parameters and activations can be sharded differently
(FSDP shards parameters on `embed`, never the activations' feature axis).

Decoding cache (flax collection "cache"; `mmjax.models.decoding` drives it), for modules
built with `kv_cache=True` (the text decoders). Applied with `mutable=["cache"]`, an
ordinary forward pass is a *prefill*: every such `Attention` stores the
keys/values it projected (self-attention: one per input position, so the cache is as long
as the input; cross-attention: the context's, once). A *step* passes `cache_index` (a traced
int32 scalar) down Transformer -> Block -> Attention with a [B, 1] input: self-attention
writes this position's key/value at `cache_index` and attends to positions <= cache_index
(and'ed with the caller's mask); cross-attention called with `kv=None` reuses its cached
keys/values. Parameters are the same in every mode; `model.init` never creates a cache.

Numerics (`Numerics`, config.model.layernorm_eps, .mlp_activation and .attention): the
LayerNorm ε and the MLP activation of every block, pooler and final norm, and how every
Attention is computed (mmjax.models.attention). They change no parameter, only what the same
parameters compute (the attention implementation not even that, up to rounding); the defaults
are flax's and big_vision's (ε 1e-6, tanh-GELU), open_clip's CLIP uses torch's (ε 1e-5, exact
GELU; QuickGELU for OpenAI's weights).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import attention
from mmjax.models.attention import ATTENTION_IMPLS

Dtype = Any


def param_init(init, names: Sequence[str | None]):
    """An initializer whose parameter carries logical axis names."""
    return nn.with_logical_partitioning(init, tuple(names))


def caching(module: nn.Module) -> bool:
    """Whether this call should store a decoding cache: "cache" is mutable (apply(...,
    mutable=["cache"])) and we are not initialising parameters."""
    return module.is_mutable_collection("cache") and not module.is_initializing()


def constrain(x, names: Sequence[str | None]):
    """Shard an activation by logical names (a no-op outside a mesh/rules context)."""
    return nn.with_logical_constraint(x, tuple(names))


def quick_gelu(x):
    """OpenAI CLIP's GELU approximation x·σ(1.702x) (open_clip's QuickGELU)."""
    return x * jax.nn.sigmoid(1.702 * x)


def gelu(x):
    """Exact GELU x·Φ(x) = x·(1 + erf(x/√2))/2, torch's nn.GELU formula. jax.nn.gelu's exact
    form goes through erfc, which XLA's CPU backend evaluates with an exponential and a
    division: ~15% slower forward and backward (docs/benchmarks.md, "mmjax vs open_clip")."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.sqrt(0.5).astype(x.dtype)))


# config.model.mlp_activation -> the MLP's nonlinearity.
ACTIVATION_FUNCTIONS = {
    "gelu": gelu,  # exact x·Φ(x) (erf): torch nn.GELU
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),  # tanh approximation: flax nn.gelu, big_vision
    "quick_gelu": quick_gelu,  # x·σ(1.702x): OpenAI CLIP
}
ACTIVATIONS = tuple(ACTIVATION_FUNCTIONS)


@dataclasses.dataclass(frozen=True)
class Numerics:
    """How every block computes, without changing its parameters (so a checkpoint from
    another codebase can be reproduced, or run faster): every LayerNorm's ε, every MLP's
    activation and every Attention's implementation. Defaults: mmjax's own (flax/big_vision)
    numerics, and the fastest exact attention for the backend."""

    layernorm_eps: float = 1e-6
    mlp_activation: str = "gelu_tanh"  # one of ACTIVATIONS
    attention: str = "auto"  # one of ATTENTION_IMPLS

    def __post_init__(self):
        if self.mlp_activation not in ACTIVATION_FUNCTIONS:
            raise ValueError(f"unknown mlp_activation {self.mlp_activation!r}; valid: {list(ACTIVATIONS)}")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention {self.attention!r}; valid: {list(ATTENTION_IMPLS)}")
        if not self.layernorm_eps > 0:
            raise ValueError(f"layernorm_eps must be above 0, got {self.layernorm_eps}")

    def layer_norm(self, dtype, name: str) -> "LayerNorm":
        return LayerNorm(dtype, self.layernorm_eps, name=name)

    def mlp(self, mlp_dim: int, dtype, name: str) -> "Mlp":
        return Mlp(mlp_dim, dtype, self.mlp_activation, name=name)


class LayerNorm(nn.Module):
    """Pre-LN normalisation, computed in f32 whatever the activation dtype."""

    dtype: Dtype = jnp.float32
    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm(
            epsilon=self.epsilon,
            dtype=jnp.float32,
            scale_init=param_init(nn.initializers.ones, ("embed",)),
            bias_init=param_init(nn.initializers.zeros, ("embed",)),
        )(x.astype(jnp.float32))
        return y.astype(self.dtype)


class Attention(nn.Module):
    """Multi-head dot-product attention: softmax(q kᵀ / √d_head + mask) v, softmax in f32.

    `kv` is the sequence attended to: `x` itself for self-attention, image tokens for
    cross-attention. `mask` is boolean, 4-D, broadcastable to [batch, heads, q_len, kv_len].
    `impl` (one of ATTENTION_IMPLS) picks the kernels: see mmjax.models.attention.

    Decoding cache (see the module docstring), variables "cache"/"key" and "cache"/"value",
    [batch, heads, kv_len, head_dim]:
      * cache_index=None, kv given: ordinary attention; with kv_cache=True and under
        `caching`, also store k, v (a prefill).
      * cache_index=None, kv=None: attend to the cached k, v (cross-attention steps).
      * cache_index given (self-attention step, x = kv of one position): write this
        position's k, v at cache_index and attend to cached positions <= cache_index.
    """

    num_heads: int
    dtype: Dtype = jnp.float32
    kv_cache: bool = False  # a prefill stores k, v (only decoders need them)
    impl: str = "auto"  # one of ATTENTION_IMPLS

    @nn.compact
    def __call__(self, x, kv, mask=None, cache_index=None):
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
        head_dim = width // self.num_heads

        def param(name, shape, names, init):
            return self.param(name, param_init(init, names), shape).astype(self.dtype)

        xavier = nn.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2))

        def project(name, inputs):  # x W + b with W: [width_in, heads, head_dim]
            w = param(f"{name}_kernel", (inputs.shape[-1], self.num_heads, head_dim), ("embed", "heads", "kv"), xavier)
            b = param(f"{name}_bias", (self.num_heads, head_dim), ("heads", "kv"), nn.initializers.zeros)
            return token_matmul(inputs.astype(self.dtype), w) + b

        def cached(name):
            value = self.get_variable("cache", name)
            if value is None:
                raise ValueError(f"{self.name}: no cached {name}; prefill the cache (apply with mutable=['cache'])")
            return value

        q = project("query", x) / jnp.sqrt(head_dim).astype(self.dtype)
        # Cached keys/values are stored heads-major, [batch, heads, kv_len, head_dim]: the
        # layout the attention matmuls read, so a step does not transpose the whole cache.
        heads_major = lambda t: jnp.swapaxes(t, 1, 2)
        reads_cache = cache_index is not None or kv is None  # a decoding step: k, v heads-major
        if cache_index is not None:  # one decoding step: append this position, attend to the prefix
            k, v = cached("key"), cached("value")
            start = (0, 0, cache_index, 0)
            k = jax.lax.dynamic_update_slice(k, heads_major(project("key", kv)).astype(k.dtype), start)
            v = jax.lax.dynamic_update_slice(v, heads_major(project("value", kv)).astype(v.dtype), start)
            self.put_variable("cache", "key", k)
            self.put_variable("cache", "value", v)
            causal = (jnp.arange(k.shape[2]) <= cache_index)[None, None, None, :]
            mask = causal if mask is None else mask & causal
        elif kv is None:  # attend to keys/values an earlier call cached (cross-attention steps)
            k, v = cached("key"), cached("value")
        else:
            k = project("key", kv)
            v = project("value", kv)
            if self.kv_cache and caching(self):
                self.put_variable("cache", "key", heads_major(k))
                self.put_variable("cache", "value", heads_major(v))
        impl = attention.resolve(self.impl, q, k, mask, decoding_step=reads_cache)
        if impl == "einsum":
            out = attention.einsum_attention(q, k, v, mask, self.dtype, "bhkd" if reads_cache else "bkhd")
        else:
            out = attention.fused_attention(q, k, v, mask, impl)
        w_out = param(
            "out_kernel",
            (self.num_heads, head_dim, width),
            ("heads", "kv", "embed"),
            nn.initializers.xavier_uniform(in_axis=(0, 1), out_axis=2),
        )
        b_out = param("out_bias", (width,), ("embed",), nn.initializers.zeros)
        out = out.reshape(*out.shape[:-2], width)  # heads side by side, the layout w_out's rows have
        return token_matmul(out, w_out.reshape(width, width)) + b_out


def token_matmul(x, w):
    """x [..., d] · w [d, *out] -> [..., *out] as ONE [tokens, d] × [d, prod(out)] matmul.

    The same contraction written over [batch, length, d] (an einsum, or nn.Dense on 3-D
    input) made XLA:CPU's step ~9% slower on the default CoCa (its gradients go through
    extra transposes; docs/benchmarks.md, "Token-major matmuls"). On GPU/TPU the reshapes
    are free."""
    lead, out = x.shape[:-1], w.shape[1:]
    y = x.reshape(-1, x.shape[-1]) @ w.reshape(w.shape[0], -1)
    return y.reshape(*lead, *out)


class Dense(nn.Dense):
    """nn.Dense (same parameters, same names) computed as one token-major matmul (token_matmul)."""

    def __call__(self, inputs):
        lead = inputs.shape[:-1]
        return super().__call__(inputs.reshape(-1, inputs.shape[-1])).reshape(*lead, self.features)


class Mlp(nn.Module):
    """Position-wise feed-forward: W2 · act(W1 x), act one of ACTIVATIONS (default tanh-GELU)."""

    mlp_dim: int
    dtype: Dtype = jnp.float32
    activation: str = "gelu_tanh"

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        h = Dense(
            self.mlp_dim,
            dtype=self.dtype,
            kernel_init=param_init(nn.initializers.xavier_uniform(), ("embed", "mlp")),
            bias_init=param_init(nn.initializers.normal(1e-6), ("mlp",)),
            name="fc1",
        )(x)
        if self.activation not in ACTIVATION_FUNCTIONS:
            raise ValueError(f"unknown activation {self.activation!r}; valid: {list(ACTIVATIONS)}")
        h = constrain(ACTIVATION_FUNCTIONS[self.activation](h), ("act_batch", "act_length", "act_mlp"))
        return Dense(
            width,
            dtype=self.dtype,
            kernel_init=param_init(nn.initializers.xavier_uniform(), ("mlp", "embed")),
            bias_init=param_init(nn.initializers.normal(1e-6), ("embed",)),
            name="fc2",
        )(h)


# Where a decoder layer's cross-attention sits (Block.cross_layout).
CROSS_LAYOUTS = ("paper", "open_clip")


class Block(nn.Module):
    """Pre-LN transformer block: x += Attn(LN x); [x += CrossAttn(LN x, ctx)]; x += MLP(LN x).

    cross_layout="open_clip" (open_clip's CoCa decoder layer, two blocks in one): a whole
    self-attention block, then a whole cross-attention block that also normalises the context:
      x += Attn(LN x); x += MLP(LN x); x += CrossAttn(LN x, LN ctx); x += MLP'(LN x).

    Decoding: `cache_index` goes to the self-attention; `context=None` makes the
    cross-attention use its cached keys/values (see Attention).

    query_index (int [B]): the block's output only at that one position of each sequence,
    [B, 1, width]. Exact: everything but attention's keys and values is position-wise, so
    keys and values come from every position and the rest only from the chosen one. The
    last block of a tower pooled at one token (CLIP's [CLS] and EOT) skips the other
    positions' queries, output projection and MLP: most of the block.
    """

    num_heads: int
    mlp_dim: int
    cross_attention: bool = False
    dtype: Dtype = jnp.float32
    kv_cache: bool = False
    numerics: Numerics = Numerics()
    cross_layout: str = "paper"  # one of CROSS_LAYOUTS

    @nn.compact
    def __call__(self, x, mask=None, context=None, cache_index=None, query_index=None):
        x = constrain(x, ("act_batch", "act_length", "act_embed"))
        norm = lambda name, y: self.numerics.layer_norm(self.dtype, name)(y)
        attend = lambda name: Attention(self.num_heads, self.dtype, self.kv_cache, self.numerics.attention, name=name)
        h = norm("ln_attn", x)
        queries = h
        if query_index is not None:
            if cache_index is not None:
                raise ValueError("query_index and cache_index are exclusive: a decoding step has one position already")
            x, queries = take_positions(x, query_index), take_positions(h, query_index)
            if mask is not None:  # the chosen query rows of a [B|1, H|1, L, S] mask
                mask = jnp.broadcast_to(mask, (h.shape[0], *mask.shape[1:-2], h.shape[1], mask.shape[-1]))
                mask = jnp.take_along_axis(mask, query_index[:, None, None, None], axis=2)
        x = x + attend("attn")(queries, h, mask, cache_index)
        if self.cross_attention and self.cross_layout == "open_clip":
            x = x + self.numerics.mlp(self.mlp_dim, self.dtype, "mlp")(norm("ln_mlp", x))
            context = None if context is None else norm("ln_context", context)  # None: cached keys/values
            x = x + attend("cross_attn")(norm("ln_cross", x), context)
            return x + self.numerics.mlp(self.mlp_dim, self.dtype, "cross_mlp")(norm("ln_cross_mlp", x))
        if self.cross_attention:
            x = x + attend("cross_attn")(norm("ln_cross", x), context)
        return x + self.numerics.mlp(self.mlp_dim, self.dtype, "mlp")(norm("ln_mlp", x))


def take_positions(x, index):
    """x [B, L, ...], index int [B] -> x[b, index[b]] as [B, 1, ...]."""
    index = index.reshape(-1, *([1] * (x.ndim - 1)))
    return jnp.take_along_axis(x, index, axis=1)


# Rematerialisation per block: which intermediates the backward pass may keep instead of
# recomputing. "dots" keeps the weight matmuls' outputs (no batch dims: not the L×L scores).
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
REMAT_CHOICES = ("none", *REMAT_POLICIES)
# model.remat="auto": the trainer compiles with REMAT_CHOICES in turn and keeps the least
# rematerialisation that fits the device (mmjax.remat_auto). A model built anywhere else
# (evaluation, prediction, summaries) runs forward only, where remat changes nothing: "none".
REMAT_AUTO = "auto"
SCANNED_BLOCKS = "blocks"  # the scanned stack's parameter name


class Transformer(nn.Module):
    """A stack of `depth` identical blocks.

    remat: "none" | "full" | "dots" (REMAT_POLICIES), applied to each block.
    scan: one `nn.scan` over the blocks, so compile time does not grow with depth; the
      parameters are stacked on a leading `layers` axis under "blocks" instead of living
      under "block0".."block{depth-1}" (`mmjax.models.scan_layout` converts between the two).
      A decoding cache is stacked the same way: its leaves under "blocks" have a leading
      layers axis.
    kv_cache: the blocks keep a decoding cache (see the module docstring); `cache_index`: a
      decoding step (see Attention); None: an ordinary (or prefill) pass.
    numerics: every block's LayerNorm ε, MLP activation and attention implementation (see Numerics).
    cross_layout: where a cross-attending block's cross-attention sits (see Block).
    query_index (int [B]): the output only at that position of each sequence, [B, 1, width];
      the last block computes only that position (see Block). A scanned stack runs its first
      depth - 1 blocks as a scan over its stacked parameters' first depth - 1 entries, then
      the last entry as one block: the same parameters, stacked as init made them.
    """

    depth: int
    num_heads: int
    mlp_dim: int
    cross_attention: bool = False
    dtype: Dtype = jnp.float32
    remat: str = "none"
    scan: bool = False
    kv_cache: bool = False
    numerics: Numerics = Numerics()
    cross_layout: str = "paper"

    @nn.compact
    def __call__(self, x, mask=None, context=None, cache_index=None, query_index=None):
        if self.remat not in REMAT_CHOICES:
            raise ValueError(f"unknown remat policy {self.remat!r}; valid: {list(REMAT_CHOICES)}")
        if self.cross_layout not in CROSS_LAYOUTS:
            raise ValueError(f"unknown cross_layout {self.cross_layout!r}; valid: {list(CROSS_LAYOUTS)}")
        block = Block
        if self.remat != "none":
            # Under scan, CSE across iterations cannot happen: no need for its barrier.
            block = nn.remat(block, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan)
        make = lambda name: block(*self._block_fields(), name=name)
        if not self.scan:
            for i in range(self.depth):
                last = i == self.depth - 1
                x = make(f"block{i}")(x, mask, context, cache_index, query_index if last else None)
            return x
        # init and a prefill need every block's variables made, as below
        if query_index is not None and not (self.is_initializing() or self.kv_cache):
            return self._scan_then_one_position(x, mask, context, query_index)
        stack = nn.scan(
            lambda blk, carry, mask, context, cache_index: (blk(carry, mask, context, cache_index), None),
            variable_axes={"params": 0, "cache": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
            length=self.depth,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = stack(make(SCANNED_BLOCKS), x, mask, context, cache_index)
        return x if query_index is None else take_positions(x, query_index)

    def _block_fields(self):
        """Block's fields, in order, for every block of this stack."""
        return (self.num_heads, self.mlp_dim, self.cross_attention, self.dtype, self.kv_cache, self.numerics,
                self.cross_layout)

    def _scan_then_one_position(self, x, mask, context, query_index):
        """A scanned stack's output at query_index: nn.scan runs every block the same way, so the
        blocks are applied here as a pure function of slices of the stacked parameters."""
        block = Block(*self._block_fields(), parent=None)  # parent=None: a function of its parameters, not a child
        stacked = nn.unbox(self.variables["params"][SCANNED_BLOCKS])

        def apply(params, x, query_index=None):
            return block.apply({"params": params}, x, mask, context, query_index=query_index)

        if self.remat != "none":  # each block, the last one included, as nn.remat would
            apply = jax.checkpoint(apply, policy=REMAT_POLICIES[self.remat])
        x, _ = jax.lax.scan(lambda carry, params: (apply(params, carry), None), x,
                            jax.tree.map(lambda p: p[:-1], stacked))
        return apply(jax.tree.map(lambda p: p[-1], stacked), x, query_index)


def dense(features: int, names: Sequence[str | None], dtype, name: str, use_bias: bool = True):
    """A Dense layer whose kernel carries `names` (input axis, output axis)."""
    return Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        kernel_init=param_init(nn.initializers.xavier_uniform(), names),
        bias_init=param_init(nn.initializers.zeros, names[-1:]),
        name=name,
    )


def l2_normalize(x, eps: float = 1e-6):
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)
