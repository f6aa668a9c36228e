"""Caption decoding (mmjax.models.decoding) and CoCa's KV cache (caption_prefill/caption_step).

The cached decoders must reproduce the uncached reference token for token; the searches
themselves are checked on fake steppers whose log-probabilities are written out by hand.
"""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.configs import load_config
from mmjax.models import decoding
from mmjax.models.coca import CoCa
from mmjax.models.decoding import DecodeOptions
from mmjax.parallel import sharding

# The tests compile many small programs and run each once: LLVM's optimisation is not worth
# its compile time here (about half of it), and both sides of every comparison get the same.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

PAD, BOS, EOS = 0, 1, 2
VOCAB, TEXT_LEN, WIDTH, QUERIES = 20, 8, 32, 4
IDS = dict(text_len=TEXT_LEN, bos_id=BOS, eos_id=EOS, pad_id=PAD)
BEAM = DecodeOptions(method="beam", beam_size=3, length_penalty=0.6)


def tiny_coca(scan=False, remat="none"):
    depth = 2 if scan else 1  # a scan over 2 blocks is a real loop
    return CoCa(
        vocab_size=VOCAB, patch_size=4, vision_width=WIDTH, vision_depth=1, vision_mlp_dim=64, vision_heads=2,
        text_width=WIDTH, unimodal_depth=depth, multimodal_depth=depth, text_mlp_dim=64, text_heads=2,
        embed_dim=16, caption_queries=QUERIES, pad_id=PAD, scan_layers=scan, remat=remat,
    )


def tiny_params(model, seed=0):
    """Random parameters drawn with numpy (no compile): layer-norm scales 1 + 0.3·N(0, 1),
    everything else 0.3·N(0, 1). At its own init the decoder barely depends on its inputs
    and every row would decode alike; with these, rows differ and finish at different lengths."""
    images, tokens = jnp.zeros((1, 8, 8, 3), jnp.uint8), jnp.ones((1, TEXT_LEN - 1), jnp.int32)
    shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), images, tokens)["params"]))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        noise = 0.3 * rng.standard_normal(leaf.shape).astype(np.float32)
        return jnp.asarray(noise + (1.0 if path[-1].key == "scale" else 0.0))

    return jax.tree_util.tree_map_with_path(draw, shapes)


# Seeds whose parameters decode rows of different lengths, greedy and beam alike.
SEEDS = {False: 2, True: 7}


@pytest.fixture(scope="module", params=[False, True], ids=["unrolled", "scan"])
def coca(request):
    model = tiny_coca(scan=request.param)
    image_tokens = jax.random.normal(jax.random.key(5), (8, QUERIES, WIDTH))
    return model, tiny_params(model, SEEDS[request.param]), image_tokens


def decode(model, params, image_tokens, options=DecodeOptions(), use_cache=True, rng=None):
    fn = lambda p, t, r: decoding.caption_from_image_tokens(
        model, p, t, options=options, use_cache=use_cache, rng=r, **IDS
    )
    return np.asarray(jit(fn)(params, image_tokens, rng))


def assert_well_formed(rows):
    """BOS, then generated tokens that are never PAD or BOS, and only PAD after an EOS."""
    assert (rows[:, 0] == BOS).all()
    for row in rows:
        generated = list(row[1:])
        end = generated.index(EOS) + 1 if EOS in generated else len(generated)
        assert PAD not in generated[:end] and BOS not in generated[:end], row
        assert all(t == PAD for t in generated[end:]), row


# --- the cache reproduces the uncached model ---------------------------------------------


@pytest.mark.parametrize("options", [DecodeOptions(), BEAM], ids=["greedy", "beam3"])
def test_cached_decoding_equals_uncached(coca, options):
    model, params, image_tokens = coca
    cached = decode(model, params, image_tokens, options)
    np.testing.assert_array_equal(cached, decode(model, params, image_tokens, options, use_cache=False))
    assert_well_formed(cached)
    lengths = {int(np.sum(row != PAD)) for row in cached}
    assert len(lengths) > 1, cached  # rows finish at different lengths: the test has teeth


