"""grain input pipeline for every source: raw records → (mixture) → preprocess → batch.

    random-access source:  index shuffle → repeat (reshuffled each epoch) → this process's
                           positions [p::P] → read with threads
    stream source:         shard list → this process's shards [p::P] → shuffle → repeat →
                           interleave `cycle_length` shards → window shuffle
    then, for all:         weighted mixture → decode, crop, pick a caption, tokenize (seeded
                           per example) → drop and count bad records → batch → worker
                           processes (mp_prefetch) → prefetch thread

Every stage is a grain dataset with exact `get_state`/`set_state`, so the iterator resumes
at the very next example; `data_state`/`restore_data_state` save every process's state with
a fingerprint of what produced it.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import signal
import zlib

import grain
import jax
import ml_collections
import numpy as np

from mmjax import validation
from mmjax.data import clip_bpe, preprocess, skips, sources, tokenizer as tokenizer_lib
from mmjax.data.sources.base import RandomAccessSource
from mmjax.errors import UserError


# OpenAI CLIP's pixel statistics (in [0, 1] units), which open_clip and CoCa reproductions use.
CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def default_data_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        train="shapes",  # a source spec (mmjax.data.sources), or a mixture "SPEC@0.7,SPEC@0.3"
        eval="shapes:eval",  # the held-out split the trainer evaluates on
        num_eval=512,  # at most this many held-out examples (the first ones)
        image_size=32,
        text_len=8,  # BOS + at most 4 pieces + EOS for the embedded captions, with room to spare
        tokenizer="",  # a SentencePiece .model file, or "" to train one on the training captions
        vocab_size=96,  # pieces of a trained tokenizer; 96 makes every embedded word one piece
        tokenizer_max_texts=100_000,  # captions a trained tokenizer reads
        image_key="",  # the source's image field/column; "" = its usual name
        text_key="",  # the caption field/column ("captions/text" for nested tfds fields)
        tfds_data_dir="",  # where `tfds:` datasets are prepared; "" = tfds' default
        augment=dict(
            crop="random_resized",  # random_resized | center (resize the shorter side, crop the middle)
            scale=(0.9, 1.0),  # random-resized-crop area range (open_clip's default)
            ratio=(3 / 4, 4 / 3),
            flip=False,
        ),
        decoder="auto",  # auto (simplejpeg for JPEGs when installed) | pillow | simplejpeg
        max_image_pixels=89_478_485,  # larger images are skipped as decompression bombs (Pillow's limit)
        max_bad_fraction=0.3,  # stop when more of a logging window's records were skipped
        shuffle_buffer=1_000,  # streamed sources: window shuffle over this many records
        cycle_length=8,  # streamed sources: shards read at once per process (or worker)
        worker_count=0,  # grain worker processes; 0 = produce batches in this process
        prefetch=2,  # batches read ahead by a background thread; 0 = synchronous
    ))


def _seed(*parts) -> int:
    """A 32-bit seed from ints and strings, the same on every host and Python run."""
    return zlib.crc32(json.dumps(parts).encode())


# --- raw records ---------------------------------------------------------------------

def _random_access(source, seed, data_cfg) -> grain.IterDataset:
    p, n = jax.process_index(), jax.process_count()
    if len(source) < n:
        raise UserError(f"{source.name} has {len(source)} records, fewer than the {n} processes reading it")
    # Process p takes global positions p, p+P, ...: together the processes cover each
    # epoch once, whatever their number.
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat()[p::n]
    threads = max(1, data_cfg.prefetch)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=4 * threads))


def _stream(source, seed, data_cfg) -> grain.IterDataset:
    p, n = jax.process_index(), jax.process_count()
    shards = list(source.shards)[p::n]
    readers = n * max(1, data_cfg.worker_count)
    if len(source.shards) < readers:
        raise UserError(
            f"{source.name} has {len(source.shards)} shards but {n} processes × {max(1, data_cfg.worker_count)} "
            f"workers read it; each needs at least one shard: use fewer --config.data.worker_count or more shards"
        )
    ds = grain.MapDataset.source(shards).shuffle(seed=seed).repeat().map(source.shard_dataset)
    ds = _PrivateState(grain.experimental.InterleaveIterDataset(ds, cycle_length=data_cfg.cycle_length))
    return grain.experimental.WindowShuffleIterDataset(ds, window_size=data_cfg.shuffle_buffer, seed=seed)


class _PrivateState(grain.IterDataset):
    """Hands the parent a copy of the state it is restored to.

    grain 0.2's interleave keeps the list it is given in set_state and later edits it in
    place; the window shuffle above it keeps that same state object as its window start.
    Without a copy, a checkpoint taken after a resume (within one shuffle window) records
    the wrong shards and the next resume reads other data.
    """

    def __iter__(self):
        return _PrivateStateIterator(self._parent.__iter__())


class _PrivateStateIterator(grain.DatasetIterator):
    def __next__(self):
        return next(self._parent)

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(copy.deepcopy(state))


def check_sources(data_cfg) -> None:
    """Open every training and evaluation source once, so that a missing path or an unknown
    dataset stops the run (one line) before anything is written or built."""
    for spec, _ in sources.parse_mixture(data_cfg.train):
        sources.open_source(spec, data_cfg)
    sources.open_source(data_cfg.eval, data_cfg)


def raw_records(spec: str, data_cfg, seed: int) -> grain.IterDataset:
    """This process's endless share of the raw records of `spec` (one source or a mixture)."""
    mixture = sources.parse_mixture(spec)
    parts = []
    for i, (one, _) in enumerate(mixture):
        source = sources.open_source(one, data_cfg)
        reader = _random_access if isinstance(source, RandomAccessSource) else _stream
        parts.append(reader(source, _seed(seed, i, one), data_cfg))
    if len(parts) == 1:
        return parts[0]
    return grain.IterDataset.mix(parts, [w for _, w in mixture])


