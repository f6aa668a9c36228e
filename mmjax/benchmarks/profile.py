"""Where a train step's time goes: a jax.profiler trace of a few steps, each op's time put
in a category by the compiled HLO's op_name metadata (flax module paths, jax scopes).

    python -m mmjax.benchmarks.profile --config=configs/clip.py:vit_b16 [--config.key=value ...] \
        [--steps=3] [--out=DIR] [--peak_tflops=989]

The step is built as mmjax.benchmarks.step builds it (the trainer's step, no donation).
Prints one JSON object per category (seconds per step, share of op time; GFLOP and TFLOP/s
for matmuls, counted from each dot's shapes), a total, and a markdown table; with --out
also writes profile.jsonl, profile.md and top_ops.jsonl (the 40 costliest ops) there.

Where op times come from (jax.profiler.ProfileData over the .xplane.pb jax writes):
  CPU  the host plane's thread events that carry an `hlo_op` stat (XLA's thunks); time is
       exclusive (a while loop's own time without its body's ops) and summed over threads,
       so shares, not the sum, compare with the wall time.
  GPU  every event on the device planes' "Stream" lines (kernels, memcpy, memset); XLA's
       annotations put `hlo_op`/`hlo_module` stats on each kernel. Kernels inside CUDA
       graphs carry only the graph launch's annotation, so the tool turns XLA's command
       buffers off (--cuda_graphs to keep them): launch overhead is then included.
Anything that cannot be tied to an HLO op of the step (another program, an unannotated
kernel) is its own "unattributed" row, with its names in the JSON.

Categories: a kernel that contains a dot (or a cuBLAS/Triton GEMM) is a matmul, split by
module path: MLP (fc1, fc2), attention projections (q/k/v/out: no batch dimension),
attention scores (q·k and p·v: batched), other (patch/token embeddings, poolers' queries,
vocabulary projection, the loss's logits). cuDNN's fused attention is its own row. Layout-
only kernels (copy, transpose, reshape) are "copies/transposes"; collectives
"communication". The rest by the majority of their ops' paths: normalisation (LayerNorm),
attention elementwise (softmax, masks), MLP activation, other model elementwise, loss
(differentiated code outside the model: `jvp()`), optimizer (outside the gradient: clipping,
AdamW, the non-finite guard).
"""
from __future__ import annotations

from mmjax import host_memory

if __name__ == "__main__":  # before jax loads: glibc reads malloc tunables at start-up only
    host_memory.restart_with_kept_buffers("mmjax.benchmarks.profile")

import collections
import dataclasses
import glob
import json
import math
import os
import re
import statistics
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

CATEGORIES = (
    "matmul: MLP", "matmul: attention projections", "matmul: attention scores", "matmul: other",
    "attention: fused kernel", "attention: elementwise", "normalisation", "MLP activation",
    "elementwise: other", "loss", "optimizer", "copies/transposes", "communication", "unattributed",
)
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all",
               "collective-broadcast", "send", "recv")
LAYOUT_OPS = {"copy", "transpose", "bitcast", "reshape", "parameter", "tuple", "get-tuple-element",
              "slice", "concatenate", "pad", "dynamic-slice", "dynamic-update-slice", "copy-start",
              "copy-done", "broadcast", "constant", "iota", "bitcast-convert"}
GEMM_TARGETS = ("gemm", "matmul", "cublas")
FUSED_ATTENTION_TARGETS = ("fmha", "flash")


# --- the compiled HLO ------------------------------------------------------------------------

@dataclasses.dataclass
class Instruction:
    name: str
    shape: str
    opcode: str
    operands: list
    attributes: str  # everything after the operands: dims, calls=, backend_config, metadata
    op_name: str


