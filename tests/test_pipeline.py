"""The grain pipeline over every kind of source: exact resume (also with worker processes),
disjoint per-process shares, mixtures, the checkpointed state's fingerprint, bad records."""
import json
import sys

import jax
import numpy as np
import pytest
from absl import flags

from mmjax.configs import load_config
from mmjax.data import pipeline, skips
from mmjax.data.sources.base import SKIP_REASONS
from mmjax.errors import UserError
from tests import data_builders
from tests.helpers import assert_batches_equal, take

if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags
    flags.FLAGS(sys.argv[:1])


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    data_builders.prepare_tfds(str(root / "tfds"))
    TFDS_DIR.append(str(root / "tfds"))
    return {
        "tfds": "tfds:coco_captions",  # 5 captions per image: the caption drawn must resume too
        "shapes": "shapes",
        "csv": "csv:" + data_builders.write_table(root / "table", 24),
        "jsonl": "jsonl:" + data_builders.write_table(root / "table", 24, kind="jsonl", offset=100),
        "wds": "wds:" + data_builders.write_tars(root / "wds", shards=4, per_shard=6),
        "parquet": "parquet:" + data_builders.write_parquet(root / "parquet", files=2, per_file=10),
        "folder": "folder:" + data_builders.write_folders(root / "folder", per_class=5),
    }


TFDS_DIR = []


def data_config(train: str, **overrides):
    cfg = load_config("configs/clip.py").data
    cfg.update(dict(train=train, tfds_data_dir=TFDS_DIR[0] if TFDS_DIR else "", image_size=32, text_len=16, vocab_size=60, shuffle_buffer=8, cycle_length=2))
    cfg.augment.update(dict(crop="random_resized", flip=True))
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def tok(specs, tmp_path_factory):
    cfg = data_config(f"{specs['csv']}@1,{specs['shapes']}@1")
    return pipeline.make_tokenizer(cfg, str(tmp_path_factory.mktemp("tok") / "spm.model"))


MIXTURE = "mixture"


def train_spec(specs, name):
    return f"{specs['csv']}@0.5,{specs['wds']}@0.3,{specs['shapes']}@0.2" if name == MIXTURE else specs[name]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("name", ["shapes", "tfds", "csv", "jsonl", "wds", "parquet", "folder", MIXTURE])
def test_resume_is_exact(specs, tok, name, workers):
    """Stop after k batches (several epochs of these tiny sets), save the state as a checkpoint
    does (JSON), resume in a new iterator: the next batches are those of an uninterrupted run."""
    cfg = data_config(train_spec(specs, name), worker_count=workers)
    fp = pipeline.fingerprint(cfg, 4, seed=1)
    it = pipeline.train_iterator(cfg, tok, 4, seed=1)
    take(it, 7)
    saved = json.loads(json.dumps(pipeline.data_state(it, fp)))
    expected = take(it, 5)
    it.close()
    resumed = pipeline.train_iterator(cfg, tok, 4, seed=1)
    pipeline.restore_data_state(resumed, saved, fp)
    assert_batches_equal(take(resumed, 5), expected)
    resumed.close()


@pytest.mark.parametrize("name", ["tfds", "wds", MIXTURE])
def test_grain_checks_resume_at_every_step(specs, tok, name):
    import grain

    cfg = data_config(train_spec(specs, name), prefetch=0)
    ds = pipeline.train_dataset(cfg, tok, 2, seed=0)
    grain.experimental.assert_equal_output_after_checkpoint(grain.experimental.LimitIterDataset(ds, count=12))


@pytest.mark.parametrize("name", ["wds", MIXTURE])
def test_resume_twice_is_exact(specs, tok, name):
    """Resume, read on, checkpoint again inside the same shuffle window, resume again."""
    cfg = data_config(train_spec(specs, name), shuffle_buffer=64)
    fp = pipeline.fingerprint(cfg, 2, seed=0)
    it = pipeline.train_iterator(cfg, tok, 2, seed=0)
    take(it, 3)
    first = json.loads(json.dumps(pipeline.data_state(it, fp)))
    take(it, 2)
    expected = take(it, 4)
    it.close()
    resumed = pipeline.train_iterator(cfg, tok, 2, seed=0)
    pipeline.restore_data_state(resumed, first, fp)
    take(resumed, 2)
    second = json.loads(json.dumps(pipeline.data_state(resumed, fp)))
    resumed.close()
    again = pipeline.train_iterator(cfg, tok, 2, seed=0)
    pipeline.restore_data_state(again, second, fp)
    assert_batches_equal(take(again, 4), expected)
    again.close()


