"""Small configs shared by the tests."""
import ml_collections
import numpy as np

from mmjax.configs import load_config


def tiny_model_config(dtype: str = "float32") -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            name="coca",
            dtype=dtype,
            embed_dim=32,
            caption_queries=8,
            vision=dict(patch_size=8, width=32, depth=1, mlp_dim=64, heads=2),
            text=dict(width=32, unimodal_depth=1, multimodal_depth=1, mlp_dim=64, heads=2),
            remat="none",
            scan_layers=False,
            patch_dropout=0.0,
            image_mean=(0.5, 0.5, 0.5),
            image_std=(0.5, 0.5, 0.5),
            lock_image=False,
            lock_text=False,
        )
    )


def tiny_train_config(**overrides) -> ml_collections.ConfigDict:
    """The default CoCa config shrunk to run a step in about a second."""
    config = load_config("configs/coca.py")
    config.model = tiny_model_config()
    config.batch_size = 16
    config.total_steps = 4
    config.log_every = 2
    config.eval_every = 4
    config.checkpoint_every = 2
    config.optimizer.warmup_steps = 2
    config.data.num_eval = 32
    config.eval.batch_size = 16
    config.objective.contrastive.options.block_size = 8
    for key, value in overrides.items():
        node = config
        *path, leaf = key.split(".")
        for part in path:
            node = node[part]
        node[leaf] = value
    return config


def tiny_zoo_model(config_file: str, depth: int = 2) -> ml_collections.ConfigDict:
    """The model section of `config_file`'s default, shrunk to width 32 and `depth` blocks
    per stack (≥ 2 so that a scan over the blocks is a real loop)."""
    from mmjax.configs import load_config

    model = load_config(config_file).model
    model.embed_dim = 32
    model.vision.update(dict(patch_size=8, width=32, depth=depth, mlp_dim=64, heads=2))
    if model.name == "coca":
        model.caption_queries = 8
        model.text.update(dict(width=32, unimodal_depth=depth, multimodal_depth=depth, mlp_dim=64, heads=2))
    else:
        model.text.update(dict(width=32, depth=depth, mlp_dim=64, heads=2))
    return model


def take(it, n):
    """The next n elements of an iterator."""
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    """Two lists of batches (dicts of arrays) are equal, key by key."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
