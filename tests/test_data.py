"""Tests for the embedded shapes dataset, its tokenizer and the grain pipeline."""
import os
import pickle
import sys

import jax
import numpy as np
import pytest
from absl import flags
from jax.sharding import NamedSharding, PartitionSpec as P
from scipy import ndimage

from mmjax.configs import load_config
from mmjax.data import pipeline, shapes
from mmjax.data import tokenizer as tokenizer_lib
from mmjax.errors import UserError
from mmjax.evals import datasets
from tests.helpers import assert_batches_equal, take

# grain's worker processes read absl flags.
if not flags.FLAGS.is_parsed():
    flags.FLAGS(sys.argv[:1])


@pytest.fixture(scope="module")
def cfg():
    return load_config("configs/coca.py").data


@pytest.fixture(scope="module")
def tok(cfg, tmp_path_factory):
    return pipeline.make_tokenizer(cfg, str(tmp_path_factory.mktemp("tok") / "spm.model"))


# --- shapes -----------------------------------------------------------------------------

def test_source_is_deterministic_and_splits_differ():
    a, b = shapes.ShapesSource("train", 100), shapes.ShapesSource("train", 100)
    ev, other_seed = shapes.ShapesSource("eval", 100), shapes.ShapesSource("train", 100, seed=1)
    for i in (0, 7, 99):
        assert a[i]["image"].tobytes() == b[i]["image"].tobytes()
        assert a[i]["caption"] == b[i]["caption"]
        assert a[i]["image"].tobytes() != ev[i]["image"].tobytes()
        assert a[i]["image"].tobytes() != other_seed[i]["image"].tobytes()
    assert len(a) == 100 and "train" in repr(a)
    with pytest.raises(IndexError):
        a[100]


def test_bad_split_names_valid_ones():
    with pytest.raises(ValueError, match="eval.*train"):
        shapes.ShapesSource("test", 10)


def test_grammar():
    texts = shapes.all_texts()
    n_classes = len(shapes.COLORS) * len(shapes.SHAPES)
    assert len(shapes.CLASS_NAMES) == n_classes == 24
    assert len(texts) == len(set(texts)) == n_classes * len(shapes.COUNTS) * len(shapes.SIZES)
    assert shapes.caption(1, 0, 0, 0) == "one small red circle"
    assert shapes.caption(3, 1, 5, 3) == "three large magenta crosses"
    for label, name in enumerate(shapes.CLASS_NAMES):
        prompts = shapes.zeroshot_prompts(label)
        assert len(prompts) == len(shapes.COUNTS) * len(shapes.SIZES)
        color, shape = name.split()
        assert all(color in p and shape[:-1] in p for p in prompts)


def test_labels_agree_with_captions():
    src = shapes.ShapesSource("train", 1000)
    seen = set()
    for i in range(300):
        ex = src[i]
        assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.uint8
        assert ex["label"] == shapes.label_of(ex["color"], ex["shape"])
        assert ex["caption"] == shapes.caption(ex["count"], ex["size"], ex["color"], ex["shape"])
        assert ex["caption"] in shapes.zeroshot_prompts(int(ex["label"]))
        seen.add(int(ex["label"]))
    assert len(seen) == 24  # every class occurs


@pytest.mark.parametrize("image_size", [24, 32, 48])
def test_images_show_what_the_caption_says(image_size):
    """Bright blobs: one connected component per object, of the named colour and size."""
    src = shapes.ShapesSource("eval", 200, image_size=image_size)
    areas = {}  # (shape, size) -> object areas
    for i in range(200):
        ex = src[i]
        image = ex["image"].astype(np.float32)
        mask = image.max(-1) > 110
        _, n = ndimage.label(mask, structure=np.ones((3, 3)))
        assert n == ex["count"], (i, ex["caption"])
        mean_rgb = image[mask].mean(0)
        nearest = np.argmin(np.linalg.norm(shapes._RGB - mean_rgb, axis=-1))
        assert nearest == ex["color"], (i, ex["caption"], mean_rgb)
        areas.setdefault((int(ex["shape"]), int(ex["size"])), []).append(mask.sum() / n)
    for shape in range(len(shapes.SHAPES)):
        assert max(areas[shape, 0]) < min(areas[shape, 1]), shapes.SHAPES[shape]


