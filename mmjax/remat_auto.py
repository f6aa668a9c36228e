"""model.remat="auto": the least rematerialisation whose compiled train step fits the device.

Rematerialisation trades compute for memory: "none" keeps every activation the backward pass
reads, "dots" only the weight matmuls' outputs, "full" only each block's input
(mmjax.models.layers.REMAT_POLICIES). Which one a run needs depends on the model, the batch,
the mesh and the chip, so instead of a habit the trainer compiles the step with each in turn,
least recompute first, and takes the first that XLA's own memory analysis of the compiled
program says fits. A device that does not report its memory (a CPU) gets "none".
"""
from __future__ import annotations

from typing import Callable

from mmjax import throughput

ORDER = ("none", "dots", "full")  # least recompute first
HEADROOM = 0.9  # of the device's memory: the allocator, input batches and the evaluator need the rest


def device_memory(device) -> int | None:
    """Bytes the device may allocate, or None where it does not say (CPU)."""
    stats = device.memory_stats()
    return (stats or {}).get("bytes_limit")


def needed_bytes(compiled) -> int | None:
    """What the compiled program holds on a device at its peak: arguments, outputs not
    aliased to donated arguments, temporaries, code; None where XLA gives no analysis."""
    m = throughput.memory_analysis(compiled)
    if m is None:
        return None
    return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes + m.generated_code_size_in_bytes)


def choose(compile_with: Callable[[str], object], limit: int | None) -> tuple[str, object, list[str]]:
    """compile_with(remat) -> the compiled step. Returns the first remat in ORDER whose step
    needs at most HEADROOM of `limit` bytes (the last, "full", if none does: the run then says
    whether it fits), its compiled step, and a note per compiled choice."""
    notes = []
    for remat in ORDER:
        compiled = compile_with(remat)
        need = needed_bytes(compiled)
        if limit is None or need is None:
            notes.append(f"{remat} (the device reports no memory limit)")
            return remat, compiled, notes
        fits = need <= HEADROOM * limit
        notes.append(f"{remat} needs {throughput.format_bytes(need)} of {HEADROOM:.0%} × "
                     f"{throughput.format_bytes(limit)}: " + ("fits" if fits else "too much"))
        if fits:
            return remat, compiled, notes
    return remat, compiled, notes
