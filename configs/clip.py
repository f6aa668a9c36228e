"""CLIP pretraining (Radford et al. 2021) with open_clip's ViT-B/32, ViT-B/16 and ViT-L/14.

Default: a small CLIP on the embedded shapes dataset, trained on a 2-core CPU in minutes
(configs/coca.py's run settings, no captioning loss).

    python -m mmjax.main --config=configs/clip.py
    python -m mmjax.main --config=configs/clip.py:vit_b32 --workdir=runs/clip_b32   # on a pod
    python -m mmjax.tools.summary --config=configs/clip.py:vit_l14

The variants follow open_clip's model configs: 224 px images; text context 77, vocabulary
49,408, 12 layers, MLP 4×; pre-LN blocks; the image is pooled at a [CLS] token after
ln_post and projected without bias; the text is causal and pooled at its end-of-text
token; learnable temperature log(1/0.07), clamped at log 100. Numerics as open_clip's
model names ViT-B-32, ViT-B-16, ViT-L-14 (torch's): LayerNorm ε 1e-5 and exact GELU
(model.layernorm_eps, model.mlp_activation). OpenAI's original weights (open_clip's
`-quickgelu` names) need --config.model.mlp_activation=quick_gelu. The small default keeps
mmjax's numerics (ε 1e-6, tanh-GELU).

    variant  embed  vision width/layers/heads/patch  text width/heads
    vit_b32  512    768 / 12 / 12 / 32               512 / 8
    vit_b16  512    768 / 12 / 12 / 16               512 / 8
    vit_l14  768    1024 / 24 / 16 / 14              768 / 12

Run settings: roughly open_clip's LAION-400M recipe (batch 32,768, lr 5e-4, weight decay
0.2, β2 0.98, ε 1e-6, 10k warmup steps, ~32 epochs), random-resized crops (scale 0.9–1)
and CLIP's pixel mean/std. Data: `data.train` / `data.eval` default to the embedded shapes
dataset rendered at 224 px; point them at real data (README, "Train on your own data").
"""
import ml_collections
from ml_collections.config_dict import placeholder

from mmjax.configs import load_config, sibling
from mmjax.data.pipeline import CLIP_IMAGE_MEAN, CLIP_IMAGE_STD

VARIANTS = ("", "vit_b32", "vit_b16", "vit_l14")

# open_clip's model configs: embed dim, patch; vision width/layers/heads; text width/heads.
OPEN_CLIP_SIZES = {
    "vit_b32": dict(embed=512, patch=32, vision_width=768, vision_depth=12, vision_heads=12, text_width=512, text_heads=8),
    "vit_b16": dict(embed=512, patch=16, vision_width=768, vision_depth=12, vision_heads=12, text_width=512, text_heads=8),
    "vit_l14": dict(embed=768, patch=14, vision_width=1024, vision_depth=24, vision_heads=16, text_width=768, text_heads=12),
}


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(
            f"unknown variant {variant!r} for configs/clip.py; valid: {[v or '(default)' for v in VARIANTS]}"
        )
    c = load_config(sibling(__file__, "coca.py"))  # run settings, data, mesh rules, eval
    c.model = clip_model(
        embed=128, patch=4, vision_width=128, vision_depth=3, vision_heads=2, text_width=128, text_heads=2, text_depth=3
    )
    # Contrastive only: no caption term (not one of weight 0), as the model has no decoder to train.
    del c.objective.caption
    del c.evals.captioning  # no decoder
    if variant:
        open_clip_variant(c, OPEN_CLIP_SIZES[variant])
    return c


def clip_model(
    *,
    embed,
    patch,
    vision_width,
    vision_depth,
    vision_heads,
    text_width,
    text_heads,
    text_depth=12,
    layernorm_eps=1e-6,
    mlp_activation="gelu_tanh",
):
    """A CLIP model section; MLPs are 4× wide. Numerics default to mmjax's (flax's)."""
    return ml_collections.ConfigDict(
        dict(
            name="clip",
            dtype="float32",  # activations; parameters, softmax and norms stay f32
            embed_dim=embed,
            vision=dict(
                patch_size=patch, width=vision_width, depth=vision_depth, mlp_dim=4 * vision_width, heads=vision_heads
            ),
            text=dict(width=text_width, depth=text_depth, mlp_dim=4 * text_width, heads=text_heads),
            image_pool="cls",  # [CLS] token, ln_pre, bias-free patch embedding (open_clip's ViT)
            text_pool="eot",  # causal, pooled at the end-of-text token
            projection_bias=False,
            layernorm_eps=layernorm_eps,  # every LayerNorm's ε
            mlp_activation=mlp_activation,  # every MLP's: gelu (exact) | gelu_tanh | quick_gelu
            # None: objective.contrastive.type's paper init (configs/coca.py, mmjax.models).
            logit_scale_init=placeholder(float),
            logit_scale_max=placeholder(float),
            logit_bias_init=placeholder(float),
            remat="none",  # per block: none | full | dots | auto (the least that fits the device)
            scan_layers=False,
            attention="auto",  # mmjax.models.layers.ATTENTION_IMPLS
            patch_dropout=0.0,  # FLIP
            lock_image=False,  # LiT
            lock_text=False,
            image_mean=(0.5, 0.5, 0.5),  # pixels are normalised on device: (x/255 - mean) / std
            image_std=(0.5, 0.5, 0.5),
        )
    )


def open_clip_variant(c: ml_collections.ConfigDict, size: dict) -> None:
    c.model = clip_model(**size, layernorm_eps=1e-5, mlp_activation="gelu")  # open_clip's (torch's) numerics
    c.model.update(dict(dtype="bfloat16", vocab_size=49_408, remat="auto", scan_layers=True))
    c.data.image_size = 224
    c.data.augment.crop = "random_resized"
    c.model.update(dict(image_mean=CLIP_IMAGE_MEAN, image_std=CLIP_IMAGE_STD))
    c.data.text_len = 78  # BOS…EOS rows; the model reads all but the last: a 77-token context
    c.batch_size = 32_768
    c.total_steps = 400_000
    c.log_every, c.eval_every, c.checkpoint_every = 100, 10_000, 5_000
    c.optimizer.update(dict(learning_rate=5e-4, warmup_steps=10_000, b2=0.98, eps=1e-6, weight_decay=0.2))
    c.objective.contrastive.options.block_size = 1024
    c.mesh.data, c.mesh.fsdp = -1, 1
