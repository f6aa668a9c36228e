"""config.profile_steps="N,M": a jax.profiler trace of train steps N to M in <workdir>/profile.

Open it with TensorBoard's profile plugin or Perfetto, or summarise it by category with
`python -m mmjax.benchmarks.profile`'s reader. Steps count from 1 as the console does; a
step's time includes waiting for its batch, as in training.
"""
from __future__ import annotations

import os

import jax

DIRNAME = "profile"


def parse(spec: str) -> tuple[int, int] | None:
    """"N,M" -> (N, M) with 1 <= N <= M; "" -> None. Raises ValueError with what is valid."""
    if not spec:
        return None
    try:
        first, last = (int(part) for part in spec.split(","))
    except ValueError:
        raise ValueError(f"{spec!r} is not two step numbers 'N,M'") from None
    if not 1 <= first <= last:
        raise ValueError(f"{spec!r} needs 1 <= N <= M")
    return first, last


class StepTrace:
    """Starts the trace before step `first` runs and stops it once step `last` has finished."""

    def __init__(self, spec: str, workdir: str):
        self.steps = parse(spec)
        self.directory = os.path.join(workdir, DIRNAME)
        self.active = False

    def before(self, step: int) -> None:
        """`step`: the step about to run."""
        if self.steps and step == self.steps[0]:
            jax.profiler.start_trace(self.directory)
            self.active = True

    def after(self, step: int, outputs) -> None:
        """`step`: the step just dispatched; `outputs`: what it returned (waited for before stopping)."""
        if self.active and step >= self.steps[1]:
            jax.block_until_ready(outputs)
            self.stop()
            print(f"profile of steps {self.steps[0]}-{self.steps[1]} written to {self.directory}", flush=True)

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
