"""Model numerics as config options (model.layernorm_eps, model.mlp_activation): each
activation is its formula, LayerNorm uses the configured ε, the options reach every
tower of a built model, and they change no parameter."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.scipy.special import erf

from mmjax import validation
from mmjax.configs import load_config
from mmjax.errors import ConfigError
from mmjax.models import build_model, layers, model_numerics


def _formula(name, h):
    if name == "gelu":  # exact: x·Φ(x)
        return 0.5 * h * (1.0 + erf(h / math.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * h * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h**3)))
    if name == "quick_gelu":
        return h * jax.nn.sigmoid(1.702 * h)
    raise AssertionError(name)


def test_the_choices_are_the_three_gelus():
    assert layers.ACTIVATIONS == ("gelu", "gelu_tanh", "quick_gelu")


@pytest.mark.parametrize("name", layers.ACTIVATIONS)
def test_mlp_applies_its_activation_formula(name):
    x = jax.random.normal(jax.random.key(0), (2, 5, 8)) * 3.0
    mlp = layers.Mlp(16, activation=name)
    params = mlp.init(jax.random.key(1), x)["params"]
    p = nn.unbox(params)
    h = x @ p["fc1"]["kernel"] + p["fc1"]["bias"]
    expected = _formula(name, h) @ p["fc2"]["kernel"] + p["fc2"]["bias"]
    np.testing.assert_allclose(mlp.apply({"params": params}, x), expected, rtol=1e-5, atol=1e-6)


def test_the_activations_differ():
    """Large enough differences that a test comparing builds can tell them apart."""
    h = jnp.linspace(-4.0, 4.0, 101)
    outputs = {name: layers.ACTIVATION_FUNCTIONS[name](h) for name in layers.ACTIVATIONS}
    assert float(jnp.max(jnp.abs(outputs["gelu"] - outputs["gelu_tanh"]))) > 1e-4
    assert float(jnp.max(jnp.abs(outputs["gelu"] - outputs["quick_gelu"]))) > 1e-2


def test_unknown_activation_is_refused():
    with pytest.raises(ValueError, match="valid: \\['gelu', 'gelu_tanh', 'quick_gelu'\\]"):
        layers.Numerics(mlp_activation="relu")
    with pytest.raises(ValueError, match="above 0"):
        layers.Numerics(layernorm_eps=0.0)


@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_layernorm_uses_its_epsilon(eps):
    # A near-constant row: variance 2e-6, comparable to ε, so ε changes the output a lot.
    # (Centred at 0: flax's one-pass variance E[x²] − E[x]² would lose digits around 1.)
    x = jnp.array([[0.0, 2e-3, -2e-3, 0.0]])
    ln = layers.Numerics(layernorm_eps=eps).layer_norm(jnp.float32, "ln")
    y = ln.apply(ln.init(jax.random.key(0), x), x)
    centred = x - x.mean(-1, keepdims=True)
    expected = centred / jnp.sqrt((centred**2).mean(-1, keepdims=True) + eps)
    np.testing.assert_allclose(y, expected, rtol=1e-4)
    other = 1e-6 if eps == 1e-5 else 1e-5
    wrong = centred / jnp.sqrt((centred**2).mean(-1, keepdims=True) + other)
    assert float(jnp.max(jnp.abs(y - wrong))) > 0.1


def _tiny_b32(**overrides):
    """configs/clip.py:vit_b32's model section at width 32, 2 blocks, 32-px images."""
    model = load_config("configs/clip.py", "vit_b32").model
    model.update(dict(embed_dim=16, vocab_size=64, dtype="float32", remat="none", **overrides))
    model.vision.update(dict(patch_size=8, width=32, depth=2, mlp_dim=128, heads=2))
    model.text.update(dict(width=32, depth=2, mlp_dim=128, heads=2))
    return model


IMAGES = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
TOKENS = np.array([[1, 5, 9, 2, 0, 0, 0, 0], [1, 7, 3, 8, 4, 2, 0, 0]], np.int32)


