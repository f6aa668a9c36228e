"""Pure-JAX tiled engine: the B×B logits are visited one [tile, tile] block at a time.

Each function is one pass of `lax.scan` over row tiles with a nested scan over column
tiles, so at any moment only one tile of logits exists; what survives between tiles is
O(B): log-sum-exps, or the f32 gradient accumulators. No autodiff runs through these
functions: `mmjax.objectives.contrastive` wraps them in a `jax.custom_vjp`.

The same four functions, with the same signatures, are implemented with Pallas kernels in
`contrastive_pallas`; the ring in `mmjax.objectives.contrastive` calls either.

    clip_lse(img, txt, scale)                   -> row_lse [n_img], col_lse [n_txt]
    clip_grads(img, txt, scale, row_lse, col_lse, coef)
                                                -> d_img, d_txt           (f32)
    siglip_softplus_sum(img, txt, scale, bias)  -> Σ_ij softplus(z_ij)   (f32 scalar)
    siglip_grads(img, txt, scale, bias, coef)   -> d_img, d_txt, Σ_ij G_ij

with d_img = s·G·txt, d_txt = s·Gᵀ·img for the all-pairs part G of ∂ℓ/∂L (see
`contrastive_tiles`); the O(B) diagonal terms are the caller's.
"""
import jax
import jax.numpy as jnp

from mmjax.kernels import contrastive_tiles as tiles

DEFAULT_BLOCK_SIZE = 512


class _Tiling:
    """Rows of img and txt, zero-padded to whole tiles, and the mask for the padding."""

    def __init__(self, img, txt, block_size):
        self.n_img, self.n_txt = img.shape[0], txt.shape[0]
        self.imgs = _split(img, block_size)
        self.txts = _split(txt, block_size)
        self.row_tile, self.col_tile = self.imgs.shape[1], self.txts.shape[1]
        self.padded = (
            self.imgs.shape[0] * self.row_tile != self.n_img
            or self.txts.shape[0] * self.col_tile != self.n_txt
        )

    def rows(self, v, fill=0.0):
        return _split(v, self.row_tile, fill)

    def cols(self, v, fill=0.0):
        return _split(v, self.col_tile, fill)

    def logits(self, i, img_tile, j, txt_tile, scale, bias=0.0):
        """Tile (i, j) of s·img·txtᵀ + b, and where it is a real pair (None: everywhere)."""
        z = scale * tiles.dots(img_tile, txt_tile) + bias
        if not self.padded:
            return z, None
        valid = tiles.valid_pairs(
            i * self.row_tile, j * self.col_tile, z.shape, self.n_img, self.n_txt
        )
        return jnp.where(valid, z, tiles.MASKED), valid


