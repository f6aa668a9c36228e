"""Train a SentencePiece BPE tokenizer on the captions of any data source.

    python -m mmjax.data.train_tokenizer --source=wds:/data/cc3m/{00000..00331}.tar \\
        --vocab_size=32000 --out=cc3m_32k.model [--max_texts=1000000]

then train with it: --config.data.tokenizer=cc3m_32k.model. The special ids are this
project's (PAD 0, UNK 1, BOS 2, EOS 3). Without --config.data.tokenizer the trainer does
the same on the training captions and caches the model in the workdir.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags

from mmjax.data import pipeline, tokenizer
from mmjax.errors import UserError

_SOURCE = flags.DEFINE_string("source", None, "Source spec or mixture (mmjax.data.sources), e.g. csv:/data/train.csv.")
_VOCAB = flags.DEFINE_integer("vocab_size", 32_000, "Number of pieces.")
_OUT = flags.DEFINE_string("out", None, "Where to write the .model file.")
_MAX_TEXTS = flags.DEFINE_integer("max_texts", 1_000_000, "Read at most this many captions (the first ones).")
_TFDS_DIR = flags.DEFINE_string("tfds_data_dir", "", "Where tfds: datasets are prepared.")
_IMAGE_KEY = flags.DEFINE_string("image_key", "", "The source's image field, if not the usual one.")
_TEXT_KEY = flags.DEFINE_string("text_key", "", "The source's caption field, if not the usual one.")
flags.mark_flags_as_required(["source", "out"])


def main(argv):
    del argv
    data_cfg = pipeline.default_data_config()
    data_cfg.update(dict(tfds_data_dir=_TFDS_DIR.value, image_key=_IMAGE_KEY.value, text_key=_TEXT_KEY.value))
    try:
        texts = pipeline.tokenizer_texts(_SOURCE.value, data_cfg, _MAX_TEXTS.value)
        if os.path.exists(_OUT.value):
            raise UserError(f"{_OUT.value} exists; remove it or choose another --out")
        tokenizer.load_or_train(_OUT.value, lambda: texts, _VOCAB.value)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"trained a {_VOCAB.value}-piece tokenizer on {len(texts)} captions -> {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