def test_batches_are_real_examples(specs, tok):
    cfg = data_config(specs["csv"])
    batch = next(pipeline.train_iterator(cfg, tok, 8, seed=0))
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.uint8
    texts = tok.decode(batch["tokens"])
    for image, text in zip(batch["image"], texts):
        colour = text.split()[1]  # "a red picture number 7"
        mean = image.reshape(-1, 3).mean(0)
        assert np.argmin(np.linalg.norm(np.array(list(data_builders.COLORS.values())) - mean, axis=1)) == list(
            data_builders.COLORS).index(colour), (text, mean)


def test_workers_change_nothing_but_speed_for_random_access(specs, tok):
    """Random access, one worker: the same examples as in-process (the index order and the
    per-example augmentation seeds do not depend on who computes them)."""
    cfg = data_config(specs["csv"], augment=dict(crop="center", flip=False))
    expected = take(pipeline.train_iterator(cfg, tok, 4, seed=0), 3)
    cfg.worker_count = 1
    it = pipeline.train_iterator(cfg, tok, 4, seed=0)
    assert_batches_equal(take(it, 3), expected)
    it.close()


def test_fingerprint_mismatch_stops_with_the_difference(specs, tok):
    cfg = data_config(specs["csv"])
    it = pipeline.train_iterator(cfg, tok, 4, seed=0)
    saved = pipeline.data_state(it, pipeline.fingerprint(cfg, 4, seed=0))
    other = data_config(specs["csv"], worker_count=2)
    with pytest.raises(UserError, match="worker_count: saved 0, now 2"):
        pipeline.restore_data_state(it, saved, pipeline.fingerprint(other, 4, seed=0))
    it.close()


def keys_read(spec, cfg, processes, index, count, monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: processes)
    monkeypatch.setattr(jax, "process_index", lambda: index)
    it = iter(pipeline.raw_records(spec, cfg, seed=5))
    return [next(it)["key"] for _ in range(count)]