def _balanced(text: str, start: int) -> int:
    """Index just past the bracket group opening at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        depth += text[i] in "([{"
        depth -= text[i] in ")]}"
        if depth == 0:
            return i + 1
    return len(text)


def parse_hlo(text: str) -> tuple[str, dict, dict]:
    """Compiled HLO text -> (module name, {instruction name: Instruction},
    {computation name: [instruction names]})."""
    module = re.match(r"HloModule ([\w.\-]+)", text)
    instructions, computations, current = {}, {}, None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.endswith("{") and " = " not in stripped:
            current = stripped.removeprefix("ENTRY ").split(" ")[0].lstrip("%")
            computations[current] = []
            continue
        m = re.match(r"(?:ROOT )?%?([\w.\-]+) = ", stripped)
        if not m or current is None:
            continue
        rest = stripped[m.end():]
        shape_end = _balanced(rest, 0) if rest.startswith("(") else rest.index(" ")
        shape, rest = rest[:shape_end], rest[shape_end:].lstrip()
        paren = rest.find("(")
        if paren < 0:
            continue
        operands_end = _balanced(rest, paren)
        op_name = re.search(r'op_name="((?:[^"\\]|\\.)*)"', rest)
        instructions[m.group(1)] = Instruction(
            name=m.group(1), shape=shape, opcode=rest[:paren],
            operands=re.findall(r"%([\w.\-]+)", rest[paren:operands_end]),
            attributes=rest[operands_end:], op_name=op_name.group(1) if op_name else "")
        computations[current].append(m.group(1))
    return (module.group(1) if module else ""), instructions, computations


def _dims(shape: str) -> list[int]:
    """The dimensions of the first array in an HLO shape ("f32[8,65,256]{2,1,0}", or a tuple)."""
    m = re.search(r"[a-z]\w*\[([\d,]*)\]", shape)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def _contracting_and_batched(instr: Instruction) -> tuple[list[int], bool]:
    """A dot's lhs contracting dimensions and whether it has batch dimensions (HLO attributes,
    or the dot_dimension_numbers of a GEMM custom call's backend_config)."""
    a = instr.attributes
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", a) or re.search(
        r'"lhs_contracting_dimensions":\[([^\]]*)\]', a)
    batch = re.search(r"lhs_batch_dims=\{([\d,]*)\}", a) or re.search(r'"lhs_batch_dimensions":\[([^\]]*)\]', a)
    dims = [int(d.strip('" ')) for d in contracting.group(1).split(",") if d.strip('" ')] if contracting else []
    return dims, bool(batch and batch.group(1).strip())


def dot_flops(instr: Instruction, instructions: dict) -> float | None:
    """2 · output elements · contracted size; None where the shapes cannot be read."""
    contracting, _ = _contracting_and_batched(instr)
    lhs = instructions.get(instr.operands[0]) if instr.operands else None
    if lhs is None or not contracting:
        return None
    lhs_dims = _dims(lhs.shape)
    if max(contracting) >= len(lhs_dims):
        return None
    return 2.0 * math.prod(_dims(instr.shape)) * math.prod(lhs_dims[d] for d in contracting)


def _target(instr: Instruction) -> str:
    m = re.search(r'custom_call_target="([^"]*)"', instr.attributes)
    return m.group(1).lower() if m else ""


def _is_dot(instr: Instruction) -> bool:
    return instr.opcode in ("dot", "convolution") or (
        instr.opcode == "custom-call" and any(t in _target(instr) for t in GEMM_TARGETS))


# --- categories --------------------------------------------------------------------------------

def scope(op_name: str) -> str | None:
    """"model:<path>", "loss", "optimizer", or None (no jax op_name)."""
    m = re.search(r"jvp\(([^)]*)\)", op_name)
    if m and m.group(1):
        return "model:" + op_name[m.end():]
    if m:
        return "loss"
    return "optimizer" if op_name.startswith("jit(") else None


def _segments(path: str) -> list[str]:
    return [s.lower() for s in path.split("/")]


def _is_norm(segment: str) -> bool:
    return segment.startswith("ln") or "norm" in segment


def _is_attention(segment: str) -> bool:
    return "attn" in segment or "attention" in segment


def matmul_category(op_name: str, batched: bool) -> str:
    s = scope(op_name) or ""
    if not s.startswith("model:"):
        return "matmul: other"
    segments = _segments(s)
    if "mlp" in segments:
        return "matmul: MLP"
    if any(_is_attention(x) and not _is_norm(x) for x in segments):
        return "matmul: attention scores" if batched else "matmul: attention projections"
    return "matmul: other"


