"""Run outputs: metrics.jsonl (one JSON object per logged step), TensorBoard events, curves.png."""
from __future__ import annotations

import importlib
import io
import json
import math
import sys

from etils import epath

from mmjax import epath_io


def _tensorboardx_without_torch():
    """tensorboardX imports torch whenever it is installed (1.4 s of every start, to accept torch
    tensors); we log Python floats. Unless this program already loaded torch, a None entry in
    sys.modules makes its `import torch` fail, as if torch were not installed."""
    if "torch" in sys.modules:
        return importlib.import_module("tensorboardX")
    sys.modules["torch"] = None
    try:
        return importlib.import_module("tensorboardX")
    finally:
        del sys.modules["torch"]


tensorboardX = _tensorboardx_without_torch()


class MetricsWriter:
    """Appends to `workdir/metrics.jsonl`; on resume drops rows logged after `start_step`.

    Those rows belong to steps the resumed run is about to redo, so keeping them would
    duplicate steps in the history. `primary=False` (every process but the first of a
    multi-host run) writes nothing: one history per run. A remote workdir (gs://...) cannot be
    appended to: there each write rewrites the whole file from the rows kept in memory.
    """

    def __init__(self, workdir: str, start_step: int = 0, primary: bool = True):
        self.primary = primary
        self.path = epath.Path(workdir) / "metrics.jsonl"
        self.curves_path = epath.Path(workdir) / "curves.png"
        self.rows = []
        if not primary:
            return
        self.rows = [r for r in read_jsonl(self.path) if r["step"] <= start_step]
        self._rewrite()
        self._tb = tensorboardX.SummaryWriter(str(epath.Path(workdir) / "tensorboard"))

    def _rewrite(self) -> None:
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))

    def write(self, step: int, values: dict) -> None:
        if not self.primary:
            return
        row = {"step": int(step), **{k: _json_number(v) for k, v in values.items()}}
        self.rows.append(row)
        if epath_io.is_remote(self.path):
            self._rewrite()
        else:
            with self.path.open("a") as f:
                f.write(json.dumps(row, allow_nan=False) + "\n")
        for key, value in row.items():
            if key != "step" and value is not None:  # TensorBoard has no null: a skipped step is a gap
                self._tb.add_scalar(key, value, int(step))
        self._tb.flush()

    def plot(self) -> None:
        if self.primary:
            plot_curves(self.rows, self.curves_path)

    def close(self) -> None:
        if self.primary:
            self._tb.close()


def _json_number(value) -> float | None:
    """NaN and ±inf are not JSON: a skipped (non-finite) step logs null."""
    value = float(value)
    return value if math.isfinite(value) else None


def read_jsonl(path) -> list[dict]:
    path = epath.Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# Throughput (mmjax.throughput.LogWindow) stays in metrics.jsonl and TensorBoard: a panel per
# rate would crowd the losses out of curves.png.
_NOT_PLOTTED = ("step", "examples_per_sec", "step_seconds", "tflops_per_device", "mfu", "data_wait")
_SECOND_AXIS_ABOVE = 1.5  # an evaluator's metric whose values exceed this goes on a right-hand axis


def panels(keys) -> list[tuple[str, list[str]]]:
    """The layout of curves.png: (title, keys) per panel, in order.

    Training keys get a panel each, `loss` first, then the other losses, then the rest
    alphabetically; `step` and the throughput keys are not plotted. Then evaluation keys in
    the order given: `eval/<evaluator>/<metric>` keys share ONE panel per evaluator, titled
    with its name; an older run's two-part `eval/<metric>` gets a panel of its own.
    """
    keys = [k for k in dict.fromkeys(keys) if k not in _NOT_PLOTTED]
    training = sorted((k for k in keys if not k.startswith("eval/")),
                      key=lambda k: (k != "loss", "loss" not in k, k))
    layout = [(k, [k]) for k in training]
    groups: dict[str, list[str]] = {}
    for key in (k for k in keys if k.startswith("eval/")):
        parts = key.split("/", 2)
        if len(parts) < 3 or not parts[1] or not parts[2]:
            layout.append((key, [key]))
        elif parts[1] in groups:
            groups[parts[1]].append(key)
        else:
            groups[parts[1]] = [key]
            layout.append((parts[1], groups[parts[1]]))
    return layout


def plot_curves(rows: list[dict], path) -> None:
    """One panel per training metric, then one per evaluator (see `panels`).

    An evaluator's panel has a line per metric and a legend. Metrics on a larger scale than
    the rest of their panel (any value above 1.5, e.g. CIDEr, next to recalls and accuracies
    in [0, 1]) are drawn dashed against a second y-axis on the right, so neither flattens the
    other; a panel whose metrics are all on one scale has a single axis. `path` may be a URL;
    a local file is written atomically (epath_io.write_atomic).
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on training machines
    import matplotlib.pyplot as plt

    layout = panels(_ordered_keys(rows))
    if not layout:
        return
    cols = min(4, len(layout))
    rows_n = math.ceil(len(layout) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 3 * rows_n), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, layout):
        ax.set_title(title)
        series = {k: [(r["step"], r[k]) for r in rows if r.get(k) is not None] for k in keys}
        large = {k for k, pts in series.items() if pts and max(abs(v) for _, v in pts) > _SECOND_AXIS_ABOVE}
        evaluator = title not in keys  # an evaluator's panel: its metrics, named in a legend
        right = ax.twinx() if large and len(large) < len(keys) else None
        lines = []
        for i, (key, points) in enumerate(series.items()):
            label = key.split("/", 2)[2] if evaluator else key
            target, style = (right, "--") if right is not None and key in large else (ax, "-")
            if right is not None and key in large:
                label += " (right axis)"
            xs, ys = zip(*points) if points else ((), ())
            lines += target.plot(xs, ys, style, color=f"C{i}", label=label,
                                 marker="." if len(points) < 20 else None)
        if evaluator:
            ax.legend(handles=lines, fontsize="small")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(layout):]:
        ax.axis("off")
    fig.tight_layout()
    png = io.BytesIO()
    try:
        fig.savefig(png, format="png", dpi=80)
    finally:
        plt.close(fig)
    epath_io.write_atomic(path, png.getvalue())


def _ordered_keys(rows):
    """Every key of `rows`, in the order they first appear."""
    seen = {}
    for r in rows:
        for k in r:
            seen.setdefault(k, None)
    return list(seen)
