"""Run outputs: metrics.jsonl (one JSON object per logged step), TensorBoard events, curves.png."""
from __future__ import annotations

import json
import math
import os

import tensorboardX


class MetricsWriter:
    """Appends to `workdir/metrics.jsonl`; on resume drops rows logged after `start_step`.

    Those rows belong to steps the resumed run is about to redo, so keeping them would
    duplicate steps in the history.
    """

    def __init__(self, workdir: str, start_step: int = 0):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.rows = [r for r in read_jsonl(self.path) if r["step"] <= start_step]
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.rows)
        self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))
        self.curves_path = os.path.join(workdir, "curves.png")

    def write(self, step: int, values: dict) -> None:
        row = {"step": int(step), **{k: _json_number(v) for k, v in values.items()}}
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")
        for key, value in row.items():
            if key != "step" and value is not None:  # TensorBoard has no null: a skipped step is a gap
                self._tb.add_scalar(key, value, int(step))
        self._tb.flush()

    def plot(self) -> None:
        plot_curves(self.rows, self.curves_path)

    def close(self) -> None:
        self._tb.close()


def _json_number(value) -> float | None:
    """NaN and ±inf are not JSON: a skipped (non-finite) step logs null."""
    value = float(value)
    return value if math.isfinite(value) else None


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(rows: list[dict], path: str) -> None:
    """One panel per metric: training losses first, then evaluation results."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on training machines
    import matplotlib.pyplot as plt

    keys = [k for k in _ordered_keys(rows) if k not in ("step", "examples_per_sec")]
    if not keys:
        return
    cols = min(4, len(keys))
    rows_n = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 3 * rows_n), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        ax.set_title(key)
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), marker="." if len(points) < 20 else None)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _ordered_keys(rows):
    seen = {}
    for r in rows:
        for k in r:
            seen.setdefault(k, None)
    return sorted(seen, key=lambda k: (k.startswith("eval/"), k))