def elementwise_category(op_name: str) -> str | None:
    s = scope(op_name)
    if s is None or not s.startswith("model:"):
        return s
    segments = _segments(s)
    if any(_is_norm(x) for x in segments):
        return "normalisation"
    if any(_is_attention(x) for x in segments):
        return "attention: elementwise"
    return "MLP activation" if "mlp" in segments else "elementwise: other"


class Attribution:
    """HLO instruction name -> (category, matmul FLOPs) for one compiled program."""

    def __init__(self, hlo_text: str):
        self.module, self.instructions, self.computations = parse_hlo(hlo_text)
        self._cache = {}

    def _inside(self, instr: Instruction) -> list[Instruction]:
        """The instruction and everything in the computations it fuses (recursively)."""
        found, stack = [], [instr]
        while stack:
            i = stack.pop()
            found.append(i)
            if i.opcode == "fusion" or i.opcode == "custom-call":
                for called in re.findall(r"(?:calls|called_computations)=\{?%?([\w.\-]+)", i.attributes):
                    stack.extend(self.instructions[n] for n in self.computations.get(called, ()))
        return found

    def category(self, hlo_op: str) -> tuple[str, float]:
        if hlo_op not in self._cache:
            instr = self.instructions.get(hlo_op)
            self._cache[hlo_op] = self._categorise(instr) if instr else ("unattributed", 0.0)
        return self._cache[hlo_op]

    def _categorise(self, instr: Instruction) -> tuple[str, float]:
        inside = self._inside(instr)
        opcodes = {i.opcode.removesuffix("-start").removesuffix("-done") for i in inside} - {"fusion"}
        if opcodes & set(COLLECTIVES) or any("nccl" in _target(i) for i in inside):
            return "communication", 0.0
        if any(t in _target(i) for i in inside for t in FUSED_ATTENTION_TARGETS):
            return "attention: fused kernel", 0.0
        dots = [i for i in inside if _is_dot(i)]
        if dots:
            flops = [dot_flops(d, self.instructions) or 0.0 for d in dots]
            main = dots[flops.index(max(flops))]
            return matmul_category(main.op_name or instr.op_name, _contracting_and_batched(main)[1]), sum(flops)
        if opcodes <= LAYOUT_OPS:
            return "copies/transposes", 0.0
        votes = collections.Counter(
            c for i in inside if i.opcode not in LAYOUT_OPS and (c := elementwise_category(i.op_name)))
        return (votes.most_common(1)[0][0] if votes else self._from_operands(instr)), 0.0

    def _from_operands(self, instr: Instruction, depth: int = 3) -> str:
        """An op XLA made up (no op_name): the category of the nearest operand that has one."""
        frontier = [instr]
        for _ in range(depth):
            frontier = [self.instructions[n] for i in frontier for n in i.operands if n in self.instructions]
            for i in frontier:
                if c := elementwise_category(i.op_name):
                    return c
        return "unattributed"


# --- the trace -----------------------------------------------------------------------------------

@dataclasses.dataclass
class OpTime:
    hlo_op: str | None  # None: the event names no HLO op
    module: str | None
    name: str
    seconds: float  # exclusive of nested op events on the same line


def _stats(event) -> dict:
    return {k: v for k, v in event.stats if k is not None}


def _exclusive(events: list) -> list[OpTime]:
    """[(start_ns, end_ns, OpTime)] on one line -> OpTimes minus the time of events nested in them."""
    events.sort(key=lambda e: (e[0], -e[1]))
    stack = []
    for start, end, op in events:
        while stack and stack[-1][1] <= start:
            stack.pop()
        if stack:
            stack[-1][2].seconds -= (end - start) / 1e9
        stack.append((start, end, op))
    return [op for _, _, op in events]


def op_times(xspace_path: str) -> tuple[list[OpTime], str]:
    """Every op execution in a trace -> (OpTimes, "device" or "host"): device streams where
    the trace has an accelerator, else the host threads' XLA thunks."""
    from jax.profiler import ProfileData

    planes = list(ProfileData.from_file(xspace_path).planes)
    device = [p for p in planes if p.name.startswith("/device:") and "CPU" not in p.name]
    ops = []
    for plane in device or [p for p in planes if p.name.startswith("/host:CPU")]:
        lines = list(plane.lines)
        # Derived lines (XLA Modules, XLA Ops, Steps) repeat the streams' time; keep every
        # line only if this trace names none "Stream".
        streams = [line for line in lines if line.name.startswith("Stream")]
        for line in streams or lines:
            events = []
            for e in line.events:
                s = _stats(e)
                if not device and "hlo_op" not in s:
                    continue  # host threads: only XLA's op thunks, not Python or runtime events
                hlo_op, module = (str(s[k]) if s.get(k) is not None else None for k in ("hlo_op", "hlo_module"))
                op = OpTime(hlo_op, module, e.name, e.duration_ns / 1e9)
                events.append((e.start_ns, e.start_ns + e.duration_ns, op))
            ops += _exclusive(events)
    return ops, "device" if device else "host"