def _split(x, tile, fill=0.0):
    """[n, ...] → [n_tiles, tile, ...], padding the last tile with `fill`."""
    tile = min(tile, x.shape[0])
    n_tiles = -(-x.shape[0] // tile)
    pad = [(0, n_tiles * tile - x.shape[0])] + [(0, 0)] * (x.ndim - 1)
    return jnp.pad(x, pad, constant_values=fill).reshape(n_tiles, tile, *x.shape[1:])


def _merge(tiled, n):
    return tiled.reshape(-1, *tiled.shape[2:])[:n]


def _indexed(tiled):
    return jnp.arange(tiled.shape[0]), tiled


def clip_lse(img, txt, scale, *, block_size=DEFAULT_BLOCK_SIZE):
    """Row and column log-sum-exp of s·img·txtᵀ in one pass over the tiles."""
    t = _Tiling(img, txt, block_size)

    def row_tile(col_lse, xs):
        i, img_tile = xs

        def col_tile(row_lse, xs):
            j, txt_tile, col_lse_j = xs
            row, col = tiles.clip_lse(t.logits(i, img_tile, j, txt_tile, scale)[0])
            return jnp.logaddexp(row_lse, row[:, 0]), jnp.logaddexp(col_lse_j, col[0])

        no_row = jnp.full((t.row_tile,), -jnp.inf)
        row_lse, col_lse = jax.lax.scan(col_tile, no_row, (*_indexed(t.txts), col_lse))
        return col_lse, row_lse

    no_col = jnp.full(t.txts.shape[:2], -jnp.inf)
    col_lse, row_lse = jax.lax.scan(row_tile, no_col, _indexed(t.imgs))
    return _merge(row_lse, t.n_img), _merge(col_lse, t.n_txt)


def _grads(t, scale, grad_tile):
    """d_img = s·G·txt, d_txt = s·Gᵀ·img and Σ G, with G built tile by tile by
    grad_tile(i, j, img_tile, txt_tile) → (G tile, valid or None); G is recomputed, never
    stored."""
    dtype = t.imgs.dtype

    def row_tile(d_txt, xs):
        i, img_tile = xs

        def col_tile(carry, xs):
            d_img_tile, g_sum = carry
            j, txt_tile, d_txt_j = xs
            g, valid = grad_tile(i, j, img_tile, txt_tile)
            if valid is not None:
                g = jnp.where(valid, g, 0.0)
            g_sum = g_sum + jnp.sum(g)
            g = g.astype(dtype)
            d_img_tile += jnp.dot(g, txt_tile, preferred_element_type=jnp.float32)
            d_txt_j += jnp.dot(g.T, img_tile, preferred_element_type=jnp.float32)
            return (d_img_tile, g_sum), d_txt_j

        init = (jnp.zeros(img_tile.shape, jnp.float32), jnp.zeros((), jnp.float32))
        (d_img_tile, g_sum), d_txt = jax.lax.scan(col_tile, init, (*_indexed(t.txts), d_txt))
        return d_txt, (d_img_tile, g_sum)

    d_txt0 = jnp.zeros(t.txts.shape, jnp.float32)
    d_txt, (d_img, g_sums) = jax.lax.scan(row_tile, d_txt0, _indexed(t.imgs))
    return scale * _merge(d_img, t.n_img), scale * _merge(d_txt, t.n_txt), jnp.sum(g_sums)


def clip_grads(img, txt, scale, row_lse, col_lse, coef, *, block_size=DEFAULT_BLOCK_SIZE):
    """Gradients of coef·(Σ row LSE + Σ col LSE) w.r.t. img and txt, tiles recomputed."""
    t = _Tiling(img, txt, block_size)
    rows, cols = t.rows(row_lse), t.cols(col_lse)

    def grad_tile(i, j, img_tile, txt_tile):
        logits, valid = t.logits(i, img_tile, j, txt_tile, scale)
        return tiles.clip_grad(logits, rows[i][:, None], cols[j][None, :], coef), valid

    d_img, d_txt, _ = _grads(t, scale, grad_tile)
    return d_img, d_txt


def siglip_softplus_sum(img, txt, scale, bias, *, block_size=DEFAULT_BLOCK_SIZE):
    """Σ over all pairs of softplus(s·⟨img_i, txt_j⟩ + b)."""
    t = _Tiling(img, txt, block_size)

    def row_tile(total, xs):
        i, img_tile = xs

        def col_tile(total, xs):
            j, txt_tile = xs
            z, valid = t.logits(i, img_tile, j, txt_tile, scale, bias)
            loss = tiles.softplus(z)
            if valid is not None:
                loss = jnp.where(valid, loss, 0.0)
            return total + jnp.sum(loss), None

        return jax.lax.scan(col_tile, total, _indexed(t.txts))[0], None

    return jax.lax.scan(row_tile, jnp.zeros((), jnp.float32), _indexed(t.imgs))[0]


def siglip_grads(img, txt, scale, bias, coef, *, block_size=DEFAULT_BLOCK_SIZE):
    """Gradients of coef·Σ softplus(z) w.r.t. img and txt, and Σ_ij coef·σ(z_ij) (= d/db)."""
    t = _Tiling(img, txt, block_size)

    def grad_tile(i, j, img_tile, txt_tile):
        z, valid = t.logits(i, img_tile, j, txt_tile, scale, bias)
        return coef * tiles.sigmoid(z), valid

    return _grads(t, scale, grad_tile)
