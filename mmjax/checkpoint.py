"""Orbax checkpoints of the whole run: train state and data-iterator state, saved together.

Saves are async and atomic (orbax writes to a temporary directory and renames it when
complete), so a crash mid-save leaves the previous checkpoint as the latest restorable one.

Failures are one line each, never a traceback flood:
- restore_latest: an unreadable step (truncated or missing file, bad metadata) is moved to
  `<directory>_unreadable/<step>` (kept, and out of orbax's sight) with one warning, and the
  next older step is tried; RunStopped only when none can be read.
- check_for_errors (after every step), save and close: a failed async save (disk full, file
  too large, permission) stops the run with RunStopped naming the error and the free space.
- close(abandon=True), while another exception propagates: raises and prints nothing.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from mmjax import epath_io, orbax_console
from mmjax.errors import RunStopped, UserError

# orbax's own words when the state asked for does not fit the checkpoint (another config wrote
# it): the files are fine, so they stay where they are.
_MISMATCH = ("not compatible with the stored shape", "tree structures do not match")


# Orbax splits each replicated array into one slice per replica so that hosts write in parallel;
# every slice is a device op of its own (2 ms each on a CPU), so a small array costs more to slice
# than to write: 5 s of every save for a tiny model on 8 devices. Below 4 MiB a slice is not worth it.
_quiet = orbax_console.QuietOrbax()
with _quiet.muted():  # orbax warns that it replaces its own handler
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=4 << 20), override=True
    )
_quiet.remove()


class Checkpointer:
    def __init__(self, directory: str, keep: int, async_save: bool = True, read_only: bool = False):
        """read_only: for tools reading a run's checkpoints, maybe while it trains: nothing is
        written, and the run's in-flight tmp step is left alone."""
        self._directory = epath_io.absolute(directory)
        self._aside = f"{self._directory}_unreadable"  # where unreadable steps go: orbax never looks there
        self._quiet = orbax_console.QuietOrbax()
        self._saving = None  # step of the last save not yet seen to have landed
        self._failure = None  # RunStopped message once a save failed
        orbax_console.silence_async_leftovers()
        with self._quiet.muted():  # listing the steps warns about any bad metadata it meets
            self._manager = ocp.CheckpointManager(
                self._directory,
                options=ocp.CheckpointManagerOptions(
                    preservation_policy=ocp.checkpoint_managers.LatestN(keep),
                    enable_async_checkpointing=async_save,
                    # A crash can leave a half-written tmp step directory behind; orbax ignores it
                    # for latest_step() and removes it at the next start.
                    cleanup_tmp_directories=not read_only,
                    read_only=read_only,
                ),
            )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state, data_state: dict) -> None:
        """Save `state` (a pytree of jax.Arrays) and the data iterators' snapshot
        (`pipeline.data_state`: every process's `get_state()` and their fingerprint).

        The iterator state is snapshotted by the caller at the same step as `state`: with
        async saving the live iterator would already have moved on when orbax writes it.
        Raises RunStopped if this or the previous save could not be written.
        """
        self._raise_if_save_failed(block=True)
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
                force=True,
            )
        except Exception as e:
            if orbax_console.os_error(e) is None:  # a bug, not the disk: keep its traceback
                raise
            self._save_failed(step, e)
        self._saving = step

    def check_for_errors(self) -> None:
        """Raise RunStopped if an async save failed. Cheap: never waits for a save in flight."""
        self._raise_if_save_failed(block=False)

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

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore_params(self, step: int, abstract_params):
        """Only the parameters of `step`, onto `abstract_params`' shapes and shardings: the
        optimizer state (twice the parameters' size with Adam) is never read.
        UserError, in one line, when the step is unreadable or the model does not fit it."""
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), {"params": abstract_params}
        )
        step_dir = os.path.join(self._directory, str(step), "state")
        try:
            with self._quiet.muted():
                restored = ocp.PyTreeCheckpointer().restore(step_dir, args=ocp.args.PyTreeRestore(
                    item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                    partial_restore=True))
        except Exception as e:
            reason = orbax_console.one_line(e)
            if any(phrase in str(e) for phrase in _MISMATCH):
                raise UserError(f"checkpoint step {step} in {self._directory} does not fit the model its workdir's "
                                f"config.json describes ({reason}); was config.json edited?") from None
            raise UserError(f"checkpoint step {step} in {self._directory} cannot be read ({reason})") from None
        return restored["params"]

    def restore_latest(self, abstract_state):
        """Restore the newest readable step -> (step, state, data_state); None if there is none.

        An unreadable step is moved aside (one warning line on stderr) while an older one is
        left to try; when the oldest cannot be read either, RunStopped says why for each.
        """
        steps = sorted(self._manager.all_steps(), reverse=True)
        failed = []
        for step, older in zip(steps, steps[1:] + [None]):
            try:
                with self._quiet.muted():
                    return (step, *self.restore(step, abstract_state))
            except Exception as e:
                reason = orbax_console.one_line(e)
                if any(phrase in str(e) for phrase in _MISMATCH):
                    raise UserError(
                        f"checkpoint step {step} in {self._directory} does not fit this run's model or "
                        f"optimizer ({reason}); re-run with the config that wrote it, or pass a new --workdir"
                    ) from None
                failed.append(f"step {step} ({reason})")
                if older is None:  # the oldest stays where it is: starting over is the user's call
                    moved = f" ({', '.join(f'step {s}' for s in steps[:-1])} now in {self._aside})" if steps[1:] else ""
                    raise RunStopped(
                        f"no checkpoint in {self._directory} can be read: {', '.join(failed)}{moved}; "
                        f"moving {self._directory} aside starts the run fresh"
                    ) from None
                moved = self._move_aside(step)
                print(
                    f"warning: checkpoint step {step} in {self._directory} cannot be read ({reason}); "
                    f"moved it to {moved} and trying step {older}",
                    file=sys.stderr,
                    flush=True,
                )
        return None

    def reached_preemption(self, step: int) -> bool:
        return self._manager.reached_preemption(step)

    def close(self, abandon: bool = False) -> None:
        """Block until pending async saves are durable; RunStopped if one failed.

        abandon: an exception is already on its way out. Nothing is raised or printed, so its
        traceback stays the last thing on the console; a save in flight still gets to land
        (its non-daemon thread would hold the process until then anyway).
        """
        try:
            if abandon:
                with self._quiet.muted(), contextlib.suppress(Exception):
                    self._raise_if_save_failed(block=True)
            else:
                self._raise_if_save_failed(block=True)
        finally:
            with self._quiet.muted(), contextlib.suppress(Exception):
                self._manager.close()
            self._quiet.remove()

    def _raise_if_save_failed(self, block: bool) -> None:
        if self._failure is None and self._saving is not None:
            if block or not self._manager.is_saving_in_progress():
                step, self._saving = self._saving, None
                try:
                    self._manager.wait_until_finished()
                except Exception as e:
                    self._save_failed(step, e)
        if self._failure is not None:
            raise RunStopped(self._failure)

    def _save_failed(self, step: int, error: Exception):
        self._remove_partial(step)
        with self._quiet.muted():
            self._manager.reload()  # the save already forgot steps it meant to replace; they are still there
        last = self._manager.latest_step()
        resume = (f"it resumes from the last good checkpoint, step {last}, which is intact" if last
                  else "no checkpoint was written before, so it starts from step 0")
        self._failure = (
            f"could not write checkpoint step {step} to {self._directory}: "
            f"{orbax_console.os_error(error) or orbax_console.one_line(error)}; "
            f"that filesystem has {_size(_free_bytes(self._directory))} free after removing the partial step "
            f"{step}. Free space there (or move the workdir to a bigger disk and pass that --workdir), then "
            f"re-run the same command: {resume}"
        )
        raise RunStopped(self._failure)

    def _remove_partial(self, step: int) -> None:
        """Remove what the failed save wrote: orbax's `<step>.orbax-checkpoint-tmp[-<time>]`.
        Writes of that save still in flight recreate files in it for a moment after the
        failure, so remove until it stays gone (orbax would also remove it at the next start)."""
        gone_for = 0
        for _ in range(50):  # 5 s at most
            partial = list(epath.Path(self._directory).glob(f"{step}.orbax-checkpoint-tmp*"))
            for path in partial:
                with contextlib.suppress(OSError):  # files vanishing under us; the next pass retries
                    path.rmtree()
            gone_for = 0 if partial else gone_for + 1
            if gone_for == 3:
                return
            time.sleep(0.1)

    def _move_aside(self, step: int) -> str:
        """Move the step directory out of the directory orbax scans; returns where it went."""
        aside = epath.Path(self._aside)
        target, n = aside / str(step), 1
        while target.exists():  # the same step went bad in an earlier run too
            n += 1
            target = aside / f"{step}.{n}"
        if jax.process_index() == 0:
            aside.mkdir(parents=True, exist_ok=True)
            (epath.Path(self._directory) / str(step)).rename(target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"mmjax checkpoint {step} moved aside")
        with self._quiet.muted():
            self._manager.reload()
        return str(target)


def _free_bytes(directory: str) -> int | None:
    """Free space on the local filesystem holding `directory`; None for a URL (an object store has no such number)."""
    if epath_io.is_remote(directory):
        return None
    while not os.path.exists(directory):
        directory = os.path.dirname(directory)
    return shutil.disk_usage(directory).free


def _size(n: float | None) -> str:
    if n is None:
        return "an unknown amount"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            break
        n /= 1024
    return f"{n:.0f} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
