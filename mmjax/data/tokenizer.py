"""Tokenizers: fixed-length int32 rows of BOS, pieces, EOS, PAD.

`TextTokenizer` is what the trainer, evaluators and predict use; two kinds implement it:
SentencePiece (`Tokenizer`, here) and open_clip's CLIP BPE (mmjax.data.clip_bpe), chosen by
`data.tokenizer` in mmjax.data.pipeline.make_tokenizer.

SentencePiece: either a user's model file (`load`), or one trained in-process from the
training captions (seconds) and cached at a path, so every run and every host reuses the same
vocabulary. Special ids come from the model; one it lacks (many models have no PAD or no BOS
piece) gets an id after the model's pieces, so the embedding table is that much larger.
"""
from __future__ import annotations

import abc
import io
from typing import Callable, Sequence

import numpy as np
import sentencepiece as spm
from absl import logging
from etils import epath

from mmjax import epath_io
from mmjax.errors import UserError

# The ids this project's trained tokenizers use; a loaded model keeps its own.
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class TextTokenizer(abc.ABC):
    """Texts <-> int32 rows [BOS, pieces, EOS, PAD, ...] of a fixed length.

    vocab_size: the embedding table's rows (every id is below it); pad_id, bos_id, eos_id.
    """

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    @abc.abstractmethod
    def encode(self, texts: Sequence[str], length: int) -> np.ndarray:
        """int32 [N, length]; a text too long keeps its first length - 2 pieces and ends with EOS."""

    @abc.abstractmethod
    def decode(self, ids) -> list[str]:
        """Per row: the text up to the first EOS."""

    @abc.abstractmethod
    def workdir_files(self) -> dict[str, bytes]:
        """File name -> bytes: what a workdir keeps to rebuild this tokenizer (mmjax.run_record)."""


def pack(pieces: Sequence[Sequence[int]], length: int, bos_id: int, eos_id: int, pad_id: int) -> np.ndarray:
    """int32 [N, length] rows BOS, pieces (the first length - 2 at most), EOS, PAD..."""
    if length < 2:
        raise ValueError(f"length must leave room for BOS and EOS, got {length}")
    out = np.full((len(pieces), length), pad_id, np.int32)
    for row, ids in zip(out, pieces):
        ids = [bos_id, *ids[: length - 2], eos_id]
        row[: len(ids)] = ids
    return out


class Tokenizer(TextTokenizer):
    """SentencePiece: a thin wrapper over a SentencePieceProcessor with fixed-length batch encoding."""

    WORKDIR_FILE = "tokenizer.model"  # the workdir's copy of the model (mmjax.run_record)

    def __init__(self, model_proto: bytes):
        self.proto = model_proto  # the serialized model: what a workdir keeps (mmjax.run_record)
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self.sp.vocab_size()
        self.pad_id, self.bos_id, self.eos_id = (self._special(i) for i in (self.sp.pad_id(), self.sp.bos_id(), self.sp.eos_id()))

    def _special(self, model_id: int) -> int:
        if model_id >= 0:
            return model_id
        self.vocab_size += 1  # the model has no such piece: take the next free id
        return self.vocab_size - 1

    def workdir_files(self) -> dict[str, bytes]:
        return {self.WORKDIR_FILE: self.proto}

    def encode(self, texts: Sequence[str], length: int) -> np.ndarray:
        """int32 [N, length]; pieces are truncated so that EOS always fits."""
        # One call per string: sentencepiece's list path costs ~20x more per text.
        return pack([self.sp.encode(text) for text in texts], length, self.bos_id, self.eos_id, self.pad_id)

    def decode(self, ids) -> list[str]:
        """Per row: text up to the first EOS, with BOS and PAD dropped."""
        rows = []
        for row in np.asarray(ids).tolist():
            if self.eos_id in row:
                row = row[: row.index(self.eos_id)]
            rows.append([i for i in row if i not in (self.bos_id, self.pad_id) and i < self.sp.vocab_size()])
        return self.sp.decode(rows)


def train(texts: Sequence[str], vocab_size: int) -> bytes:
    """Trains a BPE model on `texts` and returns its serialized proto.

    BPE rather than unigram: on a tiny grammar, unigram cannot reach more than a few
    dozen pieces, while BPE merges up to whole words (short sequences) and still
    spells unseen words out of characters.
    """
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
            model_type="bpe", character_coverage=1.0, num_threads=1, minloglevel=2,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID)
    except RuntimeError as e:  # e.g. "Vocabulary size too high (200). Please set it to a value <= 176."
        raise UserError(
            f"cannot train a {vocab_size}-piece tokenizer on {len(texts)} texts: {e}; ask for fewer pieces "
            "(--config.data.vocab_size, or train_tokenizer's --vocab_size)"
        ) from e
    return model.getvalue()


def load(model_path: str) -> Tokenizer:
    """A SentencePiece model file (e.g. one made by `python -m mmjax.data.train_tokenizer`), local or a URL."""
    try:
        proto = epath.Path(model_path).read_bytes()
    except OSError as e:
        raise UserError(
            f"tokenizer file {model_path!r} cannot be read ({e.strerror or e}); give --config.data.tokenizer=<a SentencePiece "
            ".model file>, clip_bpe for open_clip's CLIP BPE, or leave it empty to train one on the training captions"
        ) from e
    try:
        return Tokenizer(proto)
    except RuntimeError as e:
        raise UserError(f"{model_path!r} is not a SentencePiece model ({e}); make one with python -m mmjax.data.train_tokenizer") from e


def load_or_train(model_path: str, texts: Callable[[], Sequence[str]], vocab_size: int) -> Tokenizer:
    """Loads the model cached at `model_path` (local or a URL), or trains one on `texts()` and caches it."""
    if epath.Path(model_path).exists():
        tokenizer = load(model_path)
        if tokenizer.vocab_size != vocab_size:
            raise UserError(f"{model_path} holds a {tokenizer.vocab_size}-piece tokenizer, but "
                             f"vocab_size={vocab_size} was asked for: delete the file or fix the config")
        return tokenizer
    texts = texts()
    proto = train(texts, vocab_size)
    epath.Path(model_path).parent.mkdir(parents=True, exist_ok=True)
    # Concurrent writers (several hosts, one shared disk or bucket) never expose a partial file
    # (epath_io.write_atomic), and all write the same bytes since training is deterministic.
    epath_io.write_atomic(model_path, proto)
    logging.info("trained a %d-piece tokenizer on %d texts -> %s", vocab_size, len(texts), model_path)
    return Tokenizer(proto)
