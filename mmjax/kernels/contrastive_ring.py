"""Ring engine: the tiled contrastive engines across devices, without gathering the batch.

Runs inside `jax.shard_map` over the batch axes. Each device keeps its image rows at home;
the text blocks travel around a ring (`lax.ppermute`, device k → k+1), and whatever belongs
to a text block's columns travels with it: its column log-sum-exps in the forward, its
gradient d_txt in the backward. After n visits every image row has met every text column
once, and one more hop brings the column state home. A device holds at most its own rows,
one visiting block and O(B_local) statistics: never B_local × B_global logits.

`Ring(engine, axis_names, ring_size)` has the same four functions as the engine it wraps
(`contrastive_blockwise` or `contrastive_pallas`), on per-device shards: row statistics and
d_img for the local rows, column statistics and d_txt for the local (home) text rows, and
per-device partial sums that the caller `psum`s.
"""
import jax
import jax.numpy as jnp


class Ring:
    def __init__(self, engine, axis_names, ring_size):
        self.engine = engine
        self.axis_names = tuple(axis_names)
        self.size = ring_size

    def _shift(self, tree):
        """Every device sends to the next one along the ring."""
        perm = [(k, (k + 1) % self.size) for k in range(self.size)]
        return jax.tree.map(lambda x: jax.lax.ppermute(x, self.axis_names, perm), tree)

    def _around(self, visit, home, txt, travelling):
        """Let every text block visit once: home, travelling = visit(home, txt, travelling).

        `home` stays, `txt` and `travelling` move one hop after each visit; the text block
        is not sent on its last hop, the state that travels with it is, and arrives home.
        """

        def hop(_, carry):
            home, txt, travelling = carry
            home, travelling = visit(home, txt, travelling)
            return home, self._shift(txt), self._shift(travelling)

        home, txt, travelling = jax.lax.fori_loop(
            0, self.size - 1, hop, (home, txt, travelling)
        )
        home, travelling = visit(home, txt, travelling)
        return home, self._shift(travelling)

    def clip_lse(self, img, txt, scale, **kw):
        def visit(row_lse, txt, col_lse):
            row, col = self.engine.clip_lse(img, txt, scale, **kw)
            return jnp.logaddexp(row_lse, row), jnp.logaddexp(col_lse, col)

        no_row = jnp.full(img.shape[:1], -jnp.inf)
        no_col = jnp.full(txt.shape[:1], -jnp.inf)
        return self._around(visit, no_row, txt, no_col)

    def clip_grads(self, img, txt, scale, row_lse, col_lse, coef, **kw):
        def visit(d_img, txt, travelling):
            col_lse, d_txt = travelling
            di, dt = self.engine.clip_grads(img, txt, scale, row_lse, col_lse, coef, **kw)
            return d_img + di, (col_lse, d_txt + dt)

        zeros = jnp.zeros(img.shape, jnp.float32)
        d_img, (_, d_txt) = self._around(visit, zeros, txt, (col_lse, zeros))
        return d_img, d_txt

    def siglip_softplus_sum(self, img, txt, scale, bias, **kw):
        def visit(total, txt, nothing):
            return total + self.engine.siglip_softplus_sum(img, txt, scale, bias, **kw), nothing

        return self._around(visit, jnp.zeros((), jnp.float32), txt, ())[0]

    def siglip_grads(self, img, txt, scale, bias, coef, **kw):
        def visit(home, txt, d_txt):
            d_img, g_sum = home
            di, dt, gs = self.engine.siglip_grads(img, txt, scale, bias, coef, **kw)
            return (d_img + di, g_sum + gs), d_txt + dt

        zeros = jnp.zeros(img.shape, jnp.float32)
        (d_img, g_sum), d_txt = self._around(
            visit, (zeros, jnp.zeros((), jnp.float32)), txt, zeros
        )
        return d_img, d_txt, g_sum