def summarise(ops: list[OpTime], attribution: Attribution, steps: int) -> tuple[dict, list[dict]]:
    """-> ({category: {"seconds", "flops"}} per step, the costliest ops)."""
    totals = {c: {"seconds": 0.0, "flops": 0.0} for c in CATEGORIES}
    per_op = collections.defaultdict(lambda: {"seconds": 0.0, "count": 0})
    unattributed = collections.Counter()
    for op in ops:
        ours = op.hlo_op is not None and op.module in (None, attribution.module)
        if ours:
            category, flops = attribution.category(op.hlo_op)
        elif op.hlo_op is None and re.match(r"mem(cpy|set)", op.name, re.IGNORECASE):
            category, flops = "copies/transposes", 0.0
        else:
            category, flops = "unattributed", 0.0
        if category == "unattributed":
            unattributed[f"{op.module or '-'}:{op.hlo_op or op.name}"] += op.seconds / steps
        totals[category]["seconds"] += op.seconds / steps
        totals[category]["flops"] += flops / steps
        key = op.hlo_op or op.name
        per_op[key]["seconds"] += op.seconds / steps
        per_op[key]["count"] += 1
        per_op[key]["category"] = category
        if ours and op.hlo_op in attribution.instructions:
            per_op[key]["op_name"] = attribution.instructions[op.hlo_op].op_name
    totals["unattributed"]["names"] = [n for n, _ in unattributed.most_common(10)]
    top = sorted(({"op": k, **v} for k, v in per_op.items()), key=lambda r: -r["seconds"])[:40]
    return totals, top


def rows(totals: dict, peak_tflops: float | None) -> list[dict]:
    total = sum(t["seconds"] for t in totals.values()) or 1.0
    out = []
    for category in CATEGORIES:
        t = totals[category]
        row = {"name": "profile", "category": category, "seconds_per_step": t["seconds"], "share": t["seconds"] / total}
        if category.startswith("matmul") and t["seconds"] > 0:
            row["gflop_per_step"] = t["flops"] / 1e9
            row["tflops"] = t["flops"] / t["seconds"] / 1e12
            if peak_tflops:
                row["fraction_of_peak"] = row["tflops"] / peak_tflops
        if t.get("names"):
            row["names"] = t["names"]
        out.append(row)
    return out


def table(category_rows: list[dict], total: dict) -> str:
    lines = [f"{total['model']}, batch {total['batch_size']}, {total['device']}: step {total['step_seconds'] * 1e3:.1f} ms "
             f"(traced {total['traced_step_seconds'] * 1e3:.1f} ms), op time {total['op_seconds_per_step'] * 1e3:.1f} ms "
             f"per step from {total['source']} events",
             "", "| category | ms per step | share | TFLOP/s | of peak |", "|---|---:|---:|---:|---:|"]
    for r in category_rows:
        tflops = f"{r['tflops']:.3g}" if "tflops" in r else ""
        peak = f"{r['fraction_of_peak']:.0%}" if "fraction_of_peak" in r else ""
        lines.append(f"| {r['category']} | {r['seconds_per_step'] * 1e3:.2f} | {r['share']:.1%} | {tflops} | {peak} |")
    return "\n".join(lines)


# --- the step ----------------------------------------------------------------------------------

