"""Caption decoding for CoCa: greedy, beam search and sampling, with or without a KV cache.

    rows = decoding.caption(model, params, images, text_len=64, bos_id=..., eos_id=..., pad_id=...,
                            options=decoding.DecodeOptions(method="beam", beam_size=4))

Token rows are int32 [B, text_len]: BOS at position 0, then up to text_len - 1 generated
tokens; a row that emitted EOS is PAD after it. The model reads text_len - 1 positions (the
last token is only ever a target). Generated tokens are never PAD or BOS (nor ids >=
`num_tokens` when given), so every row reads back through the tokenizer.

Each search is written once, against a `Stepper` (how to get the next-token logits), which
has two implementations:

  cached_stepper    a zero-filled cache (`empty_cache`), then one `CoCa.caption_step` per
                    token: each layer's keys/values are written once and reused; the image
                    tokens' cross-attention keys/values are projected once, at the first step.
  uncached_stepper  the reference: the whole model over the whole row at every step
                    (`CoCa.caption_logits`), which is what the cache must reproduce.

Everything traces inside `jax.jit`, with the batch sharded over a mesh or not. The loops are
`lax.while_loop`s that stop when every row (every image's beam search) is done.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from mmjax.errors import ConfigError
from mmjax.models.layers import SCANNED_BLOCKS

METHODS = ("greedy", "beam", "sample")


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    method: str = "greedy"  # greedy | beam | sample
    beam_size: int = 4
    length_penalty: float = 0.6  # beam score = log p / ((5 + len) / 6) ** alpha (GNMT); 0 = none
    temperature: float = 1.0  # sampling
    top_k: int = 0  # sampling; 0 = off
    top_p: float = 1.0  # sampling (nucleus); 1 = off
    min_len: int = 0  # generated tokens before EOS is allowed
    max_len: int = 0  # generated tokens at most (EOS included); 0 = as many as fit (text_len - 1)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"unknown decoding method {self.method!r}; valid: {list(METHODS)}")
        if self.beam_size < 1:
            raise ConfigError(f"beam_size must be >= 1, got {self.beam_size}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.min_len < 0 or self.max_len < 0:
            raise ConfigError(f"min_len and max_len must be >= 0, got {self.min_len} and {self.max_len}")


@dataclasses.dataclass(frozen=True)
class TokenIds:
    bos: int
    eos: int
    pad: int
    num_tokens: int | None = None  # ids >= this are never generated; None: the model's vocabulary


@dataclasses.dataclass(frozen=True)
class Stepper:
    """Next-token logits for N = batch × copies rows (copies = beam_size for beam search;
    rows b·copies .. b·copies + copies - 1 belong to image b).

    start(rows [N, T]) -> (logits [N, V] f32 predicting position 1, state); rows hold BOS only.
    advance(state, rows [N, T], t) -> (logits [N, V] predicting position t + 1, state);
        rows[:, :t + 1] is the prefix, rows[:, t] its newest token (t is a traced int32).
    reorder(state, parents [batch, copies]) -> state: copy c of image b continues the rows
        of copy parents[b, c] (beam search), before the next `advance`.
    """

    start: Callable[[jax.Array], tuple[jax.Array, Any]]
    advance: Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, Any]]
    reorder: Callable[[Any, jax.Array], Any]


# --- the model's two steppers ------------------------------------------------------------


def empty_cache(model, params, caption_tokens, text_len: int):
    """A zero-filled decoding cache for `caption_tokens`' batch, shaped like the cache a
    prefill of text_len - 1 positions fills (nothing is computed: `jax.eval_shape`)."""
    rows = jnp.zeros((caption_tokens.shape[0], text_len - 1), jnp.int32)

    def prefill(params, caption_tokens, rows):
        _, variables = model.apply(
            {"params": params}, caption_tokens, rows, method=model.caption_prefill, mutable=["cache"]
        )
        return variables["cache"]

    shapes = jax.eval_shape(prefill, params, caption_tokens, rows)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _map_cache(fn, cache):
    """fn(leaf, batch_axis, path names) over a cache: leaves of a scanned stack ("blocks")
    have a leading layers axis, so their batch axis is 1."""

    def apply(path, leaf):
        names = tuple(getattr(p, "key", str(p)) for p in path)
        return fn(leaf, 1 if SCANNED_BLOCKS in names else 0, names)

    return jax.tree_util.tree_map_with_path(apply, cache)


def _gather_copies(x, axis: int, parents):
    """x's batch axis (at `axis`, batch × copies long) regrouped: copy c of image b <- parents[b, c]."""
    batch, copies = parents.shape
    shape = x.shape
    grouped = x.reshape(shape[:axis] + (batch, copies) + shape[axis + 1 :])
    index = (slice(None),) * axis + (jnp.arange(batch)[:, None], parents)
    return grouped[index].reshape(shape)


