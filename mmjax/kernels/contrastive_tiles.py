"""The math of one tile of contrastive logits, shared by every tiled engine.

A tile is the [rows, cols] block L[i, j] = s·⟨img_i, txt_j⟩ (+ b for SigLIP) of the B×B
logits. The pure-JAX engine (`contrastive_blockwise`) and the Pallas kernels
(`contrastive_pallas`) both call these functions on f32 tiles, so they compute the same
thing by construction; only the loops around them differ.

Statistics keep their reduced axis (row stats are [rows, 1], column stats [1, cols]): that is
the layout a TPU kernel wants (sublane- and lane-major vectors) and it broadcasts back
against the tile without reshapes.

CLIP, with r_i = LSE_j L_ij and c_j = LSE_i L_ij:
    ℓ = (Σ_i r_i + Σ_j c_j) / 2B − Σ_i L_ii / B
    ∂ℓ/∂L_ij = (exp(L_ij − r_i) + exp(L_ij − c_j)) / 2B − δ_ij / B
SigLIP, with z_ij = L_ij + b and labels y = 2δ − 1, −log σ(y·z) = softplus(z) − δ·z, so
    ℓ = (Σ_ij softplus(z_ij) − Σ_i z_ii) / B
    ∂ℓ/∂z_ij = (σ(z_ij) − δ_ij) / B
The diagonal terms are O(B) and are added by the caller; tiles handle the all-pairs part.
"""
import jax
import jax.numpy as jnp

# Finite on purpose: a fully masked row then has a finite log-sum-exp (MASKED + log cols)
# instead of −inf, so no −inf − (−inf) = NaN can appear when statistics are merged.
MASKED = -1e30


def dots(img, txt):
    """img·txtᵀ for img [rows, d], txt [cols, d], accumulated in f32 (the caller scales)."""
    return jax.lax.dot_general(
        img, txt, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )


def valid_pairs(row_start, col_start, shape, n_rows, n_cols):
    """True where the tile's (row, col) pair is a real pair, False in the padding."""
    rows = row_start + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    cols = col_start + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    return (rows < n_rows) & (cols < n_cols)


def clip_lse(logits):
    """Row and column log-sum-exp of one tile: ([rows, 1], [1, cols])."""
    row_max = jnp.max(logits, axis=1, keepdims=True)
    row = row_max + jnp.log(jnp.sum(jnp.exp(logits - row_max), axis=1, keepdims=True))
    col_max = jnp.max(logits, axis=0, keepdims=True)
    col = col_max + jnp.log(jnp.sum(jnp.exp(logits - col_max), axis=0, keepdims=True))
    return row, col


def clip_grad(logits, row_lse, col_lse, coef):
    """coef·(softmax over the row + softmax over the column) of each logit; coef = g/2B."""
    return coef * (jnp.exp(logits - row_lse) + jnp.exp(logits - col_lse))


def softplus(z):
    """log(1 + e^z) without overflow: max(z, 0) + log1p(e^−|z|)."""
    return jnp.maximum(z, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(z)))


def sigmoid(z):
    """σ(z) without overflow: e^−|z| never exceeds 1."""
    e = jnp.exp(-jnp.abs(z))
    return jnp.where(z >= 0, 1.0, e) / (1.0 + e)
