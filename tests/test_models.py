"""CoCa modules: shapes, attention masks, and the captioning loss on hand-computed cases."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models import build_model
from mmjax.models.vit import patchify
from mmjax.objectives.captioning import captioning_loss
from tests.helpers import tiny_model_config

VOCAB, PAD = 40, 0


@pytest.fixture(scope="module")
def model_and_params():
    model = build_model(tiny_model_config(), VOCAB, PAD, contrastive="clip")
    images = jnp.zeros((2, 32, 32, 3), jnp.uint8)
    tokens = jnp.ones((2, 7), jnp.int32)
    params = model.init(jax.random.key(0), images, tokens)["params"]
    return model, nn.unbox(params)


def random_tokens(seed, shape=(3, 7)):
    return jax.random.randint(jax.random.key(seed), shape, 1, VOCAB)


def random_images(seed, n=3):
    return jax.random.randint(jax.random.key(seed), (n, 32, 32, 3), 0, 256).astype(jnp.uint8)


def test_output_shapes_and_normalised_embeddings(model_and_params):
    model, params = model_and_params
    out = model.apply({"params": params}, random_images(0), random_tokens(1))
    chex.assert_shape(out["image_embedding"], (3, 32))
    chex.assert_shape(out["text_embedding"], (3, 32))
    chex.assert_shape(out["caption_logits"], (3, 7, VOCAB))
    np.testing.assert_allclose(jnp.linalg.norm(out["image_embedding"], axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(out["text_embedding"], axis=-1), 1.0, rtol=1e-5)
    chex.assert_tree_all_finite(out)
    assert float(out["logit_scale"]) == pytest.approx(np.log(1 / 0.07))


def test_patchify_is_a_stride_p_conv_layout():
    images = jnp.arange(2 * 4 * 4 * 3).reshape(2, 4, 4, 3)
    patches = patchify(images, 2)
    chex.assert_shape(patches, (2, 4, 12))
    np.testing.assert_array_equal(patches[0, 1].reshape(2, 2, 3), images[0, 0:2, 2:4])


def test_unimodal_decoder_cannot_see_future_tokens(model_and_params):
    model, params = model_and_params
    tokens = random_tokens(2)
    changed = tokens.at[:, 4].set((tokens[:, 4] % (VOCAB - 1)) + 1)
    _, feats = model.apply({"params": params}, tokens, method=model.encode_text)
    _, feats_changed = model.apply({"params": params}, changed, method=model.encode_text)
    np.testing.assert_array_equal(feats[:, :4], feats_changed[:, :4])
    assert not np.allclose(feats[:, 4:], feats_changed[:, 4:])


def test_caption_logits_are_causal(model_and_params):
    model, params = model_and_params
    images, tokens = random_images(3), random_tokens(4)
    changed = tokens.at[:, 5].set((tokens[:, 5] % (VOCAB - 1)) + 1)
    logits = model.apply({"params": params}, images, tokens)["caption_logits"]
    logits_changed = model.apply({"params": params}, images, changed)["caption_logits"]
    np.testing.assert_array_equal(logits[:, :5], logits_changed[:, :5])
    assert not np.allclose(logits[:, 5:], logits_changed[:, 5:])


@pytest.mark.parametrize("position", [0, 3, 6])
def test_cls_token_sees_every_text_token(model_and_params, position):
    model, params = model_and_params
    tokens = random_tokens(5)
    changed = tokens.at[:, position].set((tokens[:, position] % (VOCAB - 1)) + 1)
    emb, _ = model.apply({"params": params}, tokens, method=model.encode_text)
    emb_changed, _ = model.apply({"params": params}, changed, method=model.encode_text)
    assert np.all(np.abs(emb - emb_changed).max(axis=-1) > 1e-6)


def test_cls_token_ignores_padding_keys(model_and_params):
    """Masking pads: the embedding of "w1 w2 PAD PAD" must not depend on the pad embedding.

    We check it by giving PAD a different embedding row: the output must not move.
    """
    model, params = model_and_params
    tokens = random_tokens(6).at[:, 4:].set(PAD)
    emb, _ = model.apply({"params": params}, tokens, method=model.encode_text)
    table = params["unimodal_decoder"]["token_embedding"]["embedding"]
    bumped = jax.tree.map(lambda x: x, params)  # a copy we may edit
    bumped["unimodal_decoder"]["token_embedding"]["embedding"] = table.at[PAD].add(1.0)
    emb_bumped, _ = model.apply({"params": bumped}, tokens, method=model.encode_text)
    np.testing.assert_allclose(emb, emb_bumped, atol=1e-6)


def test_image_embedding_does_not_depend_on_text(model_and_params):
    model, params = model_and_params
    images = random_images(7)
    a = model.apply({"params": params}, images, random_tokens(8))["image_embedding"]
    b = model.apply({"params": params}, images, random_tokens(9))["image_embedding"]
    np.testing.assert_array_equal(a, b)


def test_bfloat16_activations_keep_float32_params_and_outputs():
    model = build_model(tiny_model_config("bfloat16"), VOCAB, PAD, contrastive="clip")
    variables = model.init(jax.random.key(0), random_images(0), random_tokens(1))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.unbox(variables)))
    out = model.apply(variables, random_images(0), random_tokens(1))
    assert out["caption_logits"].dtype == jnp.float32
    chex.assert_tree_all_finite(out)


def test_captioning_loss_hand_computed():
    # Two positions with uniform logits over 4 classes -> log 4 each; the third is padding.
    logits = jnp.zeros((1, 3, 4))
    targets = jnp.array([[2, 1, PAD]])
    assert float(captioning_loss(logits, targets, PAD)) == pytest.approx(np.log(4), rel=1e-6)
    # A confident correct prediction at position 0 (p = e^5 / (e^5 + 3)) and uniform at 1.
    logits = logits.at[0, 0, 2].set(5.0)
    expected = (-(5.0 - np.log(np.exp(5.0) + 3)) + np.log(4)) / 2
    assert float(captioning_loss(logits, targets, PAD)) == pytest.approx(expected, rel=1e-6)


def test_captioning_loss_shape_error():
    with pytest.raises(ValueError, match="do not match targets"):
        captioning_loss(jnp.zeros((2, 3, 4)), jnp.zeros((2, 4), jnp.int32))
