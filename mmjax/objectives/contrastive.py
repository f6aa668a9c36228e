"""Contrastive image–text losses: CLIP's softmax InfoNCE and SigLIP's pairwise sigmoid.

    clip_loss    = ½·[CE(L, diag) + CE(Lᵀ, diag)],   L = exp(t)·img·txtᵀ
                 = (Σ_i LSE_j L_ij + Σ_j LSE_i L_ij) / 2B − Σ_i L_ii / B
    siglip_loss  = −Σ_ij log σ(y_ij·(exp(t)·⟨img_i, txt_j⟩ + b)) / B,   y = 2·I − 1

Embeddings are [B, d] and already L2-normalised; t (`logit_scale`, clamped by the caller)
and b (`logit_bias`) are scalars.

Implementations (`impl=`), all equal to "dense" in value and gradient:
  "dense"      the B×B logits in one piece; the reference.
  "blockwise"  pure JAX, tile by tile; a `jax.custom_vjp` keeps only O(B) log-sum-exps
               and recomputes each tile in the backward (`mmjax.kernels.contrastive_blockwise`).
  "pallas"     the same algorithm as Pallas kernels (`mmjax.kernels.contrastive_pallas`);
               interpreted on CPU.
  "ring"       embeddings sharded over the mesh's batch axes `axis_names`: image rows stay
               on their device, text blocks travel a ring (`mmjax.kernels.contrastive_ring`);
               the tile math inside is `ring_tiles` ("blockwise" or "pallas"). Call it
               inside or outside `jax.jit` on global arrays; pass `mesh=`.
`block_size` is the tile edge (default: the engine's). "dense", "blockwise" and "pallas"
see the embeddings as whole arrays and ignore `mesh`: given sharded embeddings under jit,
XLA gathers them onto every device, so sharded training should use "ring".

The trainer calls `contrastive_loss(kind, ...)` with impl/block_size from its config, its
mesh, and the mesh's batch axes as `axis_names`.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mmjax.kernels import contrastive_blockwise, contrastive_pallas
from mmjax.kernels.contrastive_ring import Ring

IMPLS = ("dense", "blockwise", "pallas", "ring")
KINDS = ("clip", "siglip")  # contrastive_loss's `kind`
_ENGINES = {"blockwise": contrastive_blockwise, "pallas": contrastive_pallas}


# ----------------------------------------------------------------------------- public API


def contrastive_loss(
    kind,
    img_emb,
    txt_emb,
    logit_scale,
    logit_bias=None,
    *,
    impl="dense",
    block_size=None,
    mesh=None,
    axis_names=("data",),
    ring_tiles="blockwise",
):
    """The trainer's single entry: kind is "clip" or "siglip" (which needs logit_bias)."""
    if kind == "clip":
        if logit_bias is not None:
            raise ValueError("clip has no logit_bias: pass logit_bias=None, or use kind='siglip'.")
        return clip_loss(
            img_emb, txt_emb, logit_scale, impl=impl, block_size=block_size,
            mesh=mesh, axis_names=axis_names, ring_tiles=ring_tiles,
        )
    if kind == "siglip":
        return siglip_loss(
            img_emb, txt_emb, logit_scale, logit_bias, impl=impl, block_size=block_size,
            mesh=mesh, axis_names=axis_names, ring_tiles=ring_tiles,
        )
    raise ValueError(f"kind must be 'clip' or 'siglip', got {kind!r}.")


def clip_loss(
    img_emb,
    txt_emb,
    logit_scale,
    *,
    impl="dense",
    block_size=None,
    mesh=None,
    axis_names=("data",),
    ring_tiles="blockwise",
):
    """Symmetric InfoNCE: mean of the image→text and text→image cross-entropies."""
    _check_embeddings(img_emb, txt_emb)
    _check_scalar("logit_scale", logit_scale)
    if impl == "dense":
        return _clip_dense(img_emb, txt_emb, logit_scale)
    plan = _plan(impl, block_size, mesh, axis_names, ring_tiles, img_emb.shape[0])
    return _clip(plan, img_emb, txt_emb, logit_scale)


def siglip_loss(
    img_emb,
    txt_emb,
    logit_scale,
    logit_bias,
    *,
    impl="dense",
    block_size=None,
    mesh=None,
    axis_names=("data",),
    ring_tiles="blockwise",
):
    """Pairwise sigmoid loss summed over all B² pairs, divided by B."""
    _check_embeddings(img_emb, txt_emb)
    _check_scalar("logit_scale", logit_scale)
    _check_scalar("logit_bias", logit_bias)
    if impl == "dense":
        return _siglip_dense(img_emb, txt_emb, logit_scale, logit_bias)
    plan = _plan(impl, block_size, mesh, axis_names, ring_tiles, img_emb.shape[0])
    return _siglip(plan, img_emb, txt_emb, logit_scale, logit_bias)