# --- tokenizer --------------------------------------------------------------------------

def test_tokenizer_round_trip_and_layout(tok, cfg):
    texts = shapes.all_texts()
    ids = tok.encode(texts, cfg.text_len)
    assert ids.shape == (len(texts), cfg.text_len) and ids.dtype == np.int32
    assert tok.decode(ids) == texts
    assert (ids[:, 0] == tok.bos_id).all() and tok.pad_id == 0
    lengths = (ids != tok.pad_id).sum(1)
    assert (ids[np.arange(len(texts)), lengths - 1] == tok.eos_id).all()
    assert ids.max() < tok.vocab_size == cfg.vocab_size


def test_every_caption_fits_text_len(tok, cfg):
    longest = max(len(tok.sp.encode(t)) for t in shapes.all_texts())
    assert longest + 2 <= cfg.text_len


def test_truncation_keeps_eos(tok):
    ids = tok.encode(["three large magenta crosses"], 4)
    assert ids.tolist()[0][0] == tok.bos_id and ids.tolist()[0][-1] == tok.eos_id
    assert tok.decode(ids) == ["three large"]


def test_tokenizer_is_cached_not_retrained(tmp_path, monkeypatch):
    path = tmp_path / "new" / "dir" / "spm.model"
    first = tokenizer_lib.load_or_train(str(path), shapes.all_texts, 96)
    mtime = os.stat(path).st_mtime_ns
    monkeypatch.setattr(tokenizer_lib, "train", lambda *a: pytest.fail("retrained"))
    second = tokenizer_lib.load_or_train(str(path), shapes.all_texts, 96)
    assert os.stat(path).st_mtime_ns == mtime
    assert second.encode(["two small red circles"], 8).tolist() == first.encode(["two small red circles"], 8).tolist()
    assert [p.name for p in path.parent.iterdir()] == ["spm.model"]  # no temp file left
    with pytest.raises(ValueError, match="vocab_size=64"):
        tokenizer_lib.load_or_train(str(path), shapes.all_texts, 64)


def test_tokenizer_training_is_deterministic_and_vocab_limit_is_clear():
    assert tokenizer_lib.train(shapes.all_texts(), 96) == tokenizer_lib.train(shapes.all_texts(), 96)
    with pytest.raises(ValueError, match=r"<= \d+"):
        tokenizer_lib.train(shapes.all_texts(), 1000)


def test_tokenizer_pickles(tok):  # grain worker processes receive it by pickle
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(["one large cyan square"], 8).tolist() == tok.encode(["one large cyan square"], 8).tolist()


# --- pipeline ---------------------------------------------------------------------------

def test_train_batches(cfg, tok):
    it = pipeline.train_iterator(cfg, tok, global_batch_size=16, seed=0)
    batch = next(it)
    assert batch.keys() == {"image", "tokens", "label", "skipped", "skipped_key"}
    assert batch["skipped"].sum() == 0
    assert batch["image"].shape == (16, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert batch["tokens"].shape == (16, cfg.text_len) and batch["tokens"].dtype == np.int32
    assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
    for text, label in zip(tok.decode(batch["tokens"]), batch["label"]):
        assert text in shapes.zeroshot_prompts(int(label))
    it.close()


@pytest.mark.parametrize("prefetch,workers", [(0, 0), (2, 0), (2, 1)])
def test_iterator_resumes_exactly(cfg, tok, prefetch, workers):
    cfg = cfg.copy_and_resolve_references()
    cfg.prefetch, cfg.worker_count = prefetch, workers
    it = pipeline.train_iterator(cfg, tok, 8, seed=3)
    initial = it.get_state()
    take(it, 3)
    state = it.get_state()
    assert state != initial
    expected = take(it, 4)
    it.close()
    resumed = pipeline.train_iterator(cfg, tok, 8, seed=3)
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 4), expected)
    resumed.close()


def test_shuffle_seed_changes_order(cfg, tok):
    a, b = (next(pipeline.train_iterator(cfg, tok, 8, seed=s)) for s in (0, 1))
    assert a["image"].tobytes() != b["image"].tobytes()


