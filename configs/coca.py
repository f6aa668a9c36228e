"""CoCa pretraining (Yu et al. 2022, "CoCa: Contrastive Captioners are Image-Text Foundation Models").

Default: a small CoCa on the embedded shapes dataset, trained on a 2-core CPU in minutes.

    python -m mmjax.main --config=configs/coca.py
    python -m mmjax.main --config=configs/coca.py --config.total_steps=200 --workdir=/tmp/coca

Paper sizes (Table 1), for accelerator pods; inspect them without allocating anything:

    python -m mmjax.tools.summary --config=configs/coca.py:base     # also :large, :giant
    python -m mmjax.tools.summary --config=configs/coca.py:openclip_b32   # open_clip's coca_ViT-B-32 (and _l14)
    python -m mmjax.main --config=configs/coca.py:base --workdir=runs/coca_base

Our reading of the paper for those variants:
  * Sizes: image encoder layers/MLP/width/heads, text decoder n_uni+n_multi/MLP/width/heads —
    base 12/3072/768/12, 12+12/3072/768/12; large 24/4096/1024/16, 12+12/4096/1024/16;
    giant ("CoCa") 40/6144/1408/16, 18+18/5632/1408/16.
  * Images 288×288 with 18×18 patches: 256 image tokens. Two attentional poolers (one
    multi-head attention layer with n learned queries, then LayerNorm) attend to the ViT's
    output in parallel (Figure 2's pseudocode passes `img_feature` to both): n=1 gives the
    contrastive image embedding, n=256 the tokens every multimodal layer cross-attends to.
  * Text: a 64k SentencePiece vocabulary; the unimodal decoder's [CLS] output (appended
    after the text) is the text embedding; the output projection is not tied to the input
    embedding.
  * Contrastive embedding dimension: the paper gives none (Figure 2 contrasts the pooled
    features directly); we use the model width (768/1024/1408) and keep a linear
    projection per tower, as open_clip's CoCa does (2·width² extra parameters).
  * Loss 1·L_con + 2·L_cap; batch 65,536, 500k steps, peak lr 8e-4 after a 2% warmup, β1 0.9,
    β2 0.999, decoupled weight decay 0.01. The paper uses Adafactor and a linear decay; we
    use our AdamW and cosine decay with those values.
  * Not in the paper: text context length — we use 64 tokens (ALIGN's and SigLIP's).
Data: every config reads `data.train` / `data.eval` source specs (README, "Train on your
own data"). They default to the embedded shapes dataset, which the paper variants render at
288 px; point them at real data with e.g. --config.data.train='wds:/data/cc12m/{00000..01242}.tar'
--config.data.vocab_size=64000 (a 64k tokenizer trained on its captions) or
--config.data.tokenizer=FILE. The paper variants crop randomly (open_clip's scale 0.9–1)
and normalise with CLIP's pixel mean/std. The run settings are the paper's; run them on a
pod, not a laptop.
"""
import ml_collections
from ml_collections.config_dict import placeholder

from mmjax import evals
from mmjax.data.pipeline import CLIP_IMAGE_MEAN, CLIP_IMAGE_STD, default_data_config
from mmjax.objectives.objective import term

VARIANTS = ("", "base", "large", "giant", "openclip_b32", "openclip_l14")

