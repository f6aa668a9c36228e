"""--workdir=gs://bucket/run: the workdir's files go through etils.epath to the bucket, and no
local directory named `gs:` appears. No network: epath routes gs:// to fsspec's "gcs" filesystem
(there is no TensorFlow here), which the fixture replaces with an in-memory one that, like an
object store, cannot append."""
import contextlib
import importlib
import json
import os
import types

import fsspec
import ml_collections
import numpy as np
import pytest
from etils.epath import backend
from fsspec.implementations.memory import MemoryFileSystem

from mmjax import checkpoint, epath_io, inference, init_from, metrics, run_record, train
from mmjax.data import shapes, tokenizer as tokenizer_lib
from mmjax.errors import UserError
from mmjax.evals import pictures, standalone

RUN = "gs://test-bucket/run"


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """The fake bucket's files: {"test-bucket/run/config.json": bytes, ...}; cwd is an empty tmp_path."""

    class FakeGCS(MemoryFileSystem):
        protocol = ("gs", "gcs")
        store = {}  # its own, not MemoryFileSystem's
        pseudo_dirs = [""]
        root_marker = ""

        @classmethod
        def _strip_protocol(cls, path):  # "gs://test-bucket/run/x" -> "test-bucket/run/x", as gcsfs does
            path = str(path)
            for prefix in ("gs://", "gcs://"):
                path = path.removeprefix(prefix)
            return path.rstrip("/")

        def _open(self, path, mode="rb", **kwargs):
            if "a" in mode:
                raise NotImplementedError("an object store cannot append")
            return super()._open(path, mode, **kwargs)

    # fsspec.registry is a read-only view of this dict; setitem removes the entry again afterwards
    monkeypatch.setitem(importlib.import_module("fsspec.registry")._registry, "gcs", FakeGCS)
    backend.fsspec_backend._get_filesystem.cache_clear()  # it cached the real "gcs" filesystem, if any
    monkeypatch.chdir(tmp_path)
    yield lambda: {k: (v.getvalue() if hasattr(v, "getvalue") else v) for k, v in FakeGCS.store.items()}
    backend.fsspec_backend._get_filesystem.cache_clear()
    assert os.listdir(tmp_path) == [], "a URL workdir became a local directory"


def test_prepare_workdir_keeps_the_url_and_probes_the_bucket(bucket):
    assert train.prepare_workdir(RUN) == RUN
    assert bucket() == {}  # the write probe was removed again


def test_tokenizer_and_run_record_round_trip(bucket):
    tok = tokenizer_lib.load_or_train(f"{RUN}/cache/spm.model", shapes.all_texts, 96)
    assert bucket()["test-bucket/run/cache/spm.model"] == tok.proto
    cached = tokenizer_lib.load_or_train(f"{RUN}/cache/spm.model", lambda: pytest.fail("retrained"), 96)
    assert cached.proto == tok.proto

    config = ml_collections.ConfigDict({"data": {"tokenizer": ""}, "model": {"width": 8}})
    run_record.write(RUN, config, tok)
    run_record.write(RUN, config, tok)  # a resume: the tokenizer is compared, config.json rewritten
    assert bucket()["test-bucket/run/tokenizer.model"] == tok.proto
    assert b'"width": 8' in bucket()["test-bucket/run/config.json"]
    loaded_config, loaded_tok = run_record.load(RUN)
    assert loaded_config.model.width == 8 and loaded_tok.proto == tok.proto
    run_record.refuse_imported(RUN)  # no imported.json there


def test_metrics_rewrite_on_resume_and_curves(bucket, monkeypatch):
    logdirs = []

    class FakeSummaryWriter:  # tensorboardX's gs:// writer needs google-cloud-storage and the network
        def __init__(self, logdir):
            logdirs.append(logdir)

        add_scalar = flush = close = lambda *a, **k: None

    monkeypatch.setattr(metrics.tensorboardX, "SummaryWriter", FakeSummaryWriter)
    writer = metrics.MetricsWriter(RUN)
    for step in (1, 2, 3):
        writer.write(step, {"loss": 1.0 / step})
    writer.close()
    resumed = metrics.MetricsWriter(RUN, start_step=2)  # step 3 is redone: its row goes
    resumed.write(3, {"loss": float("nan")})
    resumed.plot()
    assert logdirs == [f"{RUN}/tensorboard"] * 2
    assert metrics.read_jsonl(f"{RUN}/metrics.jsonl") == [
        {"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}, {"step": 3, "loss": None}]
    assert bucket()["test-bucket/run/curves.png"].startswith(b"\x89PNG")


def test_tools_take_a_url_workdir(bucket):
    """evaluate's results file, and init.path naming a run in a bucket (its kind decided there)."""
    assert epath_io.absolute(RUN) == RUN
    standalone.write_results(f"{RUN}/eval_4.json", 4, {"a": 1.0})
    standalone.write_results(f"{RUN}/eval_4.json", 4, {"b": 2.0})  # results of one checkpoint accumulate
    assert json.loads(bucket()["test-bucket/run/eval_4.json"])["results"] == {"a": 1.0, "b": 2.0}
    with pytest.raises(UserError, match="without config.json"):
        init_from._source_kind(RUN)
    fsspec.filesystem("gcs").pipe(f"{RUN}/config.json", b"{}")
    assert init_from._source_kind(RUN) == "workdir"


def test_pictures(bucket):
    images = np.zeros((2, 8, 8, 3), np.uint8)
    pictures.caption_samples(f"{RUN}/pictures/captions.png", images, [["a"], ["b"]], ["a", "b"])
    assert bucket()["test-bucket/run/pictures/captions.png"].startswith(b"\x89PNG")


def test_checkpoint_housekeeping(bucket):
    directory = f"{RUN}/checkpoints"
    for name in ("3.orbax-checkpoint-tmp-17/state/a", "2/state/a", "2/data/b"):
        fsspec.filesystem("gcs").pipe(f"{directory}/{name}", b"x")
    reloads = []
    ckpt = checkpoint.Checkpointer.__new__(checkpoint.Checkpointer)  # its orbax manager is not under test
    ckpt._directory, ckpt._aside = directory, f"{directory}_unreadable"
    ckpt._quiet = types.SimpleNamespace(muted=contextlib.nullcontext)
    ckpt._manager = types.SimpleNamespace(reload=lambda: reloads.append(1))
    ckpt._remove_partial(3)
    assert ckpt._move_aside(2) == f"{directory}_unreadable/2"
    assert sorted(bucket()) == ["test-bucket/run/checkpoints_unreadable/2/data/b",
                                "test-bucket/run/checkpoints_unreadable/2/state/a"]
    assert reloads == [1]
    assert checkpoint._size(checkpoint._free_bytes(directory)) == "an unknown amount"


def test_a_url_without_its_filesystem_package_names_the_install():
    if importlib.util.find_spec("s3fs"):
        pytest.skip("s3fs is installed: the URL would be tried for real")
    for reach in (train.prepare_workdir, inference.load):  # the trainer's workdir, and every tool's
        with pytest.raises(train.ConfigError, match=r"needs a filesystem package .*pip install s3fs"):
            reach("s3://no-bucket/run")
