"""CoCa pretraining (Yu et al. 2022, "CoCa: Contrastive Captioners are Image-Text Foundation Models").

Default: a small CoCa on the embedded shapes dataset, trained on a 2-core CPU in minutes.

    python -m mmjax.main --config=configs/coca.py
    python -m mmjax.main --config=configs/coca.py --config.total_steps=200 --workdir=/tmp/coca
"""
import ml_collections

from mmjax.data.pipeline import default_data_config

VARIANTS = ("",)  # the paper sizes (base, large, giant) come with the model zoo


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(
            f"unknown variant {variant!r} for configs/coca.py; valid: {[v or '(default)' for v in VARIANTS]}"
        )
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 800
    c.batch_size = 128
    c.log_every = 25
    c.eval_every = 200
    c.checkpoint_every = 200
    c.keep_checkpoints = 2

    c.data = default_data_config()

    c.model = ml_collections.ConfigDict()
    c.model.name = "coca"
    c.model.dtype = "float32"  # activations; parameters, softmax and norms stay f32
    c.model.embed_dim = 128  # contrastive embedding
    c.model.caption_queries = 16  # the paper's 256 image tokens for the decoder, scaled down
    # 2 heads of 64 dims: on CPU many small per-head matmuls cost more than they add here.
    c.model.vision = ml_collections.ConfigDict(dict(patch_size=4, width=128, depth=3, mlp_dim=512, heads=2))
    c.model.text = ml_collections.ConfigDict(
        dict(width=128, unimodal_depth=2, multimodal_depth=2, mlp_dim=512, heads=2)
    )

    c.objective = ml_collections.ConfigDict()
    c.objective.contrastive = "clip"  # symmetric InfoNCE; "siglip" for the sigmoid loss
    c.objective.contrastive_weight = 1.0  # λ_con
    c.objective.caption_weight = 2.0  # λ_cap
    c.objective.impl = "blockwise"  # dense | blockwise | pallas | ring
    c.objective.block_size = 128

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 100
    c.optimizer.final_lr_fraction = 0.0
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.98
    c.optimizer.eps = 1e-6
    c.optimizer.weight_decay = 0.1
    c.optimizer.grad_clip_norm = 1.0

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # all remaining devices
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    # Logical axis -> mesh axes. Parameters: `embed` is split by FSDP, `mlp`/`heads`/`vocab` by
    # tensor parallelism. Activations (`act_*`): batch over data+fsdp, features over tensor.
    c.mesh.rules = [
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("vocab", "tensor"),
        ("kv", None),
        ("length", None),
        ("patch", None),
        ("proj", None),
        ("act_batch", ["data", "fsdp"]),
        ("act_length", None),
        ("act_embed", None),
        ("act_mlp", "tensor"),
        ("act_heads", "tensor"),
        ("act_vocab", "tensor"),
    ]

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 256
    return c
