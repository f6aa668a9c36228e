"""A tower pooled at one position computes its last block at that position only
(layers.Block's query_index): the same outputs and gradients as the whole block, then a take."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models import build_model, layers
from mmjax.models.text import causal_mask
from tests.helpers import tiny_zoo_model

BATCH, LENGTH, WIDTH = 3, 7, 16
PAD = 0


def assert_trees_close(a, b, rtol=1e-5):
    """Leaf by leaf, to `rtol` of the largest entry of the whole tree: the attention key
    bias's gradient is zero up to rounding (softmax ignores a constant added to every logit
    of a row), so leaf-relative tolerances would compare rounding noise."""
    scale = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(a))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=rtol * scale), a, b)


MASKS = {
    "none": None,
    "causal": causal_mask(LENGTH),
    "per_example_keys": jnp.arange(LENGTH)[None, None, None, :] < jnp.array([7, 3, 5])[:, None, None, None],
}


def tiny_model_and_batch(config_file, depth, **options):
    """-> (model config, CLIP/SigLIP model, uint8 images, token rows with EOT at 8, 3 and 5)."""
    config = tiny_zoo_model(config_file, depth=depth)
    config.update(options)
    vocab = 40
    model = build_model(config, vocab, PAD, contrastive="siglip" if "siglip" in config_file else "clip")
    images = jax.random.randint(jax.random.key(0), (BATCH, 32, 32, 3), 0, 256).astype(jnp.uint8)
    tokens = jax.random.randint(jax.random.key(1), (BATCH, 9), 1, vocab)
    tokens = jnp.where(jnp.arange(9)[None] < jnp.array([[9], [4], [6]]), tokens, PAD)
    return config, model, images, tokens


@pytest.mark.parametrize("mask_name", list(MASKS))
def test_block_at_one_position_matches_the_whole_block(mask_name):
    mask = MASKS[mask_name]
    block = layers.Block(num_heads=2, mlp_dim=32)
    x = jax.random.normal(jax.random.key(0), (BATCH, LENGTH, WIDTH))
    index = jnp.array([6, 2, 4])
    params = block.init(jax.random.key(1), x)["params"]
    weights = jax.random.normal(jax.random.key(2), (BATCH, 1, WIDTH))

    def whole(p, x):
        return layers.take_positions(block.apply({"params": p}, x, mask), index)

    def one_position(p, x):
        return block.apply({"params": p}, x, mask, query_index=index)

    np.testing.assert_allclose(one_position(params, x), whole(params, x), rtol=1e-5, atol=1e-6)
    loss = lambda f: lambda p, x: jnp.sum(f(p, x) * weights)
    assert_trees_close(jax.grad(loss(whole), argnums=(0, 1))(params, x),
                       jax.grad(loss(one_position), argnums=(0, 1))(params, x))


def test_one_position_and_a_decoding_step_exclude_each_other():
    block = layers.Block(num_heads=2, mlp_dim=32, kv_cache=True)
    x = jnp.ones((BATCH, 1, WIDTH))
    params = block.init(jax.random.key(0), x)["params"]
    with pytest.raises(ValueError, match="query_index and cache_index"):
        block.apply({"params": params}, x, query_index=jnp.zeros(BATCH, jnp.int32), cache_index=0,
                    mutable=["cache"])


@pytest.mark.parametrize("config_file, scan, remat", [
    ("configs/clip.py", False, "none"), ("configs/clip.py", True, "none"), ("configs/clip.py", True, "dots"),
    ("configs/siglip.py", False, "none"), ("configs/siglip.py", True, "none"),
])
def test_training_embeddings_and_gradients_are_the_whole_towers(config_file, scan, remat):
    """CLIP's __call__ (last blocks at the [CLS]/EOT position; SigLIP's text at the last one)
    against encode_image/encode_text with every token's features computed. A scanned stack
    runs depth - 1 blocks as a scan over slices of its stacked parameters, then the last."""
    config, model, images, tokens = tiny_model_and_batch(config_file, depth=3, scan_layers=scan, remat=remat)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(2), images, tokens)["params"])
    weights = jax.random.normal(jax.random.key(3), (2, BATCH, config.embed_dim))

    def pooled_only(p):
        out = model.apply({"params": p}, images, tokens)
        return out["image_embedding"], out["text_embedding"]

    def whole_towers(p):
        image, image_tokens = model.apply({"params": p}, images, method=model.encode_image)
        text, features = model.apply({"params": p}, tokens, method=model.encode_text)
        assert image_tokens.shape[1] > 1 and features.shape == (BATCH, 9, 32)
        return image, text

    # Jitted: op by op, each of the hundreds of ops would be compiled on its own (~20% slower).
    for fast, reference in zip(jax.jit(pooled_only)(params), jax.jit(whole_towers)(params)):
        np.testing.assert_allclose(fast, reference, rtol=1e-5, atol=1e-6)
    loss = lambda f: lambda p: sum(jnp.sum(e * w) for e, w in zip(f(p), weights))
    assert_trees_close(jax.jit(jax.grad(loss(whole_towers)))(params), jax.jit(jax.grad(loss(pooled_only)))(params))


@pytest.mark.parametrize("config_file", ["configs/clip.py", "configs/siglip.py"])
def test_evaluation_embeddings_are_the_whole_towers(config_file):
    """embed_image/embed_text (what the evaluators' predictors call) against the full encoders."""
    _, model, images, tokens = tiny_model_and_batch(config_file, depth=2)
    params = nn.unbox(model.init(jax.random.key(2), images, tokens)["params"])
    apply = lambda method, x: model.apply({"params": params}, x, method=method)
    np.testing.assert_allclose(apply(model.embed_image, images), apply(model.encode_image, images)[0],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(apply(model.embed_text, tokens), apply(model.encode_text, tokens)[0],
                               rtol=1e-5, atol=1e-6)


def test_a_scanned_tower_scans_all_but_its_last_block():
    """The pooled path of a scanned stack is taken: its scans run depth - 1 blocks, not depth."""
    _, model, images, tokens = tiny_model_and_batch("configs/clip.py", depth=3, scan_layers=True)
    params = jax.eval_shape(model.init, jax.random.key(0), images, tokens)["params"]
    jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, images, tokens))(nn.unbox(params))
    scans = [e.params["length"] for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    assert scans == [2, 2]  # the image tower's and the text tower's