def cached_stepper(model, params, caption_tokens, text_len: int, copies: int = 1) -> Stepper:
    """Decoding with the KV cache: `empty_cache`, then `CoCa.caption_step` once per token.

    The first step runs on one copy per image (all copies start from the same BOS) with the
    image tokens, which projects the cross-attention keys/values into the cache; the cache
    and logits are then repeated `copies` times. Reordering gathers every self-attention
    cache and key-validity row along the batch axis; the cross-attention caches are equal
    across an image's copies, so they are left as they are.
    """
    variables = lambda cache: {"params": params, "cache": cache}

    def step(cache, token, t, context=None):
        logits, mutated = model.apply(
            variables(cache), token, t, context, method=model.caption_step, mutable=["cache"]
        )
        return logits, mutated["cache"]

    def start(rows):
        cache = empty_cache(model, params, caption_tokens, text_len)
        logits, cache = step(cache, rows[::copies, :1], jnp.int32(0), caption_tokens)
        if copies > 1:
            cache = _map_cache(lambda x, axis, _: jnp.repeat(x, copies, axis=axis), cache)
            logits = jnp.repeat(logits, copies, axis=0)
        return logits, cache

    def advance(cache, rows, t):
        return step(cache, jax.lax.dynamic_slice_in_dim(rows, t, 1, axis=1), t)

    def reorder(cache, parents):
        regroup = lambda x, axis, names: x if "cross_attn" in names else _gather_copies(x, axis, parents)
        return _map_cache(regroup, cache)

    return Stepper(start, advance, reorder)


def uncached_stepper(model, params, caption_tokens, text_len: int, copies: int = 1) -> Stepper:
    """The reference: `CoCa.caption_logits` over the whole row (text_len - 1 positions) at
    every step, the logits read at the newest position. No state."""
    del text_len  # the rows carry it
    context = jnp.repeat(caption_tokens, copies, axis=0)

    def logits_at(rows, t):
        logits = model.apply({"params": params}, context, rows[:, :-1], method=model.caption_logits)
        return jax.lax.dynamic_index_in_dim(logits, t, axis=1, keepdims=False)

    return Stepper(
        start=lambda rows: (logits_at(rows, 0), ()),
        advance=lambda state, rows, t: (logits_at(rows, t), state),
        reorder=lambda state, parents: state,
    )


# --- the searches ------------------------------------------------------------------------


def num_generated(text_len: int, options: DecodeOptions) -> int:
    """How many tokens a row may generate: text_len - 1, or max_len when it is smaller."""
    if text_len < 2:
        raise ConfigError(f"text_len must be >= 2 (BOS and one token), got {text_len}")
    fit = text_len - 1
    return min(options.max_len, fit) if options.max_len else fit


def allowed_logits(logits, position, ids: TokenIds, options: DecodeOptions):
    """f32 logits with the tokens that may not appear at `position` (1-based count of
    generated tokens, EOS included) set to -inf: PAD, BOS, ids >= num_tokens, and EOS while
    fewer than min_len tokens precede it."""
    logits = logits.astype(jnp.float32)
    vocab = jnp.arange(logits.shape[-1])
    banned = (vocab == ids.pad) | (vocab == ids.bos)
    if ids.num_tokens is not None:
        banned |= vocab >= ids.num_tokens
    banned = banned | ((vocab == ids.eos) & (position - 1 < options.min_len))
    return jnp.where(banned, -jnp.inf, logits)


