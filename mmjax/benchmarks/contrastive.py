"""Benchmark the contrastive loss + gradient: compiled memory, wall time, TFLOP/s.

    python -m mmjax.benchmarks.contrastive --impl blockwise --batch 4096 --dim 1024
    python -m mmjax.benchmarks.contrastive --impl dense blockwise:512 pallas --batch 4096 65536 \
        --dim 1024 --sweep

One JSON object per measurement: XLA's compiled temporary memory
(`jax.jit(...).lower(...).compile().memory_analysis()`), the median wall time of loss +
gradient (all inputs) after warm-up, and TFLOP/s counted as 8·B²·d (forward logits 2B²d,
one recompute 2B²d, two gradient matmuls 4B²d). A configuration whose compiled footprint
would not fit in device memory is reported from the compile alone (time null): that is how
dense is measured at B = 65,536 on a 24 GiB host. The impls of one size are timed round-robin
(fair on a shared host); where a single impl is timed and the device reports it, the
process's peak device memory is included. `--sweep` also prints a markdown table.
"""
import argparse
import datetime
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp

from mmjax.kernels import contrastive_blockwise, contrastive_pallas
from mmjax.objectives import contrastive

DEFAULT_BLOCK_SIZE = {
    "dense": None,
    "blockwise": contrastive_blockwise.DEFAULT_BLOCK_SIZE,
    "pallas": contrastive_pallas.DEFAULT_BLOCK_SIZE,
}


def _device_memory_bytes():
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return stats["bytes_limit"]
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _loss_and_grad(kind, impl, block_size):
    def loss(img, txt, t, b):
        bias = b if kind == "siglip" else None
        return contrastive.contrastive_loss(kind, img, txt, t, bias, impl=impl, block_size=block_size)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))


@jax.jit(static_argnums=(0, 1, 2))
def _embeddings(batch, dim, dtype):
    x = jax.random.normal(jax.random.key(0), (2, batch, dim), jnp.float32)
    x = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x[0].astype(dtype), x[1].astype(dtype)


def compile_and_size(kind, impl, batch, dim, dtype, block_size):
    """The compiled loss + grad, and its record with XLA's memory analysis filled in."""
    block_size = block_size or DEFAULT_BLOCK_SIZE[impl]
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    emb = jax.ShapeDtypeStruct((batch, dim), dtype)
    compiled = _loss_and_grad(kind, impl, block_size).lower(emb, emb, scalar, scalar).compile()
    mem = compiled.memory_analysis()
    footprint = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
    record = dict(
        kind=kind, impl=impl, batch=batch, dim=dim, dtype=jnp.dtype(dtype).name,
        block_size=block_size, temp_bytes=mem.temp_size_in_bytes, footprint_bytes=footprint,
        time_s=None, tflops=None, device=jax.devices()[0].device_kind, jax=jax.__version__,
        date=datetime.date.today().isoformat(),
    )
    return compiled, record


def time_round_robin(compiled_fns, batch, dim, dtype, iters):
    """Median seconds of each function; every round runs each once, so the load of a
    shared host falls on all of them alike."""
    img, txt = _embeddings(batch, dim, dtype)
    args = (img, txt, jnp.float32(jnp.log(10.0)), jnp.float32(-10.0))
    for fn in compiled_fns:
        for _ in range(2):
            jax.block_until_ready(fn(*args))
    times = [[] for _ in compiled_fns]
    for _ in range(iters):
        for fn, fn_times in zip(compiled_fns, times):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            fn_times.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def measure(kind, impls, batch, dim, dtype, iters, memory_only=False):
    """Records for each (impl, block_size) at one size; those that fit in memory are timed."""
    compiled = [compile_and_size(kind, impl, batch, dim, dtype, bs) for impl, bs in impls]
    budget = 0.8 * _device_memory_bytes()
    timed = [(fn, r) for fn, r in compiled if not memory_only and r["footprint_bytes"] < budget]
    if timed:
        medians = time_round_robin([fn for fn, _ in timed], batch, dim, dtype, iters)
        for (_, record), seconds in zip(timed, medians):
            record["time_s"] = seconds
            record["tflops"] = 8 * batch**2 * dim / seconds / 1e12
    peak = (jax.local_devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    if len(timed) == 1 and peak is not None:  # the process's peak: one impl's only if alone
        timed[0][1]["peak_bytes_in_use"] = peak
    return [record for _, record in compiled]


def markdown(results):
    lines = [
        "| kind | impl | B | d | dtype | tile | temp memory (MiB) | time (ms) | TFLOP/s (8B²d) |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in results:
        time_ms = "compile only" if r["time_s"] is None else f"{1e3 * r['time_s']:.1f}"
        tflops = "" if r["tflops"] is None else f"{r['tflops']:.2f}"
        lines.append(
            f"| {r['kind']} | {r['impl']} | {r['batch']} | {r['dim']} | {r['dtype']} | "
            f"{r['block_size'] or ''} | {r['temp_bytes'] / 2**20:.1f} | {time_ms} | {tflops} |"
        )
    return "\n".join(lines)


def _impl_and_tile(arg):
    """"blockwise:512" → ("blockwise", 512); "pallas" → ("pallas", None: the default)."""
    impl, _, tile = arg.partition(":")
    if impl not in DEFAULT_BLOCK_SIZE:
        raise argparse.ArgumentTypeError(f"unknown impl {impl!r}")
    return impl, int(tile) if tile else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kind", nargs="+", default=["clip"], choices=["clip", "siglip"])
    parser.add_argument("--impl", nargs="+", default=["blockwise"], type=_impl_and_tile,
                        help="dense | blockwise[:tile] | pallas[:tile]")
    parser.add_argument("--batch", nargs="+", type=int, default=[4096])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--memory-only", action="store_true", help="compile, do not run")
    parser.add_argument("--sweep", action="store_true", help="also print a markdown table")
    args = parser.parse_args(argv)

    results = []
    for kind in args.kind:
        for batch in args.batch:
            records = measure(kind, args.impl, batch, args.dim, jnp.dtype(args.dtype),
                              args.iters, args.memory_only)
            for r in records:
                print(json.dumps(r), flush=True)
            results += records
    if args.sweep:
        print(f"\n{results[0]['device']}, jax {jax.__version__}, {results[0]['date']}\n")
        print(markdown(results))


if __name__ == "__main__":
    main()
