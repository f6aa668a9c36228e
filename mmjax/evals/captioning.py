"""Captioning: greedy decoding and caption metrics (exact match, BLEU-4 via sacrebleu)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import sacrebleu


def greedy_decode(logits_fn, batch_size: int, length: int, bos_id: int, eos_id: int, pad_id: int):
    """Token ids [B, length] starting with BOS, each next token the argmax given the prefix.

    `logits_fn(tokens [B, length])` returns [B, ≥ length - 1, V] logits, row t predicting token
    t + 1; it must be causal, so the pad positions beyond the prefix do not influence row t. Rows that emitted EOS are padded after it.
    """
    tokens = jnp.full((batch_size, length), pad_id, jnp.int32).at[:, 0].set(bos_id)

    def emit(t, tokens):
        next_token = jnp.argmax(logits_fn(tokens)[:, t], axis=-1).astype(jnp.int32)
        emitted = jnp.arange(length)[None, :] <= t
        finished = jnp.any((tokens == eos_id) & emitted, axis=1)
        return tokens.at[:, t + 1].set(jnp.where(finished, pad_id, next_token))

    return jax.lax.fori_loop(0, length - 1, emit, tokens)


def caption_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    exact = sum(p == r for p, r in zip(predictions, references)) / len(references)
    bleu = sacrebleu.corpus_bleu(predictions, [references], tokenize="none")
    return {"caption_exact_match": exact, "caption_bleu4": bleu.score / 100.0}