def sample_tokens(logits, key, options: DecodeOptions):
    """One token per row from softmax(logits / temperature), restricted to the top_k
    logits and to the nucleus (the fewest most likely tokens whose mass reaches top_p)."""
    logits = logits / options.temperature
    if options.top_k:
        kth = jax.lax.top_k(logits, min(options.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if options.top_p < 1:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        kept = jnp.cumsum(probs, axis=-1) - probs < options.top_p  # the mass before it is < top_p
        threshold = jnp.min(jnp.where(kept, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _set_column(rows, i, values):
    """rows[..., i] = values, for a traced i."""
    return jnp.where(jnp.arange(rows.shape[-1]) == i, values[..., None].astype(rows.dtype), rows)


def _first_rows(batch: int, copies: int, text_len: int, ids: TokenIds):
    return jnp.full((batch * copies, text_len), ids.pad, jnp.int32).at[:, 0].set(ids.bos)


def greedy_or_sample(stepper: Stepper, batch: int, text_len: int, ids: TokenIds, options: DecodeOptions, rng=None):
    """Greedy (argmax) or sampled decoding of `batch` rows; `stepper` has copies = 1."""
    sample = options.method == "sample"
    if sample and rng is None:
        raise ConfigError("method='sample' needs an rng")
    last = num_generated(text_len, options)
    rows = _first_rows(batch, 1, text_len, ids)
    logits, state = stepper.start(rows)

    def emit(i, logits, rows, finished):  # choose the token at position i
        logits = allowed_logits(logits, i, ids, options)
        token = sample_tokens(logits, jax.random.fold_in(rng, i), options) if sample else jnp.argmax(logits, -1)
        token = jnp.where(finished, ids.pad, token.astype(jnp.int32))
        return _set_column(rows, i, token), finished | (token == ids.eos)

    def body(carry):
        i, logits, state, rows, finished = carry
        rows, finished = emit(i, logits, rows, finished)
        logits, state = stepper.advance(state, rows, i)
        return i + 1, logits, state, rows, finished

    carry = (jnp.int32(1), logits, state, rows, jnp.zeros((batch,), bool))
    i, logits, _, rows, finished = jax.lax.while_loop(
        lambda c: (c[0] < last) & ~jnp.all(c[4]), body, carry
    )
    # The last position needs no logits after it; a loop that stopped early writes PAD here.
    rows, _ = emit(i, logits, rows, finished)
    return rows


def length_penalty(length, alpha: float):
    """GNMT's ((5 + len) / 6) ** alpha (Wu et al. 2016); len counts generated tokens, EOS included."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def beam_search(stepper: Stepper, batch: int, text_len: int, ids: TokenIds, options: DecodeOptions):
    """Beam search with K = options.beam_size beams per image (`stepper` has copies = K).

    Each step extends every alive beam by every allowed token and ranks the extensions by
    log-probability. An extension ending in EOS that ranks among the K best joins the
    image's K best finished beams, scored log p / lp(len) (`length_penalty`); the K best
    extensions not ending in EOS (there are K among the 2K best) stay alive. The search stops
    at the last position, or when no alive beam can beat an image's best finished score any
    more (with log p ≤ 0 its score is at most log p / max(lp) over the lengths still
    reachable). Returns the best finished beam per image, or, where none finished, the best
    alive one: [batch, text_len].

    With length_penalty=0, beam_size=1 is greedy decoding: an EOS finishes only when it is
    the most likely token, and then nothing alive can beat it. (With a penalty > 0 a single
    beam may go on past that EOS and finish later with a better score.)
    """
    k = options.beam_size
    last = num_generated(text_len, options)
    alpha = options.length_penalty
    alive_rows = _first_rows(batch, k, text_len, ids).reshape(batch, k, text_len)
    logits, state = stepper.start(alive_rows.reshape(batch * k, text_len))
    # All beams start equal: only the first may extend, or the K beams would be duplicates.
    alive_logp = jnp.tile(jnp.array([0.0] + [-jnp.inf] * (k - 1), jnp.float32), (batch, 1))
    finished_rows = alive_rows
    finished_scores = jnp.full((batch, k), -jnp.inf, jnp.float32)

    def expand(i, logits, alive_rows, alive_logp, finished_rows, finished_scores):
        logp = jax.nn.log_softmax(allowed_logits(logits, i, ids, options), axis=-1)
        vocab = logp.shape[-1]
        candidates = (alive_logp[:, :, None] + logp.reshape(batch, k, vocab)).reshape(batch, k * vocab)
        top_logp, top = jax.lax.top_k(candidates, 2 * k)
        parent, token = top // vocab, (top % vocab).astype(jnp.int32)
        rows = _set_column(jnp.take_along_axis(alive_rows, parent[:, :, None], axis=1), i, token)
        is_eos = token == ids.eos
        # Finished: the K best of the old finished beams and the EOS extensions ranked among
        # the K best (on a tie the older beam wins: top_k keeps the lower index first).
        finishes = is_eos & (jnp.arange(2 * k) < k)
        scores = jnp.where(finishes, top_logp / length_penalty(i, alpha), -jnp.inf)
        scores = jnp.concatenate([finished_scores, scores], 1)
        finished_scores, best = jax.lax.top_k(scores, k)
        finished_rows = jnp.take_along_axis(jnp.concatenate([finished_rows, rows], 1), best[:, :, None], axis=1)
        alive_logp, best = jax.lax.top_k(jnp.where(is_eos, -jnp.inf, top_logp), k)
        alive_rows = jnp.take_along_axis(rows, best[:, :, None], axis=1)
        parents = jnp.take_along_axis(parent, best, axis=1)
        return alive_rows, alive_logp, parents, finished_rows, finished_scores

    def done(i, alive_logp, finished_scores):  # i: the next position to fill
        best_penalty = jnp.maximum(length_penalty(i, alpha), length_penalty(last, alpha))
        bound = jnp.max(alive_logp, axis=1) / best_penalty
        return jnp.all(finished_scores[:, 0] >= bound)

    def body(carry):
        i, logits, state, alive_rows, alive_logp, finished_rows, finished_scores = carry
        alive_rows, alive_logp, parents, finished_rows, finished_scores = expand(
            i, logits, alive_rows, alive_logp, finished_rows, finished_scores
        )
        state = stepper.reorder(state, parents)
        logits, state = stepper.advance(state, alive_rows.reshape(batch * k, text_len), i)
        return i + 1, logits, state, alive_rows, alive_logp, finished_rows, finished_scores

    carry = (jnp.int32(1), logits, state, alive_rows, alive_logp, finished_rows, finished_scores)
    carry = jax.lax.while_loop(lambda c: (c[0] < last) & ~done(c[0], c[4], c[6]), body, carry)
    i, logits, _, alive_rows, alive_logp, finished_rows, finished_scores = carry
    # The last position needs no logits after it. After an early stop this extension cannot
    # beat the best finished beam (ties keep the older one), so it changes nothing.
    alive_rows, _, _, finished_rows, finished_scores = expand(
        i, logits, alive_rows, alive_logp, finished_rows, finished_scores
    )
    any_finished = finished_scores[:, 0] > -jnp.inf
    return jnp.where(any_finished[:, None], finished_rows[:, 0], alive_rows[:, 0])


def search(stepper: Stepper, batch: int, text_len: int, ids: TokenIds, options: DecodeOptions, rng=None):
    """Token rows [batch, text_len] by options.method; `stepper` has copies = beam_size for
    "beam", else 1 (`copies(options)`)."""
    if options.method == "beam":
        return beam_search(stepper, batch, text_len, ids, options)
    return greedy_or_sample(stepper, batch, text_len, ids, options, rng)


def copies(options: DecodeOptions) -> int:
    """Rows per image the stepper must serve: beam_size for beam search, else 1."""
    return options.beam_size if options.method == "beam" else 1


# --- entry points ------------------------------------------------------------------------


def caption_from_image_tokens(
    model,
    params,
    caption_tokens,
    *,
    text_len: int,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    options: DecodeOptions = DecodeOptions(),
    rng=None,
    use_cache: bool = True,
    num_tokens: int | None = None,
) -> jax.Array:
    """`caption` from the image tokens the decoder cross-attends to ([B, n, width], the
    second output of `CoCa.encode_image`)."""
    ids = TokenIds(bos_id, eos_id, pad_id, num_tokens)
    make = cached_stepper if use_cache else uncached_stepper
    stepper = make(model, params, caption_tokens, text_len, copies(options))
    return search(stepper, caption_tokens.shape[0], text_len, ids, options, rng)


def caption(
    model,
    params,
    images,
    *,
    text_len: int,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    options: DecodeOptions = DecodeOptions(),
    rng=None,
    use_cache: bool = True,
    num_tokens: int | None = None,
) -> jax.Array:
    """int32 [B, text_len] token rows (BOS first, PAD after EOS) for uint8 images [B, S, S, 3].

    `model` is a CoCa (anything with encode_image, caption_logits, caption_prefill and
    caption_step); rng: a jax key, required for method="sample"; use_cache=False re-runs the
    whole model at every step (the reference, text_len - 1 times the work); num_tokens: the
    tokenizer's size when the model's vocabulary is larger (a pinned vocab_size), so that no
    id the tokenizer does not know is generated.
    """
    _, caption_tokens = model.apply({"params": params}, images, method=model.encode_image)
    return caption_from_image_tokens(
        model,
        params,
        caption_tokens,
        text_len=text_len,
        bos_id=bos_id,
        eos_id=eos_id,
        pad_id=pad_id,
        options=options,
        rng=rng,
        use_cache=use_cache,
        num_tokens=num_tokens,
    )
