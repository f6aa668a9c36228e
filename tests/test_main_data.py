"""The trainer on real files through the command line: CSV, webdataset and tfds sources,
exact resume after SIGKILL, bad records counted, mostly-bad data stopped, one-line errors."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from mmjax.data.sources.base import SKIP_REASONS
from tests import data_builders
from tests.test_main import mmjax_main, single_error_line

# A tiny CLIP on 32-px images: a step takes well under a second.
TINY_CLIP = [
    "--config=configs/clip.py",
    "--config.batch_size=8",
    "--config.data.image_size=32",
    "--config.data.text_len=16",
    "--config.data.vocab_size=60",
    "--config.data.num_eval=16",
    "--config.eval.batch_size=8",
    "--config.model.vision.depth=1",
    "--config.model.text.depth=1",
    "--config.objective.contrastive.options.block_size=8",
    "--config.log_every=1",
]


def steps_args(total, checkpoint_every=100, eval_every=100):
    return [f"--config.total_steps={total}", f"--config.checkpoint_every={checkpoint_every}",
            f"--config.eval_every={eval_every}"]


def rows(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    tfds_dir = root / "tfds"
    data_builders.prepare_tfds(str(tfds_dir))
    specs = {
        "csv_train": "csv:" + data_builders.write_table(root / "table", 40),
        "csv_val": "csv:" + data_builders.write_table(root / "table", 16, offset=1000),
        "wds": "wds:" + data_builders.write_tars(root / "wds", shards=4, per_shard=10),
        "parquet": "parquet:" + data_builders.write_parquet(root / "parquet", files=2, per_file=12),
        "tfds": "tfds:coco_captions",
        "folder": "folder:" + data_builders.write_folders(root / "folder", per_class=4),
        "shapes": "shapes",
        "tfds_dir": str(tfds_dir),
        "bad": "wds:" + data_builders.write_bad_tars(root / "bad")[0],
        "mostly_bad": "wds:" + data_builders.write_mostly_bad_tars(root / "mostly_bad"),
    }
    specs["mixture"] = f"{specs['csv_train']}@0.5,{specs['wds']}@0.3,{specs['tfds']}@0.2"
    return specs


def test_clip_trains_on_csv_and_evaluates_retrieval_on_held_out_csv(data, tmp_path):
    result = mmjax_main(*TINY_CLIP, *steps_args(3), f"--workdir={tmp_path}",
                        f"--config.data.train={data['csv_train']}", f"--config.data.eval={data['csv_val']}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "retrieval/image_to_text_r@1" in result.stdout and "zeroshot/top1" not in result.stdout
    assert "note: evals.zeroshot (zeroshot) does not run: " in result.stdout  # a CSV has no classes
    final = rows(tmp_path)[-1]
    assert final["step"] == 3 and "eval/retrieval/text_to_image_r@5" in final
    assert (tmp_path / "tokenizer.model").exists()  # trained on the CSV's captions


def test_zero_shot_on_a_folder_classification_set(data, tmp_path):
    """folder: gives class names, so the held-out evaluation adds zero-shot over its classes."""
    result = mmjax_main(*TINY_CLIP, *steps_args(2), f"--workdir={tmp_path}", f"--config.data.train={data['csv_train']}",
                        f"--config.data.eval={data['folder']}")
    assert result.returncode == 0, result.stderr[-3000:]
    table = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines() if line.startswith("  zeroshot")}
    assert table["zeroshot/top1"][1] == "0.250"  # chance: 4 colour classes


@pytest.mark.parametrize("source", ["wds", "tfds"])
def test_trains_on_webdataset_and_tfds(data, source, tmp_path):
    spec = data[source]
    result = mmjax_main(*TINY_CLIP, *steps_args(2), f"--workdir={tmp_path}", f"--config.data.train={spec}",
                        f"--config.data.eval={data['csv_val']}", f"--config.data.tfds_data_dir={data['tfds_dir']}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in rows(tmp_path) if "loss" in r] == [1, 2]


@pytest.mark.parametrize("source,workers", [("csv_train", 0), ("mixture", 2)])
def test_sigkill_then_rerun_continues_exactly(data, source, workers, tmp_path):
    """Killed after the step-3 checkpoint, the re-run's losses equal an uninterrupted run's at
    every later step (same batches, same model). The mixture adds streams (window shuffle and
    interleave), tfds and grain's worker processes. tests/test_pipeline.py compares the batches
    themselves for every source with 0 and 2 workers, so the trainer's part is tested here on
    these two only (each costs three runs)."""
    args = [*TINY_CLIP, *steps_args(6, checkpoint_every=3), f"--config.data.train={data[source]}",
            f"--config.data.eval={data['csv_val']}", f"--config.data.worker_count={workers}",
            "--config.data.shuffle_buffer=16", f"--config.data.tfds_data_dir={data['tfds_dir']}"]
    reference = mmjax_main(*args, f"--workdir={tmp_path / 'reference'}")
    assert reference.returncode == 0, reference.stderr[-3000:]

    workdir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "mmjax.main", *args, f"--workdir={workdir}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (
        (workdir / "checkpoints" / "3").is_dir() and any(r["step"] >= 4 for r in _safe_rows(workdir))
    ):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # a crashed machine: the data workers die with the trainer
    proc.wait(timeout=60)
    resumed = mmjax_main(*args, f"--workdir={workdir}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from step 3" in resumed.stdout
    losses = lambda w: {r["step"]: r["loss"] for r in rows(w) if "loss" in r}
    assert losses(workdir) == losses(tmp_path / "reference")


def _safe_rows(workdir):
    try:
        return rows(workdir)
    except (OSError, json.JSONDecodeError):
        return []


def test_bad_records_are_skipped_counted_and_training_finishes(data, tmp_path):
    result = mmjax_main(*TINY_CLIP, *steps_args(12), f"--workdir={tmp_path}", f"--config.data.train={data['bad']}",
                        f"--config.data.eval={data['csv_val']}", "--config.data.max_image_pixels=10000",
                        "--config.data.max_bad_fraction=0.6", "--config.data.cycle_length=1",
                        "--config.data.shuffle_buffer=1")
    assert result.returncode == 0, result.stderr[-3000:]
    final = [r for r in rows(tmp_path) if "loss" in r][-1]
    assert final["step"] == 12
    # 12 steps × 8 = 96 good records: more than six whole passes over the 14 good ones (one
    # shard at a time, no window shuffle), so every kind of bad record was met six times.
    for reason, per_pass in data_builders.BAD_TAR_SKIPS.items():
        assert 6 * per_pass <= final[f"data/skipped/{reason}"] <= 7 * per_pass, reason
    assert set(k.split("/")[-1] for k in final if k.startswith("data/skipped/")) == set(SKIP_REASONS)
    assert "skipped" in result.stdout and "not_an_image" in result.stdout


def test_mostly_bad_data_stops_with_a_clear_error(data, tmp_path):
    line = single_error_line(mmjax_main(*TINY_CLIP, *steps_args(8), f"--workdir={tmp_path}",
                                        f"--config.data.train={data['mostly_bad']}",
                                        f"--config.data.eval={data['csv_val']}"))
    assert "not_an_image" in line and "max_bad_fraction=0.3" in line and "'0000" in line  # an example key


@pytest.mark.parametrize("override,expected", [
    ("--config.data.train=laion:/data", ["unknown data source scheme 'laion'", "wds:", "csv:"]),
    ("--config.data.train=wds:/nowhere/{00000..00009}.tar", ["matches no file", "/nowhere/"]),
    ("--config.data.train=csv:TABLE", ["no field", "--config.data.image_key"]),
    ("--config.data.train=tfds:coco_captions", ["not prepared", "download_and_prepare", "--config.data.tfds_data_dir"]),
    ("--config.data.tokenizer=/nowhere/spm.model", ["/nowhere/spm.model", "--config.data.tokenizer"]),
    ("--config.data.eval=wds:/nowhere/{0..3}.tar", ["matches no file", "/nowhere/"]),
    ("--config.evals.retrieval.data=tfds:cifar10:test", ["not prepared", "--config.data.tfds_data_dir"]),
])
def test_bad_data_input_is_one_line(override, expected, tmp_path):
    table = tmp_path / "bad.csv"
    table.write_text("url,text\nx.jpg,a caption\n")
    empty_tfds = tmp_path / "empty_tfds"
    empty_tfds.mkdir()
    line = single_error_line(mmjax_main(*TINY_CLIP, f"--workdir={tmp_path / 'run'}", override.replace("TABLE", str(table)),
                                        f"--config.data.tfds_data_dir={empty_tfds}"))
    for text in expected:
        assert text in line, line
    assert not (tmp_path / "run").exists()  # found before anything was written