# Table 1. One width for both towers; the text decoder is n_uni unimodal + n_multi multimodal layers.
PAPER_SIZES = {
    "base": dict(width=768, heads=12, vision_depth=12, vision_mlp=3072, n_uni=12, n_multi=12, text_mlp=3072),
    "large": dict(width=1024, heads=16, vision_depth=24, vision_mlp=4096, n_uni=12, n_multi=12, text_mlp=4096),
    "giant": dict(width=1408, heads=16, vision_depth=40, vision_mlp=6144, n_uni=18, n_multi=18, text_mlp=5632),
}


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(
            f"unknown variant {variant!r} for configs/coca.py; valid: {[v or '(default)' for v in VARIANTS]}"
        )
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 1600
    c.batch_size = 128
    c.log_every = 50
    c.eval_every = 400
    c.checkpoint_every = 400
    c.keep_checkpoints = 2
    # A step whose loss or gradient norm is not finite is skipped; this many in a row stop the run.
    c.max_nonfinite_steps = 5
    # Throughput: MFU = analytic FLOPs / step time / this per-device bf16 peak in TFLOP/s. None:
    # the device's row of mmjax.throughput.PEAK_TFLOPS (no MFU on a device it does not list).
    c.peak_tflops = placeholder(float)
    # jax's persistent compilation cache, so a resumed or repeated run does not recompile:
    # "user" ($XDG_CACHE_HOME or ~/.cache, /mmjax/xla) | "workdir" (<workdir>/xla_cache) | "off" | a directory.
    c.compilation_cache = "user"
    # "N,M": a jax.profiler trace of train steps N..M into <workdir>/profile (TensorBoard, Perfetto).
    c.profile_steps = ""
    # Fine-tune: a new run's parameters from a workdir or an OpenCLIP checkpoint file (step and
    # optimizer fresh); include/exclude are regexes over parameter paths (README, "Fine-tune from
    # weights"). Not "from": a Python keyword cannot be set as --config.init.from.
    c.init = ml_collections.ConfigDict(dict(path="", include="", exclude=""))

    c.data = default_data_config()
    # The embedded scenes are rendered at image_size with objects near the edges: a random
    # crop would cut some out of the picture and the caption would lie.
    c.data.augment.crop = "center"

    c.model = ml_collections.ConfigDict()
    c.model.name = "coca"
    c.model.dtype = "float32"  # activations; parameters, softmax and norms stay f32
    c.model.embed_dim = 128  # contrastive embedding
    c.model.caption_queries = 16  # the paper's 256 image tokens for the decoder, scaled down
    # "paper": the paper's CoCa; "open_clip": open_clip's (mmjax.models.coca, docs/models.md).
    c.model.coca_layout = "paper"
    # 8-px patches (16 tokens): a third of the step time of 4-px patches (64 tokens); in 1,600
    # steps they reach the held-out results 4-px patches reached in 800, in 3/4 of the time
    # (docs/benchmarks.md, "Default CoCa run"). 2 heads of 64 dims: on CPU many small per-head
    # matmuls cost more than they add.
    c.model.vision = ml_collections.ConfigDict(dict(patch_size=8, width=128, depth=3, mlp_dim=512, heads=2))
    c.model.text = ml_collections.ConfigDict(
        dict(width=128, unimodal_depth=2, multimodal_depth=2, mlp_dim=512, heads=2)
    )
    # Memory/speed options, all off by default.
    c.model.remat = "none"  # per block: none | full (save nothing) | dots (save weight matmuls) | auto (the least that fits)
    c.model.scan_layers = False  # nn.scan over identical blocks: compile time independent of depth
    # How attention is computed (mmjax.models.layers.ATTENTION_IMPLS); same parameters, same maths.
    c.model.attention = "auto"
    c.model.patch_dropout = 0.0  # FLIP: share of image patches dropped in training
    c.model.lock_image = False  # LiT: freeze the image tower
    c.model.lock_text = False  # LiT: freeze the text tower
    c.model.image_mean = (0.5, 0.5, 0.5)  # pixels are normalised on device: (x/255 - mean) / std
    c.model.image_std = (0.5, 0.5, 0.5)
    # Numerics (docs/models.md, "Numerics"): flax's and big_vision's; open_clip's CLIP: 1e-5 and "gelu".
    c.model.layernorm_eps = 1e-6  # every LayerNorm's ε
    c.model.mlp_activation = "gelu_tanh"  # every MLP's: gelu (exact, erf) | gelu_tanh | quick_gelu (x·σ(1.702x))
    # The contrastive loss's learned scalars: None takes objective.contrastive.type's paper init
    # (softmax: log 1/0.07 clamped at log 100, no bias; sigmoid: log 10, no clamp, b = -10).
    c.model.logit_scale_init = placeholder(float)  # t′: logits are scaled by exp(t′)
    c.model.logit_scale_max = placeholder(float)  # clamp on t′; inf: none
    c.model.logit_bias_init = placeholder(float)  # SigLIP's b; sigmoid loss only

    # The loss: Σ weight · loss over named terms {type, weight, options}, each logged as <name>_loss
    # (types: mmjax.objectives.registry). A term with weight 0 is not computed.
    c.objective = ml_collections.ConfigDict()
    # λ_con · L_con. type: clip (symmetric InfoNCE) | siglip (sigmoid; also the logit inits);
    # impl: dense | blockwise | pallas | ring (a sharded batch runs blockwise/pallas tiles on a ring).
    c.objective.contrastive = term("clip", 1.0, impl="blockwise", block_size=128)
    c.objective.caption = term("captioning", 2.0)  # λ_cap · L_cap: next-token cross-entropy

    # Gradient accumulation: each step's gradient from `steps` micro-batches of batch_size / steps
    # (each a multiple of the mesh's batch shards), for a batch whose activations do not fit.
    # mode: gradcache (GradCache: exact for contrastive terms too; a second forward pass) |
    # grads (sums micro-batch gradients; per-example terms only, e.g. captioning alone).
    c.accumulate = ml_collections.ConfigDict(dict(steps=1, mode="gradcache"))  # steps 1: off

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
    # Slices (TPU multislice) along data: a hybrid mesh whose data axis spans dcn_data slices;
    # data/fsdp/tensor above are then the sizes within one slice.
    c.mesh.dcn_data = 1
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
        ("layers", None),  # the stacked axis of scanned blocks
        ("act_batch", ["data", "fsdp"]),
        ("act_length", None),
        ("act_embed", None),
        ("act_mlp", "tensor"),
        ("act_heads", "tensor"),
        ("act_vocab", "tensor"),
    ]

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 256  # every evaluator's batch
    # Evaluators (mmjax.evals): zero-shot, retrieval and captioning on data.eval, every eval_every
    # steps and at the end. Add benchmarks as entries, e.g. in a config file:
    #   c.evals.cifar10 = evals.entry("zeroshot", data="tfds:cifar10:test", class_names="cifar10", templates="cifar")
    c.evals = evals.embedded_entries(has_decoder=True)
    if variant in PAPER_SIZES:
        paper_variant(c, PAPER_SIZES[variant])
    elif variant:
        open_clip_variant(c, OPEN_CLIP_SIZES[variant])
    return c