@pytest.mark.parametrize("scan,remat", [(False, "full"), (True, "dots")], ids=["unrolled-remat_full", "scan-dots"])
def test_step_logits_equal_the_full_pass(scan, remat):
    """caption_step at position t == caption_logits(row)[:, t], with PAD keys in the middle
    of the prefix (the unimodal decoder must mask them like the full pass does), both
    stepping on top of a prefill of another row and from an empty cache."""
    model = tiny_coca(scan, remat)
    params = tiny_params(model)
    context = jax.random.normal(jax.random.key(5), (3, QUERIES, WIDTH))
    length, shared = TEXT_LEN - 1, 3
    prefill_rows = jnp.array([[BOS, 5, PAD, 7, 8, 9, 3], [BOS, 4, 4, 6, PAD, PAD, PAD], [BOS, 9, 8, 7, 6, 5, 4]])
    step_rows = jnp.array([[BOS, 5, PAD, 3, PAD, 11, EOS], [BOS, 4, 4, 12, 13, PAD, PAD], [BOS, 9, 8, 17, 16, 15, 14]])
    assert (prefill_rows[:, :shared] == step_rows[:, :shared]).all()
    v = {"params": params}
    full = jit(lambda rows: model.apply(v, context, rows, method=model.caption_logits))
    prefill = jit(lambda rows: model.apply(v, context, rows, method=model.caption_prefill, mutable=["cache"]))

    @jit
    def step(cache, t, context):  # context: None (cached cross-attention) or the image tokens
        token = jax.lax.dynamic_slice_in_dim(step_rows, t, 1, axis=1)
        logits, mutated = model.apply(
            {**v, "cache": cache}, token, t, context, method=model.caption_step, mutable=["cache"]
        )
        return logits, mutated["cache"]

    logits, mutated = prefill(prefill_rows)
    np.testing.assert_allclose(logits, full(prefill_rows), atol=1e-5)
    expected = full(step_rows)
    cache = mutated["cache"]
    for t in range(shared, length):  # overwrite the prefilled positions >= shared
        logits, cache = step(cache, jnp.int32(t), None)
        np.testing.assert_allclose(logits, expected[:, t], atol=1e-5, err_msg=f"after prefill, t={t}")
    cache = decoding.empty_cache(model, params, context, TEXT_LEN)
    for t in range(length):
        logits, cache = step(cache, jnp.int32(t), context if t == 0 else None)
        np.testing.assert_allclose(logits, expected[:, t], atol=1e-5, err_msg=f"from empty, t={t}")
    assert not any(np.allclose(expected[:, t], expected[:, t + 1]) for t in range(length - 1))


