"""Orbax checkpoints of the whole run: train state and data-iterator state, saved together.

Saves are async and atomic (orbax writes to a temporary directory and renames it when
complete), so a crash mid-save leaves the previous checkpoint as the latest restorable one.
"""
from __future__ import annotations

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str, keep: int, async_save: bool = True):
        self._manager = ocp.CheckpointManager(
            directory,
            options=ocp.CheckpointManagerOptions(
                preservation_policy=ocp.checkpoint_managers.LatestN(keep),
                enable_async_checkpointing=async_save,
                # A crash can leave a half-written tmp step directory behind; orbax ignores it
                # for latest_step() and removes it at the next start.
                cleanup_tmp_directories=True,
            ),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state, data_state: dict) -> None:
        """Save `state` (a pytree of jax.Arrays) and the data iterators' snapshot
        (`pipeline.data_state`: every process's `get_state()` and their fingerprint).

        The iterator state is snapshotted by the caller at the same step as `state`: with
        async saving the live iterator would already have moved on when orbax writes it.
        """
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
            force=True,
        )

    def restore(self, step: int, abstract_state):
        """Restore onto `abstract_state`'s shardings (which may be those of a different mesh).

        Returns (state, data_state).
        """
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), abstract_state
        )
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore())
        )
        return restored["state"], restored["data"]

    def reached_preemption(self, step: int) -> bool:
        return self._manager.reached_preemption(step)

    def close(self) -> None:
        """Block until pending async saves are durable."""
        self._manager.wait_until_finished()
        self._manager.close()
