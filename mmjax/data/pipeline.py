"""grain input pipeline: source → shuffle → repeat → per-host shard → tokenize → batch.

The training iterator is a grain `DatasetIterator`: `get_state()`/`set_state()` give
exact resume, and it checkpoints with orbax through
`grain.checkpoint.CheckpointSave(it)` / `grain.checkpoint.CheckpointRestore(it)`.
"""
from __future__ import annotations

import functools

import grain
import jax
import ml_collections
import numpy as np

from mmjax.data import shapes
from mmjax.data import tokenizer as tokenizer_lib


def default_data_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="shapes",
        image_size=32,
        text_len=8,  # BOS + at most 4 pieces + EOS, with room to spare
        num_train=1_000_000,  # virtual: examples are generated from their index
        num_eval=512,
        vocab_size=96,  # enough BPE merges for every caption word to be one piece
        seed=0,  # generates the content; the shuffle seed is train_iterator's `seed`
        worker_count=0,  # grain worker processes; 0 = produce batches in this process
        prefetch=2,  # batches read ahead by a background thread; 0 = synchronous
    ))


def _check_dataset(data_cfg) -> None:
    if data_cfg.name != "shapes":
        raise ValueError(f"unknown dataset {data_cfg.name!r}; available: ['shapes']")


def _source(data_cfg, split: str, num_examples: int) -> shapes.ShapesSource:
    _check_dataset(data_cfg)
    return shapes.ShapesSource(split, num_examples, data_cfg.image_size, data_cfg.seed)


def make_tokenizer(data_cfg, model_path: str) -> tokenizer_lib.Tokenizer:
    """The dataset's tokenizer, trained on every caption it can produce, cached at model_path."""
    _check_dataset(data_cfg)
    return tokenizer_lib.load_or_train(model_path, shapes.all_texts(), data_cfg.vocab_size)


def _tokenize(example: dict, tokenizer: tokenizer_lib.Tokenizer, text_len: int) -> dict:
    return {
        "image": example["image"],
        "tokens": tokenizer.encode([example["caption"]], text_len)[0],
        "label": example["label"],
    }


def train_iterator(data_cfg, tokenizer: tokenizer_lib.Tokenizer, global_batch_size: int,
                   seed: int) -> grain.DatasetIterator:
    """Infinite iterator of this host's batches {"image", "tokens", "label"} (numpy)."""
    process_index, process_count = jax.process_index(), jax.process_count()
    if global_batch_size % process_count:
        raise ValueError(f"global batch {global_batch_size} is not divisible by {process_count} hosts")
    ds = (
        grain.MapDataset.source(_source(data_cfg, "train", data_cfg.num_train))
        .shuffle(seed=seed)
        .repeat()  # reshuffles each epoch
        # Host p takes global positions p, p+P, ...: together the hosts' batch k covers
        # positions [kB, (k+1)B), whatever the number of hosts.
        [process_index::process_count]
        .map(functools.partial(_tokenize, tokenizer=tokenizer, text_len=data_cfg.text_len))
        .batch(global_batch_size // process_count, drop_remainder=True)
    )
    # One reader thread per prefetched batch is plenty: each one builds a whole batch.
    read = grain.ReadOptions(num_threads=data_cfg.prefetch, prefetch_buffer_size=data_cfg.prefetch)
    iter_ds = ds.to_iter_dataset(read)
    if data_cfg.worker_count > 0:
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.worker_count))
    return iter(iter_ds)


def eval_arrays(data_cfg, tokenizer: tokenizer_lib.Tokenizer, num_examples: int) -> dict[str, np.ndarray]:
    """The held-out split as whole arrays: image, tokens, label, caption (str)."""
    source = _source(data_cfg, "eval", num_examples)
    examples = [source[i] for i in range(num_examples)]
    captions = [e["caption"] for e in examples]
    return {
        "image": np.stack([e["image"] for e in examples]),
        "tokens": tokenizer.encode(captions, data_cfg.text_len),
        "label": np.array([e["label"] for e in examples], np.int32),
        "caption": np.array(captions),
    }


def to_global(batch: dict, sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
    """Assembles each host's numeric leaves into global arrays; strings are dropped."""
    return {
        k: jax.make_array_from_process_local_data(sharding, v)
        for k, v in batch.items()
        if np.asarray(v).dtype.kind not in "OUS"
    }
