"""Which tower each parameter belongs to, and LiT-style locking (Zhai et al. 2022).

Every model declares `towers`: tower name -> its top-level parameter names ("image",
"text", and for CoCa "decoder"; "shared" holds the temperature and bias). A locked tower
is frozen twice over: the loss sees its parameters through `stop_gradient` (so no
gradient is computed for it at all), and the optimizer maps its updates to zero (so
neither the update nor weight decay moves it).
"""
from __future__ import annotations

import jax

LOCKABLE = ("image", "text")


def tower_of(model, name: str) -> str:
    """The tower owning top-level parameter `name`."""
    for tower, names in model.towers.items():
        if name in names:
            return tower
    raise ValueError(f"parameter {name!r} belongs to no tower of {type(model).__name__}: {model.towers}")


def locked_towers(model_cfg) -> tuple[str, ...]:
    return tuple(t for t in LOCKABLE if model_cfg[f"lock_{t}"])


def locked_mask(model, locked: tuple[str, ...]):
    """-> fn(params) giving a tree of bools, True where a parameter belongs to a locked tower."""

    def mask(params):
        return {
            name: jax.tree.map(lambda _, frozen=tower_of(model, name) in locked: frozen, sub)
            for name, sub in params.items()
        }

    return mask


def stop_locked_gradients(params, mask):
    """Locked parameters become constants of the loss: autodiff skips their whole backward."""
    return jax.tree.map(lambda p, frozen: jax.lax.stop_gradient(p) if frozen else p, params, mask)
