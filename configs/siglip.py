"""SigLIP pretraining (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training").

Default: a small SigLIP on the embedded shapes dataset, trained on a 2-core CPU in minutes
(configs/clip.py's small model and run settings, with SigLIP's head, text tower and loss).

    python -m mmjax.main --config=configs/siglip.py
    python -m mmjax.main --config=configs/siglip.py:b16 --workdir=runs/siglip_b16   # on a pod
    python -m mmjax.tools.summary --config=configs/siglip.py:b16

SigLIP as in the paper and big_vision's two_towers model:
  * loss −Σ log σ(z_ij·(t·x_i·y_j + b)) / B with z = +1 on the diagonal, −1 elsewhere;
    t = exp(t′), t′ = log 10 and b = −10 learned (t is not clamped).
  * image: ViT without [CLS] token, pooled by a MAP head (one probe attending to the
    tokens, then a residual MLP); text: bidirectional transformer (no causal or padding
    mask) pooled at its last position; both projections ("heads") have a bias.
  * b16: 224 px, patch 16, width 768, 12 layers, 12 heads, MLP 3072 on both towers;
    text vocabulary 32,000 and context 64; embedding 768.
  * numerics: big_vision's (flax's nn.LayerNorm ε 1e-6, nn.gelu's tanh approximation), in
    every variant (b16 starts from clip.py:vit_b16, which has open_clip's).
Run settings for b16: batch 32,768, lr 1e-3, weight decay 1e-4, β2 0.95 (the paper's
large-batch settings); pixels scaled to [-1, 1] as big_vision does (mean = std = 0.5), not
CLIP's statistics. Data: `data.train` / `data.eval` default to the embedded shapes dataset
rendered at 224 px; point them at real data (README, "Train on your own data").
"""
import ml_collections

from mmjax.configs import load_config, sibling

VARIANTS = ("", "b16")


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(
            f"unknown variant {variant!r} for configs/siglip.py; valid: {[v or '(default)' for v in VARIANTS]}"
        )
    # The small CLIP (default), or open_clip's ViT-B/16 at 224 px; then SigLIP's changes.
    c = load_config(sibling(__file__, "clip.py"), "vit_b16" if variant == "b16" else "")
    if variant == "b16":
        c.model.update(dict(embed_dim=768, vocab_size=32_000))
        c.model.text.update(dict(width=768, heads=12, mlp_dim=3072))
        c.data.text_len = 65  # BOS…EOS rows; the model reads all but the last: a 64-token context
        c.optimizer.update(dict(learning_rate=1e-3, weight_decay=1e-4, b2=0.95))
        c.model.update(dict(image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)))
    c.model.update(
        dict(
            image_pool="map",  # MAP head; no [CLS] token, no ln_pre, patch embedding with bias
            text_pool="last",  # bidirectional, pooled at the last position
            projection_bias=True,
            layernorm_eps=1e-6,  # big_vision: flax nn.LayerNorm's default
            mlp_activation="gelu_tanh",  # big_vision: flax nn.gelu's default (approximate=True)
        )
    )
    c.objective.contrastive.type = "siglip"  # also the inits: t′ = log 10 (not clamped), b = -10
    return c