def traced_norms_and_mlps(model, images, tokens):
    """{(module path, ε or activation)} of every LayerNorm and Mlp a forward pass calls
    (traced with eval_shape: nothing is computed)."""
    seen = set()

    def record(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(module, nn.LayerNorm):
            seen.add((module.scope.path[:-1], module.epsilon))  # the flax LayerNorm inside ours
        if context.method_name == "__call__" and isinstance(module, layers.Mlp):
            seen.add((module.scope.path, module.activation))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        shapes = jax.eval_shape(model.init, jax.random.key(0), images, tokens)
    return seen, shapes


def test_clip_variants_carry_open_clip_numerics_and_the_defaults_keep_mmjax():
    for variant in ("vit_b32", "vit_b16", "vit_l14"):
        model = load_config("configs/clip.py", variant).model
        assert (model.layernorm_eps, model.mlp_activation) == (1e-5, "gelu"), variant
    for path, variant in [("configs/coca.py", ""), ("configs/coca.py", "base"), ("configs/clip.py", ""),
                          ("configs/siglip.py", ""), ("configs/siglip.py", "b16")]:
        model = load_config(path, variant).model
        assert (model.layernorm_eps, model.mlp_activation) == (1e-6, "gelu_tanh"), (path, variant)


def test_built_clip_b32_has_open_clip_numerics_in_every_module():
    model = build_model(_tiny_b32(), 64, contrastive="clip")
    assert model.numerics == layers.Numerics(layernorm_eps=1e-5, mlp_activation="gelu")
    seen, _ = traced_norms_and_mlps(model, IMAGES, TOKENS)
    blocks = ("encoder", "blocks")  # the variant scans its blocks: one module per stack
    assert seen == {
        (("image_encoder", "ln_pre"), 1e-5),
        (("image_encoder", *blocks, "ln_attn"), 1e-5),
        (("image_encoder", *blocks, "ln_mlp"), 1e-5),
        (("image_encoder", *blocks, "mlp"), "gelu"),
        (("image_encoder", "ln_out"), 1e-5),
        (("text_encoder", *blocks, "ln_attn"), 1e-5),
        (("text_encoder", *blocks, "ln_mlp"), 1e-5),
        (("text_encoder", *blocks, "mlp"), "gelu"),
        (("text_encoder", "ln_out"), 1e-5),
    }


def test_the_options_change_outputs_but_no_parameter():
    shapes = lambda cfg: jax.eval_shape(build_model(cfg, 64, contrastive="clip").init, jax.random.key(0), IMAGES,
                                        TOKENS)
    reference = shapes(_tiny_b32(scan_layers=False))
    rng = np.random.default_rng(1)  # random values everywhere (LayerNorm scales too): no init to compile
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), s.dtype), nn.unbox(reference))

    def embeddings(**numerics):
        cfg = _tiny_b32(scan_layers=False, **numerics)
        same = jax.tree.map(lambda s: (s.shape, s.dtype), nn.unbox(shapes(cfg)))
        assert same == jax.tree.map(lambda s: (s.shape, s.dtype), nn.unbox(reference)), numerics
        out = build_model(cfg, 64, contrastive="clip").apply(params, IMAGES, TOKENS)  # {"params": ...}
        return np.concatenate([out["image_embedding"], out["text_embedding"]])

    open_clip = embeddings()
    for numerics in (dict(layernorm_eps=1e-6), dict(mlp_activation="gelu_tanh"), dict(mlp_activation="quick_gelu")):
        # Unit-norm embeddings: f32 rounding is ~1e-7; ε alone moves them ~1e-5 here, the activations more.
        assert np.max(np.abs(embeddings(**numerics) - open_clip)) > 2e-6, numerics


@pytest.mark.parametrize("path", ["configs/coca.py", "configs/siglip.py"])
def test_numerics_reach_coca_and_siglip_poolers_and_decoders(path):
    model_cfg = load_config(path).model
    model_cfg.update(dict(embed_dim=16, vocab_size=64, layernorm_eps=0.5, mlp_activation="quick_gelu"))
    model_cfg.vision.update(dict(patch_size=8, width=16, depth=1, mlp_dim=32, heads=2))
    text_depths = dict(unimodal_depth=1, multimodal_depth=1) if model_cfg.name == "coca" else dict(depth=1)
    model_cfg.text.update(dict(width=16, mlp_dim=32, heads=2, **text_depths))
    model = build_model(model_cfg, 64, contrastive="siglip" if "siglip" in path else "clip")
    seen, _ = traced_norms_and_mlps(model, IMAGES[:, :16, :16], TOKENS)
    owners = {p[0] for p, _ in seen}
    if model_cfg.name == "coca":
        assert owners == {"image_encoder", "contrastive_pooler", "caption_pooler", "unimodal_decoder",
                          "multimodal_decoder"}
    else:  # SigLIP: the MAP head has a LayerNorm and an Mlp of its own
        assert owners == {"image_encoder", "image_pooler", "text_encoder"}
        assert {(("image_pooler", "ln"), 0.5), (("image_pooler", "mlp"), "quick_gelu")} <= seen
    assert {value for _, value in seen} == {0.5, "quick_gelu"}


def test_a_model_section_without_the_keys_gets_the_defaults():
    model_cfg = load_config("configs/coca.py").model
    del model_cfg["layernorm_eps"]
    del model_cfg["mlp_activation"]
    assert model_numerics(model_cfg) == layers.Numerics(1e-6, "gelu_tanh")


@pytest.mark.parametrize("key,value,words", [
    ("model.mlp_activation", "relu", "gelu, gelu_tanh, quick_gelu"),
    ("model.layernorm_eps", 0.0, "above 0"),
    ("model.layernorm_eps", -1e-5, "above 0"),
    ("model.layernorm_eps", "1e-5", "a finite number above 0"),
])
def test_validation_names_the_bad_numerics(key, value, words):
    config = ml_collections.ConfigDict(load_config("configs/clip.py", "vit_b32").to_dict(), type_safe=False)
    config.model[key.split(".")[1]] = value  # a config file could hold any type
    with pytest.raises(ConfigError, match=key.replace(".", "\\.")) as e:
        validation.validate_section(config.model, "model.")
    assert words in str(e.value)
    with pytest.raises(ValueError, match=key.replace(".", "\\.")):
        model_numerics(config.model)