def paper_variant(c: ml_collections.ConfigDict, size: dict) -> None:
    """The paper's model and run settings on top of the default config."""
    w = size["width"]
    c.model.update(dict(dtype="bfloat16", embed_dim=w, caption_queries=256, vocab_size=64_000))
    c.model.vision.update(
        dict(patch_size=18, width=w, depth=size["vision_depth"], mlp_dim=size["vision_mlp"], heads=size["heads"])
    )
    c.model.text.update(
        dict(
            width=w,
            unimodal_depth=size["n_uni"],
            multimodal_depth=size["n_multi"],
            mlp_dim=size["text_mlp"],
            heads=size["heads"],
        )
    )
    c.model.scan_layers = True  # compile time independent of depth
    # The 2.1B model keeps only block inputs; the others take the least remat that fits the chip.
    c.model.remat = "full" if w > 1024 else "auto"
    c.data.image_size = 288
    c.data.augment.crop = "random_resized"
    c.model.update(dict(image_mean=CLIP_IMAGE_MEAN, image_std=CLIP_IMAGE_STD))
    c.data.text_len = 65  # BOS…EOS rows; the model reads all but the last: a 64-token context
    c.batch_size = 65_536
    c.total_steps = 500_000
    c.log_every, c.eval_every, c.checkpoint_every = 100, 10_000, 5_000
    c.optimizer.update(dict(learning_rate=8e-4, warmup_steps=10_000, b2=0.999, weight_decay=0.01))
    c.objective.contrastive.options.block_size = 1024
    c.mesh.data, c.mesh.fsdp = 1, -1  # fully sharded data parallel over every device


# open_clip's coca_ViT-B-32 / coca_ViT-L-14: embedding (= text width); vision width/layers/heads/patch; text heads.
OPEN_CLIP_SIZES = {
    "openclip_b32": dict(embed=512, vision_width=768, vision_depth=12, vision_heads=12, patch=32, text_heads=8),
    "openclip_l14": dict(embed=768, vision_width=1024, vision_depth=24, vision_heads=16, patch=14, text_heads=12),
}


def open_clip_variant(c: ml_collections.ConfigDict, size: dict) -> None:
    """open_clip's CoCa architecture and numerics (model.coca_layout="open_clip", LayerNorm ε
    1e-5, exact GELU, CLIP's pixel mean/std, 224 px, 76 text tokens + [CLS], vocabulary 49,408
    for data.tokenizer=clip_bpe) with configs/clip.py's run settings (LAION-style); the
    loss weights are open_clip's CoCa defaults (1·L_con + 2·L_cap, as the paper's)."""
    e, w = size["embed"], size["vision_width"]
    c.model.update(dict(dtype="bfloat16", embed_dim=e, caption_queries=256, vocab_size=49_408, coca_layout="open_clip"))
    c.model.update(dict(layernorm_eps=1e-5, mlp_activation="gelu", image_mean=CLIP_IMAGE_MEAN, image_std=CLIP_IMAGE_STD))
    c.model.vision.update(
        dict(patch_size=size["patch"], width=w, depth=size["vision_depth"], mlp_dim=4 * w, heads=size["vision_heads"])
    )
    c.model.text.update(dict(width=e, unimodal_depth=12, multimodal_depth=12, mlp_dim=4 * e, heads=size["text_heads"]))
    c.model.scan_layers, c.model.remat = True, "auto"
    c.data.image_size = 224
    c.data.augment.crop = "random_resized"
    c.data.text_len = 77  # BOS…EOS rows; the model reads all but the last: open_clip's 76 tokens (+ [CLS])
    c.batch_size = 32_768
    c.total_steps = 400_000
    c.log_every, c.eval_every, c.checkpoint_every = 100, 10_000, 5_000
    c.optimizer.update(dict(learning_rate=5e-4, warmup_steps=10_000, b2=0.98, eps=1e-6, weight_decay=0.2))
    c.objective.contrastive.options.block_size = 1024
    c.mesh.data, c.mesh.fsdp = -1, 1