def test_only_a_prefill_makes_a_cache():
    """model.init and ordinary applies make no cache; a prefill's covers both decoders."""
    model = tiny_coca(scan=True)
    images, tokens = jnp.zeros((2, 8, 8, 3), jnp.uint8), jnp.ones((2, TEXT_LEN - 1), jnp.int32)
    variables = jax.eval_shape(model.init, jax.random.key(0), images, tokens)
    assert set(variables) == {"params"}
    _, mutated = jax.eval_shape(lambda v: model.apply(v, images, tokens, mutable=["cache"]), variables)
    cache = mutated["cache"]
    assert set(cache) == {"unimodal_decoder", "multimodal_decoder"}  # not the image tower
    assert cache["unimodal_decoder"]["key_valid"].shape == (2, TEXT_LEN)  # text + [CLS]
    stacked = cache["multimodal_decoder"]["decoder"]["blocks"]  # [layers, batch, heads, length, head dim]
    assert stacked["attn"]["key"].shape == (2, 2, 2, TEXT_LEN - 1, WIDTH // 2)
    assert stacked["cross_attn"]["value"].shape == (2, 2, 2, QUERIES, WIDTH // 2)


# --- the searches' relations, on a random language model ------------------------------


def random_lm_stepper(copies=1, seed=0, buckets=4096):
    """Logits that are a fixed random function of (image, prefix): a hash of the row picks
    a row of a random table. Cheap to compile, and rows differ and end at different lengths."""
    rng = np.random.default_rng(seed)
    table = jnp.asarray(2.0 * rng.standard_normal((buckets, VOCAB)), jnp.float32)
    weights = jnp.asarray(rng.integers(1, buckets, TEXT_LEN + 1), jnp.int32)

    def logits(rows):
        image = jnp.arange(rows.shape[0]) // copies
        return table[(rows @ weights[:-1] + image * weights[-1]) % buckets]

    return decoding.Stepper(
        start=lambda rows: (logits(rows), ()),
        advance=lambda state, rows, t: (logits(rows), state),
        reorder=lambda state, parents: state,
    )


def lm_search(options, rng=None, batch=16):
    stepper = random_lm_stepper(decoding.copies(options))
    ids = decoding.TokenIds(BOS, EOS, PAD)
    rows = jit(lambda r: decoding.search(stepper, batch, TEXT_LEN, ids, options, r))(rng)
    rows = np.asarray(rows)
    assert_well_formed(rows)
    return rows


def test_beam_one_sample_top_k_one_and_tiny_top_p_are_greedy():
    greedy = lm_search(DecodeOptions())
    assert len({int(np.sum(r != PAD)) for r in greedy}) > 2, greedy
    np.testing.assert_array_equal(lm_search(DecodeOptions(method="beam", beam_size=1, length_penalty=0.0)), greedy)
    for sample in (DecodeOptions(method="sample", top_k=1), DecodeOptions(method="sample", top_p=1e-6)):
        np.testing.assert_array_equal(lm_search(sample, jax.random.key(3)), greedy)
    assert (lm_search(DecodeOptions(method="beam", beam_size=4)) != greedy).any()


def test_sampling_is_reproducible_and_depends_on_the_rng():
    hot = DecodeOptions(method="sample", temperature=5.0)
    a, again, b = (lm_search(hot, jax.random.key(s)) for s in (0, 0, 1))
    np.testing.assert_array_equal(a, again)
    assert (a != b).any()
    with pytest.raises(ValueError, match="rng"):
        lm_search(hot)


def test_sample_tokens_keep_only_top_k_and_the_nucleus():
    logits = jnp.log(jnp.array([[0.4, 0.3, 0.2, 0.1]] * 4000))
    draw = lambda **kw: np.asarray(decoding.sample_tokens(logits, jax.random.key(0), DecodeOptions("sample", **kw)))
    top2 = draw(top_k=2)
    assert set(top2) == {0, 1}
    assert abs(np.mean(top2 == 0) - 0.4 / 0.7) < 0.03
    # Nucleus 0.5: 0.4 alone is short of it, 0.4 + 0.3 reaches it.
    assert set(draw(top_p=0.5)) == {0, 1}
    assert set(draw(top_p=0.75)) == {0, 1, 2}
    assert set(draw()) == {0, 1, 2, 3}


def test_decoding_runs_sharded_over_a_mesh():
    """jit with the batch (and the parameters, FSDP/tensor style) sharded over 8 devices
    gives the unsharded tokens; beam search, so the cache is repeated and regrouped too."""
    model = tiny_coca()
    params = tiny_params(model, SEEDS[False])
    images = jax.random.randint(jax.random.key(3), (8, 8, 8, 3), 0, 256).astype(jnp.uint8)
    mesh_cfg = load_config("configs/coca.py").mesh
    mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor = 2, 2, 2
    mesh, rules = sharding.make_mesh(mesh_cfg), sharding.rules_from_config(mesh_cfg)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), images[:1], jnp.ones((1, 7), jnp.int32))["params"])
    param_shardings = sharding.logical_to_sharding(boxed, mesh, rules)
    fn = lambda p, im: decoding.caption(model, p, im, options=BEAM, **IDS)
    expected = np.asarray(jit(fn)(params, images))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        sharded = jit(fn, in_shardings=(param_shardings, sharding.batch_sharding(mesh)),
                          out_shardings=sharding.replicated(mesh))
        np.testing.assert_array_equal(np.asarray(sharded(params, images)), expected)


# --- hand-checked searches on fake steppers -------------------------------------------------

A, B, C = 3, 4, 5
FAKE_VOCAB = 6


def prefix_table_stepper(table, default, copies=1, *, stateful=False):
    """A Stepper whose next-token probabilities depend on the prefix only: table[prefix] or
    `default` ({token: probability}). stateful=True keeps its own copy of the rows as its
    state (written by `advance`, regrouped by `reorder`) and reads the prefix from that
    copy, so a search that reorders wrongly decodes something else."""
    items = list(table.items())
    prefixes = np.full((max(len(items), 1), TEXT_LEN), -1, np.int32)  # -1: matches no row
    logp = np.full((len(items) + 1, FAKE_VOCAB), -np.inf, np.float32)  # the last row: default
    for i, (prefix, probs) in enumerate([*items, ((), default)]):
        if prefix:
            prefixes[i] = PAD
            prefixes[i, : len(prefix)] = prefix
        for token, p in probs.items():
            logp[i, token] = math.log(p)

    prefixes, logp = jnp.asarray(prefixes), jnp.asarray(logp)

    def logits(rows):
        match = (rows[:, None, :] == prefixes[None]).all(-1)
        return jnp.where(match.any(1)[:, None], logp[jnp.argmax(match, 1)], logp[-1])

    if not stateful:
        return decoding.Stepper(
            start=lambda rows: (logits(rows), ()),
            advance=lambda state, rows, t: (logits(rows), state),
            reorder=lambda state, parents: state,
        )

    def advance(own, rows, t):
        own = jnp.where(jnp.arange(TEXT_LEN) == t, jax.lax.dynamic_slice_in_dim(rows, t, 1, axis=1), own)
        return logits(own), own

    def reorder(own, parents):
        batch = parents.shape[0]
        grouped = own.reshape(batch, copies, TEXT_LEN)
        return grouped[jnp.arange(batch)[:, None], parents].reshape(own.shape)

    return decoding.Stepper(start=lambda rows: (logits(rows), rows), advance=advance, reorder=reorder)