def traced_step(config, steps: int, trace_dir: str):
    """Build the trainer's step as mmjax.benchmarks.step does, time it, then trace `steps`
    calls. -> (compiled HLO text, median step seconds untraced, traced, analytic FLOPs)."""
    import flax.linen as nn
    import jax

    from mmjax import train
    from mmjax.data import pipeline
    from mmjax.parallel import sharding
    from mmjax.tools import flops

    parts = train.build_components(config, tempfile.mkdtemp() + "/tokenizer.model")
    batch = next(pipeline.train_iterator(config.data, parts.tokenizer, config.batch_size, config.seed))
    with jax.set_mesh(parts.mesh), nn.logical_axis_rules(parts.rules):
        state, _ = train.build_state(parts.model, parts.tx, config, parts.mesh, parts.rules)
        batch = pipeline.to_global({k: batch[k] for k in ("image", "tokens")}, sharding.batch_sharding(parts.mesh))
        compiled = jax.jit(parts.train_step(config)).lower(state, batch).compile()

        def timed() -> float:
            start = time.perf_counter()
            jax.block_until_ready(compiled(state, batch))
            return time.perf_counter() - start

        timed()  # warm-up: first-call allocations stay out of the trace
        untraced = statistics.median(timed() for _ in range(steps))
        with jax.profiler.trace(trace_dir):
            traced = statistics.median(timed() for _ in range(steps))
    return compiled.as_text(), untraced, traced, flops.train_step_flops(config, parts.tokenizer.vocab_size)


def profile(config, steps: int = 3, peak_tflops: float | None = None, trace_dir: str | None = None):
    """-> (category rows, total row, costliest ops) for `steps` traced train steps of `config`."""
    import jax

    trace_dir = trace_dir or tempfile.mkdtemp(prefix="mmjax_profile_")
    hlo, untraced, traced, analytic = traced_step(config, steps, trace_dir)
    xspace = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
    ops, source = op_times(xspace)
    totals, top = summarise(ops, Attribution(hlo), steps)
    category_rows = rows(totals, peak_tflops)
    total = {
        "name": "profile_total", "model": config.model.name, "batch_size": config.batch_size,
        "dtype": config.model.dtype, "attention": config.model.get("attention"), "steps": steps,
        "device": jax.devices()[0].device_kind, "jax": jax.__version__, "source": source,
        "step_seconds": untraced, "traced_step_seconds": traced,
        "op_seconds_per_step": sum(t["seconds"] for t in totals.values()),
        "analytic_tflops": analytic / untraced / 1e12, "peak_tflops": peak_tflops,
        "mfu": analytic / untraced / 1e12 / peak_tflops if peak_tflops else None, "trace_dir": trace_dir,
    }
    return category_rows, total, top


def main():
    # Flags are defined here, not at import: the tests import this module into processes
    # where mmjax.main (or another benchmark) has already defined --config and --steps.
    config_flag = config_flags.DEFINE_config_file("config", None, "Config file.")
    steps = flags.DEFINE_integer("steps", 3, "Traced steps (after one warm-up and `steps` untraced timed steps).")
    out = flags.DEFINE_string("out", None, "Directory for profile.jsonl, profile.md, top_ops.jsonl (and the trace).")
    peak_flag = flags.DEFINE_float("peak_tflops", None,
                                   "Per-device peak for fractions of peak (default: config.peak_tflops).")
    cuda_graphs = flags.DEFINE_bool("cuda_graphs", False,
                                    "Keep XLA's CUDA graphs (their kernels are then unattributed).")

    def run(argv):
        del argv
        xla_flags = os.environ.get("XLA_FLAGS", "")
        if not cuda_graphs.value and "command_buffer" not in xla_flags:  # before the backend starts
            os.environ["XLA_FLAGS"] = (xla_flags + " --xla_gpu_enable_command_buffer=").strip()
        config = config_flag.value
        peak = peak_flag.value or config.get("peak_tflops")
        trace_dir = os.path.join(out.value, "trace") if out.value else None
        category_rows, total, top = profile(config, steps.value, peak, trace_dir)
        for row in (*category_rows, total):
            print(json.dumps(row))
        print("\n" + table(category_rows, total))
        if out.value:
            os.makedirs(out.value, exist_ok=True)
            with open(os.path.join(out.value, "profile.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in (*category_rows, total))
            with open(os.path.join(out.value, "profile.md"), "w") as f:
                f.write(table(category_rows, total) + "\n")
            with open(os.path.join(out.value, "top_ops.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in top)

    app.run(run)


if __name__ == "__main__":
    main()
