"""The prediction functions evaluators take: embed images, embed texts, caption images.

Each runs jitted over the mesh in fixed-size batches (one compilation per function), the
batch split over the data axes. The last batch is padded up to that size and the padded
rows are cut from the output, so an uneven tail counts exactly once, on one device or eight.
Every process holds the whole evaluation set; each batch becomes a global array of which a
process feeds only its own devices' rows, so the same code runs on one host or many.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import numpy as np

from mmjax.models import decoding
from mmjax.parallel import sharding


@dataclasses.dataclass(frozen=True)
class Predictions:
    """One set of parameters' predictions, on host numpy arrays."""

    embed_images: Callable[[np.ndarray], np.ndarray]  # uint8 [N, S, S, 3] -> f32 [N, D], L2-normalised
    embed_texts: Callable[[list[str]], np.ndarray]  # N texts -> f32 [N, D], L2-normalised
    caption: Callable[..., list[str]] | None  # (images, DecodeOptions, seed) -> N captions; None: no decoder
    logit_scale: float  # the contrastive temperature t′ (logits are scaled by exp(t′))
    logit_bias: float | None  # SigLIP's b; None for the softmax loss


class Predictor:
    def __init__(self, model, tokenizer, text_len: int, mesh, param_shardings, batch_size: int):
        self.model, self.tokenizer, self.text_len = model, tokenizer, text_len
        shards = sharding.num_batch_shards(mesh)
        self.batch_size = -(-batch_size // shards) * shards  # a multiple of the batch shards
        self._batch = sharding.batch_sharding(mesh)
        self._in = (param_shardings, self._batch)
        self._out = sharding.replicated(mesh)
        # embed_*: the embedding alone, so a CLIP's last blocks compute the pooled position only.
        self._embed_images = self._jit(lambda p, images: model.apply({"params": p}, images, method=model.embed_image))
        # The model reads text_len - 1 positions: the last token of a row is only ever a target.
        self._embed_texts = self._jit(
            lambda p, tokens: model.apply({"params": p}, tokens[:, :-1], method=model.embed_text))
        self._logit_scale = jax.jit(lambda p: model.apply({"params": p}, method=model.clamped_logit_scale),
                                    out_shardings=self._out)
        self._captioners = {}  # DecodeOptions -> jitted (params, images, rng) -> tokens

    def _jit(self, fn, extra_in=()):
        return jax.jit(fn, in_shardings=(*self._in, *extra_in), out_shardings=self._out)

    def _captioner(self, options: decoding.DecodeOptions):
        if options not in self._captioners:
            tok = self.tokenizer

            def caption(params, images, seed_and_start):
                # The sampling key of a batch depends on its first row's index only.
                rng = jax.random.fold_in(jax.random.key(seed_and_start[0]), seed_and_start[1])
                return decoding.caption(self.model, params, images, text_len=self.text_len, bos_id=tok.bos_id,
                                        eos_id=tok.eos_id, pad_id=tok.pad_id, options=options, rng=rng,
                                        num_tokens=tok.vocab_size)

            self._captioners[options] = self._jit(caption, extra_in=(self._out,))
        return self._captioners[options]

    def _map(self, fn, inputs: np.ndarray, *extra) -> np.ndarray:
        """fn over `inputs` in batches of batch_size rows, the last one padded then cut;
        `extra(start)` gives host values passed beside each batch, replicated."""
        outputs = []
        for start in range(0, len(inputs), self.batch_size):
            part = inputs[start : start + self.batch_size]
            padded = np.concatenate([part, np.repeat(part[-1:], self.batch_size - len(part), axis=0)])
            args = [_global(padded, self._batch), *(_global(np.asarray(e(start)), self._out) for e in extra)]
            outputs.append(np.asarray(fn(*args))[: len(part)])
        return np.concatenate(outputs)

    def bind(self, params) -> Predictions:
        def embed_images(images):
            return self._map(lambda x: self._embed_images(params, x), np.asarray(images))

        def embed_texts(texts):
            return self._map(lambda x: self._embed_texts(params, x), self.tokenizer.encode(list(texts), self.text_len))

        def caption(images, options: decoding.DecodeOptions = decoding.DecodeOptions(), seed: int = 0):
            fn = self._captioner(options)
            seed_and_start = lambda start: np.array([seed, start], np.int32)
            return self.tokenizer.decode(self._map(lambda x, s: fn(params, x, s), np.asarray(images), seed_and_start))

        return Predictions(
            embed_images=embed_images,
            embed_texts=embed_texts,
            caption=caption if self.model.has_decoder else None,
            logit_scale=float(self._logit_scale(params)),
            logit_bias=float(params["logit_bias"]) if "logit_bias" in params else None,
        )


def _global(host: np.ndarray, to: jax.sharding.Sharding) -> jax.Array:
    """A global array from a value every process holds whole: each feeds its own devices."""
    return jax.make_array_from_callback(host.shape, to, lambda index: host[index])
