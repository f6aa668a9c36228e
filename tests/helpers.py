"""Small configs shared by the tests."""
import ml_collections


def tiny_model_config(dtype: str = "float32") -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            name="coca",
            dtype=dtype,
            embed_dim=32,
            caption_queries=8,
            vision=dict(patch_size=8, width=32, depth=1, mlp_dim=64, heads=2),
            text=dict(width=32, unimodal_depth=1, multimodal_depth=1, mlp_dim=64, heads=2),
        )
    )


def tiny_train_config(**overrides) -> ml_collections.ConfigDict:
    """The default CoCa config shrunk to run a step in about a second."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("coca_config", "configs/coca.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.model = tiny_model_config()
    config.batch_size = 16
    config.total_steps = 4
    config.log_every = 2
    config.eval_every = 4
    config.checkpoint_every = 2
    config.optimizer.warmup_steps = 2
    config.data.num_eval = 32
    config.eval.batch_size = 16
    config.objective.block_size = 8
    for key, value in overrides.items():
        node = config
        *path, leaf = key.split(".")
        for part in path:
            node = node[part]
        node[leaf] = value
    return config