def test_iterator_resumes_through_orbax(cfg, tok, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    it = pipeline.train_iterator(cfg, tok, 8, seed=0)
    take(it, 2)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
    expected = take(it, 3)
    it.close()

    fresh = pipeline.train_iterator(cfg, tok, 8, seed=0)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        restored = manager.restore(
            manager.latest_step(), args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert restored["data"] is fresh
    assert_batches_equal(take(fresh, 3), expected)
    fresh.close()


def test_hosts_split_the_global_batch(cfg, tok, monkeypatch):
    """Two hosts' local batches, interleaved, are the one-host global batch."""
    single = take(pipeline.train_iterator(cfg, tok, 8, seed=0), 2)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    per_host = []
    for p in range(2):
        monkeypatch.setattr(jax, "process_index", lambda p=p: p)
        per_host.append(take(pipeline.train_iterator(cfg, tok, 8, seed=0), 2))
    for k in range(2):
        h0, h1 = per_host[0][k], per_host[1][k]
        assert h0["image"].shape[0] == 4
        merged = {key: np.stack([h0[key], h1[key]], 1).reshape(single[k][key].shape) for key in h0}
        assert_batches_equal([merged], [single[k]])


def test_worker_processes_give_the_same_batches(cfg, tok):
    cfg = cfg.copy_and_resolve_references()
    expected = take(pipeline.train_iterator(cfg, tok, 8, seed=0), 2)
    cfg.worker_count = 1
    it = pipeline.train_iterator(cfg, tok, 8, seed=0)
    assert_batches_equal(take(it, 2), expected)
    it.close()


def test_eval_set(cfg):
    ev = datasets.load("shapes:eval", cfg, limit=32)
    assert ev.images.shape == (32, 32, 32, 3) and ev.images.dtype == np.uint8 and ev.labels.dtype == np.int32
    assert ev.texts == [shapes.ShapesSource("eval", 32)[i]["caption"] for i in range(32)]
    assert ev.images[0].tobytes() == shapes.ShapesSource("eval", 32)[0]["image"].tobytes()
    assert ev.prompts[5] == shapes.zeroshot_prompts(5)


def test_unknown_scheme_names_valid_ones(cfg):
    with pytest.raises(UserError, match="'laion'.*shapes:.*csv:"):
        datasets.load("laion:/data", cfg)


def test_to_global_on_8_devices(cfg, tok):
    assert jax.device_count() == 8
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, P("data"))
    ev = datasets.load("shapes:eval", cfg, limit=16)
    local = {"image": ev.images, "tokens": tok.encode(ev.texts, cfg.text_len), "label": ev.labels,
             "caption": np.array(ev.texts)}
    out = pipeline.to_global(local, sharding)
    assert out.keys() == {"image", "tokens", "label"}  # the caption strings are dropped
    assert out["image"].shape == (16, 32, 32, 3) and out["tokens"].shape == (16, cfg.text_len)
    for key, array in out.items():
        assert array.sharding.is_equivalent_to(sharding, array.ndim)
        assert array.addressable_shards[0].data.shape[0] == 2
        np.testing.assert_array_equal(np.asarray(array), local[key])


def test_special_ids_come_from_the_model(tmp_path):
    """A user's SentencePiece model with sentencepiece's own defaults (unk 0, bos 1, eos 2, no
    pad piece): its ids are kept, and PAD gets the first id after its pieces."""
    import io

    import sentencepiece as spm

    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(shapes.all_texts()), model_writer=proto, vocab_size=60,
                                   model_type="bpe", minloglevel=2)
    path = tmp_path / "user.model"
    path.write_bytes(proto.getvalue())
    tok = tokenizer_lib.load(str(path))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 60, 61)
    ids = tok.encode(["two small red circles", "one cross"], 12)
    assert ids[0, 0] == 1 and (ids[:, -1] == 60).all() and 2 in ids[1]
    assert tok.decode(ids) == ["two small red circles", "one cross"]


def test_missing_or_bad_tokenizer_file_is_clear(tmp_path):
    with pytest.raises(UserError, match="cannot be read.*--config.data.tokenizer"):
        tokenizer_lib.load(str(tmp_path / "nope.model"))
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a SentencePiece model"):
        tokenizer_lib.load(str(tmp_path / "junk.model"))
