"""The model zoo: every config builds at paper size, small models run, and sharding, remat,
scan, patch dropout and tower locking change exactly what they should.

Compiles dominate the run time on CPU: parameters are drawn with numpy from the shapes that
`jax.eval_shape` gives (values do not matter to these comparisons) and each test compiles
as few functions as it can.
"""
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import optim, train, train_step
from mmjax.configs import load_config
from mmjax.models import build_model, layers, model_vocab_size, scan_layout
from mmjax.models.coca import CoCa
from mmjax.objectives import objective as objective_lib
from mmjax.parallel import sharding
from mmjax.tools import summary
from tests.helpers import tiny_train_config, tiny_zoo_model

VOCAB, PAD = 64, 0
FAMILIES = ("configs/coca.py", "configs/clip.py", "configs/siglip.py")
ZOO = (
    [("configs/coca.py", v) for v in ("", "base", "large", "giant", "openclip_b32", "openclip_l14")]
    + [("configs/clip.py", v) for v in ("", "vit_b32", "vit_b16", "vit_l14")]
    + [("configs/siglip.py", v) for v in ("", "b16")]
)
RULES = sharding.rules_from_config(load_config("configs/coca.py").mesh)


def batch(n=4, seed=0):
    """uint8 images [n, 32, 32, 3] and token rows [n, 7]: 5 text tokens, then padding."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    tokens = rng.integers(1, VOCAB, (n, 7), dtype=np.int32)
    tokens[:, 5:] = PAD
    return images, tokens


def random_params(boxed_shapes, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(s.dtype), nn.unbox(boxed_shapes))


def init(model_cfg, seed=0, contrastive="clip"):
    """-> (model, boxed parameter shapes, random parameters)."""
    model = build_model(model_cfg, VOCAB, PAD, contrastive=contrastive)
    boxed = jax.eval_shape(model.init, jax.random.key(0), *batch(1))["params"]
    return model, boxed, random_params(boxed, seed)


def contrastive_of(config) -> str:
    return objective_lib.contrastive_type(config.objective)


def loss_fn(model, objective):
    """The training loss of `model` on a fixed batch, as a function of its parameters."""
    terms = objective_lib.build(objective_lib.with_options(objective, impl="dense"), mesh=None, pad_id=PAD)
    images, tokens = batch()

    def loss(params):
        outputs = model.apply({"params": params}, images, tokens, train=True, rngs={"dropout": jax.random.key(1)})
        return objective_lib.total_loss(terms, outputs, {"image": images, "tokens": tokens, "targets": tokens})[0]

    return loss


def count(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))


# ------------------------------------------------------------------ every config, paper sizes


@pytest.mark.parametrize("path,variant", ZOO)
def test_every_config_builds_under_eval_shape(path, variant):
    config = load_config(path, variant)
    model = build_model(
        config.model, model_vocab_size(config.model, config.data.vocab_size),
        contrastive=objective_lib.contrastive_type(config.objective),
    )
    params = summary.abstract_params(model, config)  # shapes only: nothing allocated
    assert all(isinstance(x, jax.ShapeDtypeStruct) and x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    # bf16 activations (the paper variants) still give f32 embeddings, scale and logits.
    outputs = jax.eval_shape(model.apply, {"params": params}, *summary.abstract_inputs(config, 2))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(outputs)), outputs


@pytest.mark.parametrize(
    "path,variant,published",
    [
        ("configs/clip.py", "vit_b32", 151_277_313),
        ("configs/clip.py", "vit_b16", 149_620_737),
        ("configs/clip.py", "vit_l14", 427_616_513),
        ("configs/coca.py", "openclip_b32", 253_560_065),  # open_clip's coca_ViT-B-32
        ("configs/coca.py", "openclip_l14", 638_450_177),  # coca_ViT-L-14
    ],
)
def test_parameter_counts_equal_open_clip(path, variant, published):
    config = load_config(path, variant)
    model = build_model(config.model, config.model.vocab_size, contrastive=contrastive_of(config))
    assert count(summary.abstract_params(model, config)) == published


@pytest.mark.parametrize(
    "variant,image_encoder,text_decoder,rel",
    # CoCa Table 1 (millions). The paper rounds the 2.1B model's text decoder (we count
    # 1,180M, untied output projection as in Base, whose 297M we match) to "1.1B".
    [("base", 86, 297, 0.01), ("large", 303, 484, 0.01), ("giant", 1011, 1100, 0.075)],
)
def test_coca_tower_sizes_match_the_paper(variant, image_encoder, text_decoder, rel):
    config = load_config("configs/coca.py", variant)
    model = build_model(config.model, config.model.vocab_size, contrastive=contrastive_of(config))
    params = summary.abstract_params(model, config)
    assert count(params["image_encoder"]) / 1e6 == pytest.approx(image_encoder, rel=0.01)
    text = count(params["unimodal_decoder"]) + count(params["multimodal_decoder"])
    assert text / 1e6 == pytest.approx(text_decoder, rel=rel)


def test_siglip_b16_matches_big_vision_size():
    config = load_config("configs/siglip.py", "b16")
    model = build_model(config.model, config.model.vocab_size, contrastive=contrastive_of(config))
    # ≈203M: open_clip's timm image tower (no image head) has 203.16M; big_vision's head
    # adds 768·768 + 768.
    assert count(summary.abstract_params(model, config)) / 1e6 == pytest.approx(203.16 + 0.59, abs=0.01)


# ------------------------------------------------------------------ small models run


@pytest.mark.parametrize("path", FAMILIES)
def test_default_variants_run_forward(path):
    config = load_config(path)
    model = build_model(config.model, config.data.vocab_size, contrastive=contrastive_of(config))
    n, size, length = 2, config.data.image_size, config.data.text_len - 1
    images = jnp.zeros((n, size, size, 3), jnp.uint8)
    tokens = jnp.ones((n, length), jnp.int32)
    out = jax.jit(lambda k: model.apply(nn.unbox(model.init(k, images, tokens)), images, tokens))(jax.random.key(0))
    chex.assert_shape([out["image_embedding"], out["text_embedding"]], (n, config.model.embed_dim))
    chex.assert_tree_all_finite(out)
    assert ("caption_logits" in out) == (config.model.name == "coca") == model.has_decoder
    if path.endswith("siglip.py"):
        assert float(out["logit_scale"]) == pytest.approx(math.log(10)) and float(out["logit_bias"]) == -10
    else:
        assert float(out["logit_scale"]) == pytest.approx(math.log(1 / 0.07)) and "logit_bias" not in out


def test_clip_text_embedding_is_pooled_at_end_of_text():
    model, _, params = init(tiny_zoo_model("configs/clip.py"))
    _, tokens = batch()  # rows: 5 text tokens, then PAD
    encode = jax.jit(lambda p, t: model.apply({"params": p}, t, method=model.encode_text)[0])
    emb = encode(params, tokens)
    # The last text token (position 4) moves it; padding does not (causal: it sees no pad).
    moved = tokens.copy()
    moved[:, 4] = moved[:, 4] % (VOCAB - 1) + 1
    assert np.all(np.abs(emb - encode(params, moved)).max(axis=-1) > 1e-6)
    bumped = jax.tree.map(np.copy, params)
    bumped["text_encoder"]["token_embedding"]["embedding"][PAD] += 1.0
    np.testing.assert_array_equal(encode(bumped, tokens), emb)


# ------------------------------------------------------------------ logical axis names


@pytest.mark.parametrize("path", FAMILIES)
@pytest.mark.parametrize("scan", [False, True])
def test_every_parameter_has_logical_names_of_its_rank(path, scan):
    model_cfg = tiny_zoo_model(path)
    model_cfg.scan_layers = scan
    _, boxed, _ = init(model_cfg, contrastive=objective_lib.contrastive_type(load_config(path).objective))
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    unnamed = [x for x in leaves if not isinstance(x, nn.Partitioned)]
    assert not unnamed, f"{len(unnamed)} parameters without logical names, e.g. {unnamed[0]}"
    for box in leaves:
        assert len(box.names) == len(box.value.shape), box
    known = {name for name, _ in RULES}
    used = {n for box in leaves for n in box.names if n is not None}
    assert used <= known, f"logical names missing from config.mesh.rules: {used - known}"


# ------------------------------------------------------------------ sharded == single device


# CoCa uses every logical name; SigLIP adds the MAP head and the logit bias; a scanned CLIP
# runs its towers' pooled last blocks on slices of the stacked, sharded parameters.
@pytest.mark.parametrize("path, scan", [("configs/coca.py", False), ("configs/siglip.py", False),
                                        ("configs/clip.py", True)])
def test_forward_on_2x2x2_mesh_equals_single_device(path, scan):
    contrastive = objective_lib.contrastive_type(load_config(path).objective)
    config = tiny_zoo_model(path)
    config.scan_layers = scan
    model, boxed, params = init(config, contrastive=contrastive)
    images, tokens = batch()
    forward = lambda p, x: model.apply({"params": p}, *x)
    expected = jax.jit(forward)(params, (images, tokens))

    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        sharded = jax.device_put(params, sharding.logical_to_sharding(boxed, mesh, RULES))
        inputs = jax.device_put((images, tokens), sharding.batch_sharding(mesh))
        out = jax.jit(forward)(sharded, inputs)
    # FSDP splits `embed`, tensor parallelism `mlp`/`heads`/`vocab`: really sharded.
    encoder = sharded["image_encoder"]["encoder"]
    fc1 = encoder["blocks"]["mlp"]["fc1"]["kernel"] if scan else encoder["block0"]["mlp"]["fc1"]["kernel"]
    assert fc1.sharding.spec == (jax.P(None, "fsdp", "tensor") if scan else jax.P("fsdp", "tensor"))
    chex.assert_trees_all_close(jax.device_get(out), jax.device_get(expected), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ remat and scan


def test_remat_and_scan_give_the_same_stack_and_gradients():
    """Every policy, scanned or not, on a stack with a causal mask and cross-attention."""
    x = np.random.default_rng(0).standard_normal((2, 5, 16)).astype(np.float32)
    context = np.random.default_rng(1).standard_normal((2, 3, 16)).astype(np.float32)
    mask = np.tril(np.ones((5, 5), bool))[None, None]

    def value_and_grad(remat, scan, params):
        stack = layers.Transformer(3, 2, 32, cross_attention=True, remat=remat, scan=scan)
        loss = lambda p, x: jnp.sum(jnp.tanh(stack.apply({"params": p}, x, mask, context)))
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)

    boxed = jax.eval_shape(layers.Transformer(3, 2, 32, cross_attention=True).init, jax.random.key(0), x, mask, context)
    params = random_params(boxed["params"])
    loss, (grads, dx) = value_and_grad("none", False, params)
    for remat, scan in [(r, s) for r in layers.REMAT_CHOICES for s in (False, True)][1:]:  # all but the reference
        v_loss, (v_grads, v_dx) = value_and_grad(remat, scan, scan_layout.stack_blocks(params) if scan else params)
        v_grads = scan_layout.unroll_blocks(v_grads) if scan else v_grads
        np.testing.assert_allclose(v_loss, loss, rtol=1e-6, err_msg=f"{remat=} {scan=}")
        chex.assert_trees_all_close(
            (v_grads, v_dx), (grads, dx), rtol=1e-5, atol=1e-6, custom_message=f"{remat=} {scan=}"
        )


def test_remat_and_scan_give_the_same_loss_and_gradients_for_a_whole_model():
    plain, _, params = init(tiny_zoo_model("configs/coca.py"))
    objective = load_config("configs/coca.py").objective
    loss, grads = jax.jit(jax.value_and_grad(loss_fn(plain, objective)))(params)
    variant_cfg = tiny_zoo_model("configs/coca.py")
    variant_cfg.remat, variant_cfg.scan_layers = "dots", True
    variant = build_model(variant_cfg, VOCAB, PAD, contrastive=objective_lib.contrastive_type(objective))
    v_loss, v_grads = jax.jit(jax.value_and_grad(loss_fn(variant, objective)))(scan_layout.stack_blocks(params))
    np.testing.assert_allclose(v_loss, loss, rtol=1e-6)
    # Same math, different op order under scan: float32 rounding only (|g| reaches ~20).
    chex.assert_trees_all_close(scan_layout.unroll_blocks(v_grads), grads, rtol=1e-5, atol=1e-5)


def test_scan_layout_round_trip_matches_the_scanned_model():
    scanned_cfg = tiny_zoo_model("configs/coca.py", depth=3)
    scanned_cfg.scan_layers = True
    _, _, plain = init(tiny_zoo_model("configs/coca.py", depth=3))
    _, _, scanned = init(scanned_cfg)
    shapes = lambda t: jax.tree.map(lambda x: x.shape, t)
    assert shapes(scan_layout.stack_blocks(plain)) == shapes(scanned)
    assert shapes(scan_layout.unroll_blocks(scanned)) == shapes(plain)
    chex.assert_trees_all_equal(scan_layout.stack_blocks(scan_layout.unroll_blocks(scanned)), scanned)
    chex.assert_trees_all_equal(scan_layout.unroll_blocks(scan_layout.stack_blocks(plain)), plain)


def test_weight_decay_mask_is_the_same_scanned_or_not():
    _, _, plain = init(tiny_zoo_model("configs/clip.py"))
    plain_mask = optim.decay_mask(plain)["image_encoder"]["encoder"]["block0"]
    scanned_mask = optim.decay_mask(scan_layout.stack_blocks(plain))["image_encoder"]["encoder"]["blocks"]
    assert plain_mask == scanned_mask and plain_mask["mlp"]["fc1"] == {"kernel": True, "bias": False}


# ------------------------------------------------------------------ FLIP patch dropout


@pytest.mark.parametrize("path", ["configs/coca.py", "configs/clip.py"])  # without and with a [CLS] token
def test_patch_dropout_acts_only_in_training(path):
    model_cfg = tiny_zoo_model(path)
    plain, _, params = init(model_cfg)
    model_cfg.patch_dropout = 0.5
    dropping = build_model(model_cfg, VOCAB, PAD, contrastive="clip")
    images, _ = batch()

    def encoder(model, train):
        def encode(p, rng):
            return model.apply({"params": p}, images, train, method=model.encode_image, rngs={"dropout": rng})

        return jax.jit(encode)

    evaluate, training = encoder(dropping, False), encoder(dropping, True)
    reference = encoder(plain, False)(params, jax.random.key(0))
    # Evaluation: exactly the model without patch dropout.
    chex.assert_trees_all_equal(evaluate(params, jax.random.key(0)), reference)
    # Training: half of the 16 patches are kept ([CLS] always stays), chosen by the rng.
    emb, tokens = training(params, jax.random.key(0))
    assert tokens.shape[1] == 8 + path.endswith("clip.py")
    assert not np.allclose(emb, reference[0])
    chex.assert_trees_all_equal(training(params, jax.random.key(0)), (emb, tokens))
    assert not np.allclose(training(params, jax.random.key(1))[0], emb)


# ------------------------------------------------------------------ the train step


def train_step_on_one_device(config, pad_id=PAD):
    """-> (initial state, jitted train step, a batch) for `config` on one device."""
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    model = build_model(config.model, VOCAB, pad_id, contrastive=contrastive_of(config))
    tx = optim.make_optimizer(config.optimizer, config.total_steps, train_step.locked_mask(model, config.model))
    schedule = optim.learning_rate_schedule(config.optimizer, config.total_steps)
    images, tokens = batch(8)
    tokens = np.concatenate([tokens, np.zeros((8, 1), np.int32)], axis=1)  # rows of data.text_len = 8
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        state, _ = train.build_state(model, tx, config, mesh, RULES)
    step = jax.jit(train_step.make_train_step(model, tx, schedule, config, mesh, pad_id))
    return state, step, {"image": images, "tokens": tokens}


def test_dropout_rng_is_a_function_of_seed_and_step():
    """What keeps exact resume exact: the patches dropped at step s depend only on (seed, s)."""
    config = tiny_train_config(**{"objective.contrastive.options.impl": "dense", "objective.caption.weight": 0.0})
    config.model = tiny_zoo_model("configs/clip.py", depth=1)
    config.model.patch_dropout = 0.5
    state, step, data = train_step_on_one_device(config)
    _, logs = step(state, data)
    _, again = step(jax.tree.map(jnp.copy, state), data)
    assert float(again["loss"]) == float(logs["loss"])
    _, next_step = step({**state, "step": state["step"] + 1}, data)
    assert float(next_step["loss"]) != float(logs["loss"])


def test_locked_image_tower_gets_no_gradient_and_no_update():
    config = tiny_train_config(**{"model.lock_image": True, "objective.contrastive.options.impl": "dense"})
    state, step, data = train_step_on_one_device(config)
    new_state = state
    for _ in range(2):
        new_state, _ = step(new_state, data)
    params, new_params = state["params"], new_state["params"]
    image = [name for name in CoCa.towers["image"] if name in params]  # this layout's image parameters
    assert image == ["image_encoder", "contrastive_pooler", "caption_pooler", "image_proj"]
    for name in image:  # not even weight decay moves them
        chex.assert_trees_all_equal(new_params[name], params[name])
    for name in CoCa.towers["text"] + ("multimodal_decoder", "logit_scale"):
        moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), new_params[name], params[name])
        assert all(jax.tree.leaves(moved)), name

    # No gradient is computed for it: the locked step has the unlocked one's matmuls minus
    # the image tower's backward ones (its forward ones remain).
    unlocked = tiny_train_config(**{"objective.contrastive.options.impl": "dense"})
    unlocked_state, unlocked_step, _ = train_step_on_one_device(unlocked)
    dots = lambda f, s: str(jax.make_jaxpr(f)(s, data)).count("dot_general")
    assert dots(step, state) < dots(unlocked_step, unlocked_state)


def test_locking_text_freezes_exactly_the_text_tower():
    config = tiny_train_config(**{"model.lock_text": True})
    model = build_model(config.model, VOCAB, PAD, contrastive=contrastive_of(config))
    _, _, params = init(config.model)
    frozen = train_step.locked_mask(model, config.model)(params)
    assert {name for name, sub in frozen.items() if all(jax.tree.leaves(sub))} == set(CoCa.towers["text"])
    assert not any(jax.tree.leaves({k: v for k, v in frozen.items() if k not in CoCa.towers["text"]}))