# --- examples --------------------------------------------------------------------------

def check_options(data_cfg) -> None:
    """Name a bad data option before any worker starts: mmjax.validation's rules for data.*."""
    validation.validate_section(data_cfg, "data.")


def train_decode_size(data_cfg) -> int:
    """The shorter side training images are decoded to at least (JPEGs decode at 1/2, 1/4,
    1/8 size for a fraction of the cost). A random crop keeps as little as scale[0] of the
    area: decode large enough that even that crop is not upsampled."""
    if data_cfg.augment.crop == "random_resized":
        return math.ceil(data_cfg.image_size / math.sqrt(data_cfg.augment.scale[0]))
    return data_cfg.image_size


@dataclasses.dataclass(frozen=True)
class _TrainExample:
    """raw record -> training example (or a skip): decode, crop, pick a caption, tokenize.
    The options are read from the config once: a dozen ConfigDict lookups per record cost
    ~15 µs, ~5% of what an embedded (shapes) record costs in all."""

    tokenizer: tokenizer_lib.TextTokenizer
    decode_size: int
    decoder: str
    max_pixels: int
    image_size: int
    crop: str
    scale: tuple
    ratio: tuple
    flip: bool
    text_len: int

    @classmethod
    def from_config(cls, data_cfg, tokenizer) -> "_TrainExample":
        aug = data_cfg.augment
        return cls(tokenizer, train_decode_size(data_cfg), data_cfg.decoder, data_cfg.max_image_pixels,
                   data_cfg.image_size, aug.crop, tuple(aug.scale), tuple(aug.ratio), aug.flip, data_cfg.text_len)

    def __call__(self, raw: dict, rng: np.random.Generator) -> dict:
        if raw["skip"]:
            return skips.skipped(raw["skip"], raw["key"])
        try:
            image = preprocess.decode_image(raw["image"], min_size=self.decode_size, decoder=self.decoder,
                                            max_pixels=self.max_pixels)
            image = preprocess.train_image(image, self.image_size, rng, crop=self.crop, scale=self.scale,
                                           ratio=self.ratio, flip=self.flip)
            text = preprocess.caption_text(raw["captions"], rng)
        except preprocess.Skip as e:
            return skips.skipped(e.reason, raw["key"])
        return {
            "image": image,
            "tokens": self.tokenizer.encode([text], self.text_len)[0],
            "label": np.int32(raw["label"]),
        }


