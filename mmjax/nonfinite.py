"""The non-finite guard: a step whose loss or gradient norm is NaN or infinite is not applied.

On device, `select_finite` keeps the previous parameters and optimizer state for such a
step. On the host, `NonFiniteMonitor` counts skipped steps and stops the run after
`config.max_nonfinite_steps` of them in a row: by then the model will not recover by itself.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mmjax.errors import RunStopped


def select_finite(finite: jax.Array, new, old):
    """`new` where `finite`, else `old`, leaf by leaf (fuses with the update's elementwise ops)."""
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


@jax.jit
def all_finite(tree) -> jax.Array:
    """True when every element of every leaf is finite (a norm could overflow where no element does)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


class NonFiniteMonitor:
    """Reads each step's `nonfinite` flag one step late, so the host never waits for the
    step it has just dispatched (the device keeps a step queued)."""

    def __init__(self, max_in_a_row: int, fix_hint: str):
        self.max_in_a_row = max_in_a_row
        self.fix_hint = fix_hint
        self.total = 0
        self.in_a_row = 0
        self._pending = None

    def push(self, step: int, nonfinite: jax.Array) -> None:
        """Record `step`'s flag (a device scalar); checks the previous step's."""
        self.flush()
        self._pending = (step, nonfinite)

    def flush(self) -> None:
        """Check the pending flag now (before saving, evaluating or stopping)."""
        if self._pending is None:
            return
        step, flag = self._pending
        self._pending = None
        if not bool(flag):
            self.in_a_row = 0
            return
        self.total += 1
        self.in_a_row += 1
        if self.in_a_row >= self.max_in_a_row:
            first = step - self.in_a_row + 1
            raise RunStopped(
                f"steps {first}-{step}: loss or gradient norm not finite {self.in_a_row} times in a row "
                f"(max_nonfinite_steps={self.max_in_a_row}); those steps were skipped, the parameters are "
                f"step {first - 1}'s and every checkpoint is finite; {self.fix_hint}"
            )