# ------------------------------------------------------------------------------- checks


def _check_embeddings(img, txt):
    for name, x in (("img_emb", img), ("txt_emb", txt)):
        if getattr(x, "ndim", None) != 2:
            raise ValueError(
                f"{name} must be a [batch, dim] array, got shape {getattr(x, 'shape', None)}: "
                "pool and project the tower outputs to one embedding per example first."
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be floating point, got {x.dtype}: cast it first.")
    if img.shape != txt.shape:
        raise ValueError(
            f"img_emb {img.shape} and txt_emb {txt.shape} must have the same [batch, dim]: "
            "one text per image, both projected to the same embedding width."
        )
    if img.dtype != txt.dtype:
        raise ValueError(
            f"img_emb is {img.dtype} but txt_emb is {txt.dtype}: cast both to one dtype "
            "(e.g. both to bfloat16 or both to float32) before the loss."
        )


def _check_scalar(name, x):
    if x is None or jnp.ndim(x) != 0:
        raise ValueError(
            f"{name} must be a scalar (shape ()), got {None if x is None else jnp.shape(x)}: "
            "pass the learned parameter itself, e.g. params['logit_scale'] with shape ()."
        )


# -------------------------------------------------------------------------------- dense


def _logits(img, txt, logit_scale):
    dots = jnp.dot(img, txt.T, preferred_element_type=jnp.float32)
    return jnp.exp(logit_scale.astype(jnp.float32)) * dots


def _clip_dense(img, txt, logit_scale):
    logits = _logits(img, txt, logit_scale)
    img_to_txt = jnp.diagonal(jax.nn.log_softmax(logits, axis=1))
    txt_to_img = jnp.diagonal(jax.nn.log_softmax(logits, axis=0))
    return -(jnp.mean(img_to_txt) + jnp.mean(txt_to_img)) / 2


def _siglip_dense(img, txt, logit_scale, logit_bias):
    z = _logits(img, txt, logit_scale) + logit_bias.astype(jnp.float32)
    labels = 2 * jnp.eye(img.shape[0]) - 1
    return -jnp.sum(jax.nn.log_sigmoid(labels * z)) / img.shape[0]


# --------------------------------------------------------------- tiled: plan and assembly


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static choices of a tiled loss: which engine, tile edge, and the ring (if any)."""

    engine: object
    block_size: int
    mesh: object = None
    axis_names: tuple = ()
    ring_size: int = 1

    def run(self, fn, args, in_specs, out_specs):
        """fn on whole arrays, or per device under shard_map; a spec is "B" for arrays
        split over the batch axes, "" for replicated ones."""
        if self.mesh is None:
            return fn(*args)
        batch = P(self.axis_names)
        spec = lambda s: batch if s == "B" else P()
        return jax.shard_map(
            fn,
            mesh=self.mesh,
            in_specs=tuple(spec(s) for s in in_specs),
            out_specs=jax.tree.map(spec, out_specs),
            check_vma=False,
        )(*args)

    def psum(self, x):
        return jax.lax.psum(x, self.axis_names) if self.mesh is not None else x


def _plan(impl, block_size, mesh, axis_names, ring_tiles, batch):
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}.")
    inner = ring_tiles if impl == "ring" else impl
    if inner not in _ENGINES:
        raise ValueError(f"ring_tiles must be one of {tuple(_ENGINES)}, got {inner!r}.")
    engine = _ENGINES[inner]
    block_size = block_size or engine.DEFAULT_BLOCK_SIZE
    if impl != "ring":
        return _Plan(engine, block_size)
    if mesh is None:
        raise ValueError("impl='ring' needs the device mesh: pass mesh=<the jax.sharding.Mesh>.")
    axis_names = tuple(axis_names)
    unknown = [a for a in axis_names if a not in mesh.shape]
    if unknown:
        raise ValueError(f"axis_names {unknown} are not mesh axes {tuple(mesh.shape)}.")
    ring_size = 1
    for a in axis_names:
        ring_size *= mesh.shape[a]
    if batch % ring_size:
        raise ValueError(
            f"batch {batch} must divide evenly over the {ring_size} devices of axes "
            f"{axis_names}: pick a global batch that is a multiple of {ring_size}."
        )
    return _Plan(Ring(engine, axis_names, ring_size), block_size, mesh, axis_names, ring_size)


def _diagonal_dots(img, txt):
    """Σ_i ⟨img_i, txt_i⟩ in f32: the positives, O(B·d)."""
    return jnp.sum(img.astype(jnp.float32) * txt.astype(jnp.float32))


def _with_diagonal(plan, img, txt, logit_scale, scale, d_img, d_txt, diag_coef):
    """Add the −δ_ij·diag_coef part of ∂ℓ/∂L to the all-pairs gradients, and get dℓ/dt.

    dℓ/dt = Σ_ij ∂ℓ/∂L_ij·L_ij = Σ_i ⟨img_i, d_img_i⟩, since d_img = s·(∂ℓ/∂L)·txt.
    """
    d_img = d_img - diag_coef * scale * txt.astype(jnp.float32)
    d_txt = d_txt - diag_coef * scale * img.astype(jnp.float32)
    d_t = plan.psum(jnp.sum(img.astype(jnp.float32) * d_img))
    return d_img.astype(img.dtype), d_txt.astype(txt.dtype), d_t.astype(logit_scale.dtype)


# ----------------------------------------------------------------------------- CLIP, tiled


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _clip(plan, img, txt, logit_scale):
    return _clip_fwd(plan, img, txt, logit_scale)[0]


def _clip_fwd(plan, img, txt, logit_scale):
    def forward(img, txt, logit_scale):
        scale = jnp.exp(logit_scale.astype(jnp.float32))
        row_lse, col_lse = plan.engine.clip_lse(img, txt, scale, block_size=plan.block_size)
        n = img.shape[0] * plan.ring_size
        lse_sum = plan.psum(jnp.sum(row_lse) + jnp.sum(col_lse))
        loss = lse_sum / (2 * n) - scale * plan.psum(_diagonal_dots(img, txt)) / n
        return loss, row_lse, col_lse

    loss, row_lse, col_lse = plan.run(
        forward, (img, txt, logit_scale), ("B", "B", ""), ("", "B", "B")
    )
    return loss, (img, txt, logit_scale, row_lse, col_lse)


def _clip_bwd(plan, residuals, g):
    def backward(img, txt, logit_scale, row_lse, col_lse, g):
        scale = jnp.exp(logit_scale.astype(jnp.float32))
        n = img.shape[0] * plan.ring_size
        d_img, d_txt = plan.engine.clip_grads(
            img, txt, scale, row_lse, col_lse, g / (2 * n), block_size=plan.block_size
        )
        return _with_diagonal(plan, img, txt, logit_scale, scale, d_img, d_txt, g / n)

    return plan.run(backward, (*residuals, g), ("B", "B", "", "B", "B", ""), ("B", "B", ""))


_clip.defvjp(_clip_fwd, _clip_bwd)


# --------------------------------------------------------------------------- SigLIP, tiled


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _siglip(plan, img, txt, logit_scale, logit_bias):
    return _siglip_fwd(plan, img, txt, logit_scale, logit_bias)[0]


def _siglip_fwd(plan, img, txt, logit_scale, logit_bias):
    def forward(img, txt, logit_scale, logit_bias):
        scale = jnp.exp(logit_scale.astype(jnp.float32))
        bias = logit_bias.astype(jnp.float32)
        pairs = plan.engine.siglip_softplus_sum(
            img, txt, scale, bias, block_size=plan.block_size
        )
        n = img.shape[0] * plan.ring_size
        positives = scale * plan.psum(_diagonal_dots(img, txt)) + n * bias
        return (plan.psum(pairs) - positives) / n

    loss = plan.run(forward, (img, txt, logit_scale, logit_bias), ("B", "B", "", ""), "")
    return loss, (img, txt, logit_scale, logit_bias)


def _siglip_bwd(plan, residuals, g):
    def backward(img, txt, logit_scale, logit_bias, g):
        scale = jnp.exp(logit_scale.astype(jnp.float32))
        n = img.shape[0] * plan.ring_size
        d_img, d_txt, g_sum = plan.engine.siglip_grads(
            img, txt, scale, logit_bias.astype(jnp.float32), g / n, block_size=plan.block_size
        )
        d_bias = (plan.psum(g_sum) - g).astype(logit_bias.dtype)
        return (*_with_diagonal(plan, img, txt, logit_scale, scale, d_img, d_txt, g / n), d_bias)

    return plan.run(
        backward, (*residuals, g), ("B", "B", "", "", ""), ("B", "B", "", "")
    )


_siglip.defvjp(_siglip_fwd, _siglip_bwd)