def train_dataset(data_cfg, tokenizer: tokenizer_lib.Tokenizer, global_batch_size: int, seed: int) -> grain.IterDataset:
    """This process's endless batches (numpy): image uint8 [b, S, S, 3], tokens int32 [b, L],
    label int32 [b], and skipped int32 [b, R] / skipped_key str [b] (mmjax.data.skips)."""
    n = jax.process_count()
    if global_batch_size % n:
        raise UserError(f"batch_size {global_batch_size} is not divisible by the {n} processes; use a multiple of {n}")
    check_options(data_cfg)
    ds = raw_records(data_cfg.train, data_cfg, seed)
    ds = ds.random_map(_TrainExample.from_config(data_cfg, tokenizer), seed=_seed(seed, "augment", jax.process_index()))
    ds = skips.SkipCountingIterDataset(ds)
    ds = ds.batch(global_batch_size // n, drop_remainder=True)
    if data_cfg.worker_count > 0:
        ds = ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=data_cfg.worker_count),
            worker_init_fn=_leave_first_ctrl_c_to_the_trainer,
        )
    if data_cfg.prefetch > 0:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=data_cfg.prefetch)
    return ds


def _leave_first_ctrl_c_to_the_trainer(worker_index: int, worker_count: int) -> None:
    """A terminal's Ctrl-C reaches every process of the group, workers included. The first
    one is the trainer's (it saves, then closes the workers); a second one ends a worker as it
    ends the trainer."""
    signal.signal(signal.SIGINT, lambda signum, frame: signal.signal(signal.SIGINT, signal.SIG_DFL))


def train_iterator(data_cfg, tokenizer: tokenizer_lib.Tokenizer, global_batch_size: int,
                   seed: int) -> grain.DatasetIterator:
    """An iterator over `train_dataset`, with exact get_state/set_state."""
    return iter(train_dataset(data_cfg, tokenizer, global_batch_size, seed))


def to_global(batch: dict, sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
    """Assembles each host's numeric leaves into global arrays; strings are dropped."""
    return {
        k: jax.make_array_from_process_local_data(sharding, v)
        for k, v in batch.items()
        if np.asarray(v).dtype.kind not in "OUS"
    }


# --- iterator state in checkpoints -----------------------------------------------------

def fingerprint(data_cfg, global_batch_size: int, seed: int) -> dict:
    """What decides the order of the training examples: resuming with another value of any
    of these would silently repeat or skip data."""
    return {
        "train": data_cfg.train,
        "seed": seed,
        "batch_size": global_batch_size,
        "process_count": jax.process_count(),
        "worker_count": data_cfg.worker_count,
        "cycle_length": data_cfg.cycle_length,
        "shuffle_buffer": data_cfg.shuffle_buffer,
    }


def data_state(iterator, fingerprint_: dict) -> dict:
    """Every process's iterator state (gathered to all; the primary's copy is saved) and the fingerprint."""
    local = json.dumps(iterator.get_state())
    return {"fingerprint": fingerprint_, "processes": _all_gather_strings(local)}


def restore_data_state(iterator, saved: dict, fingerprint_: dict) -> str | None:
    """Put `iterator` where the checkpoint's iterators were; -> a note for the console when
    the saved states had to be re-split over another number of processes."""
    old = saved.get("fingerprint", {})
    changed = {k: (old.get(k), v) for k, v in fingerprint_.items() if old.get(k) != v}
    states = [json.loads(s) for s in saved["processes"]]
    note = None
    if set(changed) == {"process_count"} and (resplit := _resplit(states, fingerprint_["process_count"])):
        note = (f"the data iterators were saved by {len(states)} process{'es' if len(states) > 1 else ''}; "
                f"re-split over {len(resplit)}: they continue at the same position of the same shuffled order")
        states, changed = resplit, {}
    if changed:
        diff = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in changed.items())
        raise UserError(
            f"the checkpoint's data iterator was saved with other settings ({diff}); resuming would repeat or "
            "skip data. Re-run with the saved values, or start a new --workdir"
        )
    iterator.set_state(states[jax.process_index()])
    return note


