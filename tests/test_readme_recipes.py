"""README's "Train on your own data" recipes, run as written on tiny data built here.

Each recipe's commands run verbatim except for: `pip install ...` lines (one-time preparation
that needs the network; the tiny data stands in for what they would produce), the data
paths (pointed at the tiny data), and overrides appended to `mmjax.main` that shrink the
model, the run and the tokenizer's vocabulary to what tiny data allows (later flags win).
"""
import json
import re
import shlex
import subprocess
import sys

import pytest

from tests import data_builders

SHRINK = {
    "common": ["--config.total_steps=2", "--config.batch_size=8", "--config.eval.batch_size=8",
               "--config.data.num_eval=16", "--config.log_every=1", "--config.eval_every=100",
               "--config.checkpoint_every=100", "--config.data.image_size=32", "--config.model.vision.patch_size=8",
               "--config.model.embed_dim=32", "--config.model.vision.width=32", "--config.model.vision.depth=1",
               "--config.model.vision.mlp_dim=64", "--config.model.vision.heads=2", "--config.model.text.width=32",
               "--config.model.text.mlp_dim=64", "--config.model.text.heads=2", "--config.objective.contrastive.options.block_size=8",
               "--config.data.text_len=16"],
    "clip": ["--config.model.text.depth=1"],
    "coca": ["--config.model.text.unimodal_depth=1", "--config.model.text.multimodal_depth=1",
             "--config.model.caption_queries=4"],
}


def recipe(name: str) -> list[str]:
    text = open("README.md").read()
    block = re.search(rf"<!-- recipe: {name} -->.*?```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    mine = root / "mine"
    train = data_builders.write_table(mine, 32)
    val = data_builders.write_table(mine, 16, offset=1000)
    (mine / "train.csv").write_text(open(train).read())
    (mine / "val.csv").write_text(open(val).read())
    data_builders.prepare_tfds(str(root / "tfds"))
    tars = data_builders.write_tars(root / "cc3m", shards=4, per_shard=8)
    karpathy = write_karpathy_split(root / "coco")
    return {"/data/mine/": f"{mine}/", "/data/tfds": str(root / "tfds"),
            "/data/cc3m/{00000..00331}.tar": tars, "/data/coco_val/val.csv": str(mine / "val.csv"),
            "/data/karpathy/dataset_coco.json": karpathy, "/data/coco_karpathy_test.csv": str(root / "coco_test.csv"),
            "/data/coco": str(root / "coco"), "root": root}


def write_karpathy_split(directory) -> str:
    """dataset_coco.json's layout: 3 test images with 5 sentences each under val2014/, 1 train image."""
    (directory / "val2014").mkdir(parents=True)
    images = []
    for i, (key, data, caption, _) in enumerate(data_builders.examples(4)):
        (directory / "val2014" / f"{key}.jpg").write_bytes(data)
        images.append({"filepath": "val2014", "filename": f"{key}.jpg", "split": "test" if i < 3 else "train",
                       "sentences": [{"raw": f"{caption}, take {j}"} for j in range(5)]})
    path = directory / "dataset_coco.json"
    path.write_text(json.dumps({"images": images}))
    return str(path)


def run(line: str, tiny, extra=()):
    for path, replacement in tiny.items():
        if path.startswith("/data/"):
            line = line.replace(path, replacement)
    args = shlex.split(line)
    assert args[:2] == ["python", "-m"], line
    if args[2] in ("mmjax.main", "mmjax.evaluate"):
        workdir = tiny["root"] / re.search(r"--workdir=(\S+)", line).group(1)
        args = [a for a in args if not a.startswith("--workdir=")] + [f"--workdir={workdir}"]
    if args[2] == "mmjax.main":
        model = "coca" if "configs/coca.py" in line else "clip"
        args += [*SHRINK["common"], *SHRINK[model], *extra]
    elif args[2] == "mmjax.data.train_tokenizer":
        args += ["--vocab_size=60"]  # all that 32 tiny captions can make
    result = subprocess.run([sys.executable, *args[1:]], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize("name,extra", [
    ("csv", []),
    ("coco", ["--config.data.vocab_size=50"]),  # what 30 tiny captions can make
    # 4 tiny shards cannot feed the recipe's 8 workers; captions for 32k pieces neither.
    ("webdataset", ["--config.data.worker_count=2", "--config.data.vocab_size=60"]),
])
def test_recipe_runs_as_written(name, extra, tiny):
    lines = [line for line in recipe(name) if not line.startswith("pip install")]
    assert lines[-1].startswith("python -m mmjax.main")
    outputs = [run(line, tiny, extra) for line in lines]
    assert "Final held-out results" in outputs[-1] and "image_to_text_r@1" in outputs[-1]


def test_evaluate_recipe_runs_as_written(tiny):
    """On the COCO recipe's run (trained here first): a Karpathy-split CSV, then two benchmarks."""
    train = recipe("coco")[-1]
    if not (tiny["root"] / "runs" / "coco" / "checkpoints").exists():
        run(train, tiny, ["--config.data.vocab_size=50"])
    lines = recipe("evaluate")
    made, evaluated = (run(line, tiny) for line in lines)
    assert "3 images, 15 captions (test)" in made
    for metric in ("coco5k/image_to_text_r@1", "coco5k/text_to_image_r@10", "cifar10/top1"):
        assert metric in evaluated
    assert (tiny["root"] / "runs" / "coco" / "eval_2.json").exists()