# Greedy takes A (0.5) then A (0.6) then EOS (0.9): p = 0.27. "B EOS" is more likely
# (0.45 · 0.8 = 0.36) but greedy never sees it. With GNMT's penalty lp(n) = ((5 + n) / 6)^α
# (n counts EOS): score(B EOS) = ln 0.36 / lp(2), score(A A EOS) = ln 0.27 / lp(3); the
# longer caption wins iff (8/7)^α > ln 0.27 / ln 0.36 = 1.2815, i.e. α > 1.857.
TABLE = {
    (BOS,): {A: 0.5, B: 0.45, EOS: 0.05},
    (BOS, A): {A: 0.6, EOS: 0.2, B: 0.2},
    (BOS, B): {EOS: 0.8, A: 0.1, B: 0.1},
    (BOS, A, A): {EOS: 0.9, A: 0.05, B: 0.05},
}
DEFAULT = {A: 0.4, B: 0.3, EOS: 0.3}


def fake_search(options, table=TABLE, default=DEFAULT, batch=2, stateful=False, **ids):
    stepper = prefix_table_stepper(table, default, decoding.copies(options), stateful=stateful)
    ids = decoding.TokenIds(BOS, EOS, PAD, **ids)
    return np.asarray(jit(lambda: decoding.search(stepper, batch, TEXT_LEN, ids, options, jax.random.key(0)))())


def row(*tokens):
    return [BOS, *tokens] + [PAD] * (TEXT_LEN - 1 - len(tokens))


def test_beam_search_hand_checked():
    assert fake_search(DecodeOptions()).tolist() == [row(A, A, EOS)] * 2
    cases = [(2, 0.0, row(B, EOS)), (2, 1.8, row(B, EOS)), (2, 1.9, row(A, A, EOS)), (3, 0.0, row(B, EOS)),
             (3, 1.9, row(A, A, EOS))]
    for k, alpha, winner in cases:
        options = DecodeOptions(method="beam", beam_size=k, length_penalty=alpha)
        assert fake_search(options).tolist() == [winner] * 2, (k, alpha)
        if alpha == 1.9:  # a stepper with state must be regrouped with the beams
            assert fake_search(options, stateful=True).tolist() == [winner] * 2, (k, alpha)


def test_beam_search_returns_the_best_alive_beam_when_none_finished():
    never_eos = {(BOS,): {A: 0.6, B: 0.4}, (BOS, A): {A: 0.5, B: 0.5}, (BOS, B): {B: 0.9, A: 0.1}}
    # Best after 2 tokens: B B (0.36) over A A / A B (0.30); max_len=2 stops there.
    options = DecodeOptions(method="beam", beam_size=2, length_penalty=0.6, max_len=2)
    assert fake_search(options, never_eos, {A: 0.5, B: 0.5}).tolist() == [row(B, B)] * 2


# PAD and BOS are the most likely tokens, then EOS, C, A, B.
EAGER = {PAD: 0.3, BOS: 0.25, EOS: 0.2, C: 0.1, A: 0.09, B: 0.06}


@pytest.mark.parametrize("method", ["greedy", "beam", "sample"])
def test_eos_min_len_max_len_and_banned_tokens(method):
    def run(num_tokens=None, **kw):
        if method == "sample":  # top_k=1: the most likely allowed token, by sampling
            kw["top_k"] = 1
        options = DecodeOptions(method=method, beam_size=2, length_penalty=0.0, **kw)
        return fake_search(options, {}, EAGER, num_tokens=num_tokens).tolist()

    assert run(min_len=3) == [row(C, C, C, EOS)] * 2  # never PAD or BOS, EOS once allowed
    assert run(min_len=3, max_len=2) == [row(C, C)] * 2
    assert run(min_len=2, num_tokens=C) == [row(A, A, EOS)] * 2  # C is not a token of the tokenizer
    if method == "greedy":
        assert run() == [row(EOS)] * 2
        assert run(min_len=TEXT_LEN) == [row(*[C] * (TEXT_LEN - 1))] * 2


def test_options_are_checked():
    for bad in (dict(method="nucleus"), dict(beam_size=0), dict(temperature=0.0), dict(top_k=-1), dict(top_p=0.0),
                dict(top_p=1.5), dict(min_len=-1), dict(max_len=-2)):
        with pytest.raises(ValueError):
            DecodeOptions(**bad)
    assert decoding.METHODS == ("greedy", "beam", "sample")