def _resplit(states: list[dict], processes: int) -> list[dict] | None:
    """The states of one random-access source read by `processes` instead, or None.

    Process p of n reads positions p, p+n, ... of the source's shuffled order, so n processes
    that have each read k records have read exactly the first n·k positions: m processes
    continue at n·k/m each. Other readers (streams, mixtures, worker processes) keep
    positions that cannot be re-split; None then, and the caller refuses the change.
    """
    reads = {s.get("parent", {}).get("next_index") for s in states}
    simple = all(set(s) == {"parent", "index_for_rng"} and set(s["parent"]) == {"next_index"} for s in states)
    if not simple or len(reads) != 1 or (len(states) * next(iter(reads))) % processes:
        return None
    each = len(states) * next(iter(reads)) // processes
    return [{"parent": {"next_index": each}, "index_for_rng": each} for _ in range(processes)]


def _all_gather_strings(text: str) -> list[str]:
    if jax.process_count() == 1:
        return [text]
    from jax.experimental import multihost_utils

    data = np.frombuffer(text.encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.array([len(data)], np.int32)).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: len(data)] = data
    gathered = multihost_utils.process_allgather(padded).reshape(len(lengths), -1)
    return [bytes(row[:n]).decode() for row, n in zip(gathered, lengths)]


# --- evaluation records and tokenizer --------------------------------------------------------

def first_records(source, limit: int):
    """The first `limit` raw records in file order (random access: by index; streams: shard by shard)."""
    if isinstance(source, RandomAccessSource):
        yield from (source[i] for i in range(min(limit, len(source))))
        return
    count = 0
    for shard in source.shards:
        for raw in source.shard_dataset(shard):
            if count == limit:
                return
            count += 1
            yield raw


def tokenizer_texts(spec: str, data_cfg, max_texts: int) -> list[str]:
    """Captions to train a tokenizer on: every caption of the first records of each source."""
    texts = []
    for one, _ in sources.parse_mixture(spec):
        source = sources.open_source(one, data_cfg)
        if hasattr(source, "texts"):  # captions without reading images (tables, folders, shapes' grammar)
            texts.extend(source.texts(max_texts))
            continue
        for raw in first_records(source, max_texts):
            for caption in raw["captions"]:
                try:
                    texts.append(preprocess.caption_text([caption], None))
                except preprocess.Skip:
                    pass
    return texts[:max_texts]


def make_tokenizer(data_cfg, cache_path: str) -> tokenizer_lib.TextTokenizer:
    """data.tokenizer: "clip_bpe" (open_clip's CLIP BPE vocabulary) or "clip_bpe:PATH" (that
    vocabulary file), a SentencePiece file, or "" for one trained on the training captions and
    cached at `cache_path` (the workdir's tokenizer.model)."""
    if clip_bpe.is_spec(data_cfg.tokenizer):
        return clip_bpe.load(data_cfg.tokenizer)
    if data_cfg.tokenizer:
        return tokenizer_lib.load(data_cfg.tokenizer)
    texts = lambda: tokenizer_texts(data_cfg.train, data_cfg, data_cfg.tokenizer_max_texts)
    return tokenizer_lib.load_or_train(cache_path, texts, data_cfg.vocab_size)
