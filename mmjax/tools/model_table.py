"""Regenerate the model table of docs/models.md from every config's summary.

    python -m mmjax.tools.model_table            # rewrites the table in docs/models.md
    python -m mmjax.tools.model_table --print    # prints it instead

Every `configs/*.py` and each of its VARIANTS gets one row (mmjax.tools.summary). Only the
text between the two markers below is replaced; the rest of the document is prose.
"""
from __future__ import annotations

import glob
import sys

from mmjax.configs import load_config, variants
from mmjax.tools import summary

BEGIN, END = "<!-- model-table:begin -->", "<!-- model-table:end -->"
DOC = "docs/models.md"
COLUMNS = (
    "config", "image px / patch", "context", "vocab", "image params", "text params", "decoder params",
    "total params", "GFLOP / train example", "activations MiB / example",
)


def row(name: str, s: dict) -> list[str]:
    towers = summary.tower_counts(s)
    return [
        f"`{name}`",
        f"{s['image_size']} / {s['patch_size']}",
        str(s["context_length"]),
        f"{s['vocab_size']:,}",
        summary.millions(towers["image"]),
        summary.millions(towers["text"]),
        summary.millions(towers["decoder"]) if "decoder" in towers else "–",
        summary.millions(s["params_total"]),
        f"{s['train_flops_per_example'] / 1e9:,.2f}",
        f"{s['activation_bytes_per_example'] / 2**20:,.1f} ({s['dtype']}, remat {s['remat']})",
    ]


def table(paths) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for path in paths:
        for variant in variants(path):
            name = f"{path}:{variant}" if variant else path
            lines.append("| " + " | ".join(row(name, summary.summarize(load_config(path, variant)))) + " |")
    return "\n".join(lines)


def config_files() -> list[str]:
    order = {"configs/coca.py": 0, "configs/clip.py": 1, "configs/siglip.py": 2}  # the paper order; then the rest
    return sorted(glob.glob("configs/*.py"), key=lambda p: (order.get(p, len(order)), p))


def main(argv) -> None:
    text = table(config_files())
    if "--print" in argv:
        print(text)
        return
    with open(DOC) as f:
        doc = f.read()
    if BEGIN not in doc or END not in doc:
        sys.exit(f"error: {DOC} lacks the markers {BEGIN} ... {END}; add them where the table goes")
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(DOC, "w") as f:
        f.write(f"{head}{BEGIN}\n{text}\n{END}{tail}")
    print(f"wrote the table of {len(text.splitlines()) - 2} configs to {DOC}")


if __name__ == "__main__":
    main(sys.argv[1:])
