"""Joining a multi-process jax run (main.py's --distributed): where the process group comes
from, checked before jax starts, and the one call that joins it.

Each value comes from the first of: the arguments (--coordinator_address, --num_processes,
--process_id), JAX's environment variables (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID), or, for whatever is still unset, the cluster jax detects itself (SLURM,
Cloud TPU, Open MPI, Kubernetes). A coordinator alone is jax's own override of the detected
one; a process count or id alone is a mistake named before any device work.
"""
from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence

from mmjax.errors import UserError

ENV = {
    "coordinator_address": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
}
FLAGS = {name: f"--{name}" for name in ENV}


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
    """What jax.distributed.initialize is given; None: jax detects it from the cluster."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def _named(name: str) -> str:
    return f"{FLAGS[name]} (or {ENV[name]})"


def _integer(name: str, value, source: str) -> int:
    if isinstance(value, int):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        raise UserError(f"{source}={value!r} is not an integer; fix {_named(name)}") from None


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, environ: Mapping[str, str] | None = None) -> ProcessGroup:
    """The process group from the arguments, else the environment; pure (no jax), so main.py
    checks it with the other flags and the tests call it directly."""
    environ = os.environ if environ is None else environ
    given = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
    values, sources = {}, {}
    for name, value in given.items():
        if value is None and environ.get(ENV[name], "").strip():
            value, sources[name] = environ[ENV[name]].strip(), ENV[name]
        sources.setdefault(name, FLAGS[name])
        values[name] = value
    for name in ("num_processes", "process_id"):
        if values[name] is not None:
            values[name] = _integer(name, values[name], sources[name])

    has = {name for name, value in values.items() if value is not None}
    if has & {"num_processes", "process_id"} and has != set(ENV):
        missing = " and ".join(_named(name) for name in ENV if name not in has)
        raise UserError(
            f"--distributed: {', '.join(sources[n] for n in ENV if n in has)} given but not {missing}; "
            "give all three, or none to let jax detect the cluster (SLURM, Cloud TPU, MPI)"
        )
    address = values["coordinator_address"]
    if address is not None and not re.fullmatch(r"\S+:\d+", address):
        raise UserError(f"{sources['coordinator_address']}={address!r} is not HOST:PORT; "
                        f"fix {_named('coordinator_address')}, e.g. localhost:1234")
    count, index = values["num_processes"], values["process_id"]
    if count is not None and count < 1:
        raise UserError(f"{sources['num_processes']}={count} must be at least 1; fix {_named('num_processes')}")
    if index is not None and not 0 <= index < count:
        raise UserError(f"{sources['process_id']}={index} is not in 0..{count - 1} "
                        f"({sources['num_processes']}={count}); fix {_named('process_id')}")
    return ProcessGroup(address, count, index)


def _cpu_collectives(jax) -> None:
    """Collectives between CPU processes need an implementation (older jax has none by default);
    a setting of the CPU backend only, so it costs nothing where the devices are TPUs or GPUs."""
    platforms = [p for p in (jax.config.jax_platforms or "").split(",") if p]
    if (not platforms or "cpu" in platforms) and jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: Sequence[int] | None = None) -> str:
    """Join the process group (before any device query) and describe it in one line,
    e.g. "process 1 of 2 (coordinator localhost:1234)". Raises UserError for a bad group."""
    group = resolve(coordinator_address, num_processes, process_id)
    import jax

    _cpu_collectives(jax)
    try:
        jax.distributed.initialize(group.coordinator_address, group.num_processes, group.process_id,
                                   local_device_ids=local_device_ids)
    except (ValueError, RuntimeError) as e:  # jax found no cluster, or the coordinator never answered
        first = next((line for line in str(e).splitlines() if line.strip()), repr(e))
        raise UserError(
            f"--distributed could not join a process group ({first}); outside SLURM, Cloud TPU and MPI give "
            f"{', '.join(FLAGS.values())} (or {', '.join(ENV.values())})"
        ) from None
    where = f"coordinator {group.coordinator_address}" if group.coordinator_address else "detected by jax"
    return f"process {jax.process_index()} of {jax.process_count()} ({where})"
