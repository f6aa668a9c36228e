"""Pallas engine for the tiled contrastive losses: GPU (Triton), TPU (Mosaic), CPU (interpret).

Same four functions as `contrastive_blockwise`, and the same tile math
(`contrastive_tiles`); only the loops differ. The image rows are cut into strips of
`strip_rows`; for each strip one kernel launch covers the grid of (row tile i, text tile j)
pairs, and each program makes its logits tile with a loop over d in chunks of `block_k`
(at d = 1024 a whole [tile, d] operand does not fit in registers or shared memory):

  forward   `_clip_lse_kernel` writes the row and column log-sum-exps of its tile, or
            `_siglip_loss_kernel` its row sums of softplus; XLA merges those partials
            (O(strip + B) floats per strip, never B²).
  backward  `_clip_grad_kernel` / `_siglip_grad_kernel` recompute each tile once and write
            G = ∂ℓ/∂L for the strip, in the input dtype; two matmuls on the vendor GEMM then
            give d_img[strip] = s·G·txt and d_txt += s·Gᵀ·img[strip]. Fusing those into the
            kernel would need a [tile, d] f32 accumulator per program (512 KiB at d = 1024,
            more than a GPU SM's registers), so it would recompute the logits once per
            d-chunk; one recompute + two GEMMs keeps fwd + bwd at 8·B²·d FLOPs.

Memory: inputs, O(B) statistics, f32 gradient accumulators, and one strip of G
(strip_rows × B, with strip_rows ≈ 4·d: O(B·d)).
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mmjax.kernels import contrastive_tiles as tiles

DEFAULT_BLOCK_SIZE = 128
STRIP_ROWS_PER_DIM = 4  # strip_rows ≈ 4·d: G's strip is 4× the size of the image embeddings

# Layout of the two small inputs every kernel reads.
_SCALE, _BIAS, _COEF = 0, 1, 2  # params: f32[4]
_ROWS, _COLS = 0, 1  # valid: i32[2], how many rows of this strip and columns are real


@dataclasses.dataclass(frozen=True)
class _Backend:
    interpret: bool
    block_k: int  # d is contracted in chunks of block_k (zero-padded to a multiple)
    compiler_params: object = None
    scalar_memory: object = None  # where params/valid live (SMEM on TPU)


def backend_for(platform):
    """How to run the kernels on `platform` ("gpu", "tpu", anything else: interpreted)."""
    if platform == "gpu":
        from jax.experimental.pallas import triton as pltriton

        # Triton, named explicitly: jax 0.10 would otherwise lower to Mosaic GPU, which
        # rejects this generic jnp body (measured on an H100, docs/benchmarks.md). The
        # numbers are the fastest of a sweep at B = 32,768, d = 1,024, bf16.
        return _Backend(False, 64, pltriton.CompilerParams(num_warps=4, num_stages=3))
    if platform == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"))
        return _Backend(False, 256, params, pltpu.SMEM)
    return _Backend(interpret=True, block_k=128)


def _backend():
    return backend_for(jax.default_backend())


class _Layout:
    """Padded operands and the strip × tile grid for img [n_img, d], txt [n_txt, d]."""

    def __init__(self, img, txt, block_size):
        self.backend = backend = _backend()
        self.n_img, self.n_txt = img.shape[0], txt.shape[0]
        self.d = img.shape[1]
        self.tile = block_size
        self.block_k = min(backend.block_k, pl.next_power_of_2(max(self.d, 16)))
        d_pad = _round_up(self.d, self.block_k)
        strip = min(_round_up(STRIP_ROWS_PER_DIM * self.d, self.tile),
                    _round_up(self.n_img, self.tile))
        self.n_strips = -(-self.n_img // strip)
        self.strip = strip
        self.n_cols = _round_up(self.n_txt, self.tile)
        self.img_strips = _pad(img, self.n_strips * strip, d_pad).reshape(
            self.n_strips, strip, d_pad)
        self.txt = _pad(txt, self.n_cols, d_pad)
        self.masked = self.n_strips * strip != self.n_img or self.n_cols != self.n_txt
        self.grid = (strip // self.tile, self.n_cols // self.tile)  # i fastest: txt tile reused

    # BlockSpecs of the operands, by what they are indexed with.
    def row_tile(self, *trailing):
        return pl.BlockSpec((self.tile, *trailing), lambda i, j: (i, *[0] * len(trailing)))

    def col_tile(self, *trailing):
        return pl.BlockSpec((self.tile, *trailing), lambda i, j: (j, *[0] * len(trailing)))

    def col_stat(self):  # [1, n_cols] → [1, tile]
        return pl.BlockSpec((1, self.tile), lambda i, j: (0, j))

    def pair_tile(self):  # [strip, n_cols] → [tile, tile]
        return pl.BlockSpec((self.tile, self.tile), lambda i, j: (i, j))

    def row_partial(self):  # one [tile, 1] per (i, j): [n_col_tiles, strip, 1]
        shape = jax.ShapeDtypeStruct((self.grid[1], self.strip, 1), jnp.float32)
        return shape, pl.BlockSpec((None, self.tile, 1), lambda i, j: (j, i, 0))

    def col_partial(self):  # one [1, tile] per (i, j): [n_row_tiles, 1, n_cols]
        shape = jax.ShapeDtypeStruct((self.grid[0], 1, self.n_cols), jnp.float32)
        return shape, pl.BlockSpec((None, 1, self.tile), lambda i, j: (i, 0, j))

    def call(self, kernel, k, params, img_strip, extra_in, extra_specs, out_shapes, out_specs,
             exps_per_pair):
        """Run `kernel` on strip k: grid over (row tile, column tile)."""
        backend = self.backend
        scalar = pl.BlockSpec(memory_space=backend.scalar_memory)
        valid = jnp.stack([self.n_img - k * self.strip, jnp.int32(self.n_txt)]).astype(jnp.int32)
        pairs = self.strip * self.n_cols
        d_pad = self.txt.shape[1]
        cost = pl.CostEstimate(
            flops=2 * pairs * d_pad,
            transcendentals=exps_per_pair * pairs,
            bytes_accessed=(self.grid[0] * self.txt.size + img_strip.size)
            * self.txt.dtype.itemsize,
        )
        return pl.pallas_call(
            functools.partial(kernel, block_k=self.block_k, masked=self.masked),
            grid=self.grid,
            in_specs=[scalar, scalar, self.row_tile(d_pad), self.col_tile(d_pad), *extra_specs],
            out_specs=out_specs,
            out_shape=out_shapes,
            compiler_params=backend.compiler_params,
            interpret=backend.interpret,
            cost_estimate=cost,
            name=kernel.__name__,
        )(params, valid, img_strip, self.txt, *extra_in)

    def merge_rows(self, strips):
        return strips.reshape(-1, *strips.shape[2:])[: self.n_img, ..., : self.d]

    def merge_cols(self, x):
        return x[: self.n_txt, ..., : self.d]


def _round_up(n, multiple):
    return -(-n // multiple) * multiple


def _pad(x, rows, cols):
    return jnp.pad(x, ((0, rows - x.shape[0]), (0, cols - x.shape[1])))


def _params(scale, bias=0.0, coef=0.0):
    return jnp.stack([scale, bias, coef, 0.0]).astype(jnp.float32)


# ------------------------------------------------------------------------------ kernels


def _logits(params_ref, valid_ref, img_ref, txt_ref, *, block_k, masked, bias=False):
    """This program's tile of s·img·txtᵀ (+ b), MASKED outside the real pairs."""
    rows, d = img_ref.shape
    cols = txt_ref.shape[0]

    def chunk(k, acc):
        ks = pl.ds(pl.multiple_of(k * block_k, block_k), block_k)
        return acc + tiles.dots(img_ref[:, ks], txt_ref[:, ks])

    acc = jax.lax.fori_loop(0, d // block_k, chunk, jnp.zeros((rows, cols), jnp.float32))
    z = params_ref[_SCALE] * acc
    if bias:
        z = z + params_ref[_BIAS]
    if not masked:
        return z, None
    valid = tiles.valid_pairs(
        pl.program_id(0) * rows, pl.program_id(1) * cols, z.shape,
        valid_ref[_ROWS], valid_ref[_COLS],
    )
    return jnp.where(valid, z, tiles.MASKED), valid


def _clip_lse_kernel(params_ref, valid_ref, img_ref, txt_ref, row_ref, col_ref, **kw):
    logits, _ = _logits(params_ref, valid_ref, img_ref, txt_ref, **kw)
    row_ref[...], col_ref[...] = tiles.clip_lse(logits)


def _clip_grad_kernel(params_ref, valid_ref, img_ref, txt_ref, row_lse_ref, col_lse_ref,
                      g_ref, **kw):
    logits, valid = _logits(params_ref, valid_ref, img_ref, txt_ref, **kw)
    g = tiles.clip_grad(logits, row_lse_ref[...], col_lse_ref[...], params_ref[_COEF])
    if valid is not None:
        g = jnp.where(valid, g, 0.0)
    g_ref[...] = g.astype(g_ref.dtype)


def _siglip_loss_kernel(params_ref, valid_ref, img_ref, txt_ref, row_ref, **kw):
    z, valid = _logits(params_ref, valid_ref, img_ref, txt_ref, bias=True, **kw)
    loss = tiles.softplus(z)
    if valid is not None:
        loss = jnp.where(valid, loss, 0.0)
    row_ref[...] = jnp.sum(loss, axis=1, keepdims=True)


def _siglip_grad_kernel(params_ref, valid_ref, img_ref, txt_ref, g_ref, g_row_ref, **kw):
    z, valid = _logits(params_ref, valid_ref, img_ref, txt_ref, bias=True, **kw)
    g = params_ref[_COEF] * tiles.sigmoid(z)
    if valid is not None:
        g = jnp.where(valid, g, 0.0)
    g_ref[...] = g.astype(g_ref.dtype)
    g_row_ref[...] = jnp.sum(g, axis=1, keepdims=True)


# ---------------------------------------------------------------------- engine functions


def _strips(lay, *per_strip):
    return (jnp.arange(lay.n_strips), lay.img_strips, *per_strip)


def _contract(g, img_strip, txt, d_txt):
    """G·txt for the strip's rows, and Gᵀ·img_strip added into d_txt: f32 accumulation."""
    d_img_strip = jnp.dot(g, txt, preferred_element_type=jnp.float32)
    d_txt = d_txt + jax.lax.dot_general(
        g, img_strip, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )
    return d_img_strip, d_txt


def clip_lse(img, txt, scale, *, block_size=DEFAULT_BLOCK_SIZE):
    lay = _Layout(img, txt, block_size)
    params = _params(scale)
    row_shape, row_spec = lay.row_partial()
    col_shape, col_spec = lay.col_partial()

    def strip(col_lse, xs):
        k, img_strip = xs
        row_parts, col_parts = lay.call(
            _clip_lse_kernel, k, params, img_strip, (), (), (row_shape, col_shape),
            (row_spec, col_spec), exps_per_pair=2,
        )
        row_lse = jax.nn.logsumexp(row_parts, axis=0)[:, 0]
        return jnp.logaddexp(col_lse, jax.nn.logsumexp(col_parts, axis=0)[0]), row_lse

    no_col = jnp.full((lay.n_cols,), -jnp.inf)
    col_lse, row_lse = jax.lax.scan(strip, no_col, _strips(lay))
    return row_lse.reshape(-1)[: lay.n_img], col_lse[: lay.n_txt]


def clip_grads(img, txt, scale, row_lse, col_lse, coef, *, block_size=DEFAULT_BLOCK_SIZE):
    lay = _Layout(img, txt, block_size)
    params = _params(scale, coef=coef)
    rows = jnp.pad(row_lse, (0, lay.n_strips * lay.strip - lay.n_img))
    rows = rows.reshape(lay.n_strips, lay.strip, 1)
    cols = jnp.pad(col_lse, (0, lay.n_cols - lay.n_txt))[None, :]
    g_shape = jax.ShapeDtypeStruct((lay.strip, lay.n_cols), img.dtype)

    def strip(d_txt, xs):
        k, img_strip, row_strip = xs
        g = lay.call(
            _clip_grad_kernel, k, params, img_strip, (row_strip, cols),
            (lay.row_tile(1), lay.col_stat()), g_shape, lay.pair_tile(), exps_per_pair=2,
        )
        d_img_strip, d_txt = _contract(g, img_strip, lay.txt, d_txt)
        return d_txt, d_img_strip

    d_txt, d_img = jax.lax.scan(strip, jnp.zeros(lay.txt.shape, jnp.float32), _strips(lay, rows))
    return scale * lay.merge_rows(d_img), scale * lay.merge_cols(d_txt)


def siglip_softplus_sum(img, txt, scale, bias, *, block_size=DEFAULT_BLOCK_SIZE):
    lay = _Layout(img, txt, block_size)
    params = _params(scale, bias)
    row_shape, row_spec = lay.row_partial()

    def strip(total, xs):
        k, img_strip = xs
        rows = lay.call(
            _siglip_loss_kernel, k, params, img_strip, (), (), row_shape, row_spec,
            exps_per_pair=2,
        )
        return total + jnp.sum(rows), None

    return jax.lax.scan(strip, jnp.zeros((), jnp.float32), _strips(lay))[0]


def siglip_grads(img, txt, scale, bias, coef, *, block_size=DEFAULT_BLOCK_SIZE):
    lay = _Layout(img, txt, block_size)
    params = _params(scale, bias, coef)
    g_shape = jax.ShapeDtypeStruct((lay.strip, lay.n_cols), img.dtype)
    row_shape, row_spec = lay.row_partial()

    def strip(carry, xs):
        d_txt, g_sum = carry
        k, img_strip = xs
        g, g_rows = lay.call(
            _siglip_grad_kernel, k, params, img_strip, (), (), (g_shape, row_shape),
            (lay.pair_tile(), row_spec), exps_per_pair=1,
        )
        d_img_strip, d_txt = _contract(g, img_strip, lay.txt, d_txt)
        return (d_txt, g_sum + jnp.sum(g_rows)), d_img_strip

    init = (jnp.zeros(lay.txt.shape, jnp.float32), jnp.zeros((), jnp.float32))
    (d_txt, g_sum), d_img = jax.lax.scan(strip, init, _strips(lay))
    return scale * lay.merge_rows(d_img), scale * lay.merge_cols(d_txt), g_sum