@pytest.mark.parametrize("processes", [2, 4])
@pytest.mark.parametrize("name", ["csv", "wds"])
def test_processes_read_disjoint_shares_that_make_one_epoch(specs, name, processes, monkeypatch):
    # One shard at a time and no window shuffle, so a process's first epoch is its first records.
    cfg = data_config(specs[name], cycle_length=1, shuffle_buffer=1)
    total = 24
    shares = [keys_read(specs[name], cfg, processes, p, total // processes, monkeypatch) for p in range(processes)]
    everything = [k for share in shares for k in share]
    assert len(set(everything)) == len(everything) == total
    monkeypatch.undo()
    one = keys_read(specs[name], cfg, 1, 0, total, monkeypatch)
    assert set(one) == set(everything)


@pytest.mark.parametrize("override,message", [
    (dict(augment=dict(crop="random")), "unknown data.augment.crop 'random'; valid: random_resized, center"),
    (dict(decoder="turbo"), "unknown data.decoder 'turbo'"),
    (dict(cycle_length=0), "cycle_length must be at least 1"),
    (dict(max_bad_fraction=2.0), r"max_bad_fraction must be in \[0, 1\]"),
])
def test_bad_options_are_named_before_any_work(specs, tok, override, message):
    with pytest.raises(UserError, match=message):
        pipeline.train_iterator(data_config(specs["csv"], **override), tok, 4, seed=0)


def test_too_few_shards_for_the_readers_is_clear(specs, tok):
    cfg = data_config(specs["parquet"], worker_count=3)  # 2 files, 3 workers
    with pytest.raises(UserError, match="2 shards.*3 workers"):
        pipeline.train_iterator(cfg, tok, 4, seed=0)


def test_mixture_follows_its_weights(specs, monkeypatch):
    cfg = data_config(f"{specs['csv']}@3,{specs['wds']}@1")
    it = iter(pipeline.raw_records(cfg.train, cfg, seed=0))
    keys = [next(it)["key"] for _ in range(400)]
    from_csv = sum("/images/" in k for k in keys)
    assert abs(from_csv / 400 - 0.75) < 0.03, from_csv


def test_epochs_reshuffle(specs, tok):
    cfg = data_config(specs["csv"], cycle_length=1)
    it = iter(pipeline.raw_records(cfg.train, cfg, seed=0))
    first, second = ([next(it)["key"] for _ in range(24)] for _ in range(2))
    assert sorted(first) == sorted(second) and first != second


def test_skip_monitor_counts_and_stops():
    monitor = skips.SkipMonitor(max_bad_fraction=0.5, min_window=10)
    counts = np.zeros((4, len(SKIP_REASONS)), np.int32)
    counts[0, SKIP_REASONS.index("not_an_image")] = 3
    monitor.update({"skipped": counts, "skipped_key": np.array(["k1", "", "", ""])})
    assert monitor.metrics() == {"data/skipped/not_an_image": 3}
    assert "skipped 3/7 records (not_an_image: 3)" in monitor.end_window()
    counts[1, SKIP_REASONS.index("bad_utf8")] = 10
    monitor.update({"skipped": counts, "skipped_key": np.array(["k2", "k3", "", ""])})
    with pytest.raises(UserError, match=r"16 of the last 24 .*not_an_image: 6, bad_utf8: 10.*'k3'.*max_bad_fraction"):
        monitor.end_window()
    one = np.zeros((1, len(SKIP_REASONS)), np.int32)
    one[0, 0] = 1
    monitor.update({"skipped": one, "skipped_key": np.array(["k4"])})
    assert monitor.end_window().startswith("skipped 1/2")  # 2 < min_window records: not judged yet
    assert monitor.metrics() == {"data/skipped/not_an_image": 6, "data/skipped/bad_utf8": 10, "data/skipped/undecodable_image": 1}


def test_mixture_spec_parsing():
    from mmjax.data import sources

    assert sources.parse_mixture("wds:/d/{000..009}.tar@0.7,csv:/x.csv@0.3") == [
        ("wds:/d/{000..009}.tar", 0.7), ("csv:/x.csv", 0.3)]
    assert sources.parse_mixture("wds:/d/{a,b}.tar") == [("wds:/d/{a,b}.tar", 1.0)]
    with pytest.raises(UserError, match="positive weight"):
        sources.parse_mixture("shapes@0")
    with pytest.raises(UserError, match="unknown data source scheme 'laion'"):
        sources.parse_mixture("laion:x@1")


def test_input_benchmark_runs_on_any_source(specs):
    import subprocess

    result = subprocess.run(
        [sys.executable, "-m", "mmjax.benchmarks.input", f"--source={specs['wds']}", "--workers=0", "--batches=2",
         "--batch_size=4", "--image_size=32", "--text_len=16"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    pipeline_rows = [r for r in rows if r.get("name") != "stages"]
    assert pipeline_rows and pipeline_rows[0]["images_per_sec"] > 0


@pytest.mark.parametrize("name", ["csv", "jsonl", "folder"])
def test_tokenizer_texts_never_open_an_image(specs, name, monkeypatch):
    from mmjax.data.sources import folder, table

    for cls in (table.TableSource, folder.FolderSource):
        monkeypatch.setattr(cls, "__getitem__", lambda *a: pytest.fail("read a record to train a tokenizer"))
    texts = pipeline.tokenizer_texts(specs[name], data_config(specs[name]), 10)
    expected = [c for _, _, c, _ in data_builders.examples(10, offset=100 if name == "jsonl" else 0)]
    assert texts == (sorted(data_builders.COLORS) if name == "folder" else expected)


def _states_of_processes(cfg, tok, processes, batches, monkeypatch):
    """What a checkpoint holds after `processes` processes each read `batches` batches of 4·P."""
    monkeypatch.setattr(jax, "process_count", lambda: processes)
    states = []
    for p in range(processes):
        monkeypatch.setattr(jax, "process_index", lambda: p)
        it = pipeline.train_iterator(cfg, tok, 4 * processes, seed=3)
        take(it, batches)
        states.append(json.dumps(it.get_state()))
        it.close()
    fingerprint = pipeline.fingerprint(cfg, 4 * processes, seed=3)
    monkeypatch.undo()
    return {"fingerprint": fingerprint, "processes": states}


def test_a_random_access_source_resumes_on_another_number_of_processes(specs, tok, monkeypatch):
    """Two processes read 3 batches of 2 records each; one process resumes where the two
    stopped together: its next batches are those of a run that had one process throughout."""
    cfg = data_config(specs["csv"])
    saved = _states_of_processes(cfg, tok, 2, 3, monkeypatch)
    alone = pipeline.train_iterator(cfg, tok, 8, seed=3)
    take(alone, 3)  # 3 batches of 8 = the 2 × 3 × 4 records the two processes read
    expected = take(alone, 4)
    alone.close()
    resumed = pipeline.train_iterator(cfg, tok, 8, seed=3)
    note = pipeline.restore_data_state(resumed, saved, pipeline.fingerprint(cfg, 8, seed=3))
    assert "saved by 2 processes; re-split over 1" in note
    assert_batches_equal(take(resumed, 4), expected)
    resumed.close()


def test_a_stream_refuses_another_number_of_processes(specs, tok, monkeypatch):
    cfg = data_config(specs["wds"])
    saved = _states_of_processes(cfg, tok, 2, 1, monkeypatch)
    it = pipeline.train_iterator(cfg, tok, 8, seed=3)
    with pytest.raises(UserError, match="process_count: saved 2, now 1"):
        pipeline.restore_data_state(it, saved, pipeline.fingerprint(cfg, 8, seed=3))
    it.close()
