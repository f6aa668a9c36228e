"""open_clip model names <-> mmjax configs (the repository's configs/ variants).

    ViT-B-32, ViT-B-16, ViT-L-14       configs/clip.py:vit_b32, vit_b16, vit_l14
    (each also -quickgelu: OpenAI's weights, model.mlp_activation=quick_gelu)
    coca_ViT-B-32, coca_ViT-L-14       configs/coca.py:openclip_b32, openclip_l14

An imported model's config is the variant's, evaluated in float32, with open_clip's
tokenizer (data.tokenizer=clip_bpe) and context: CLIP reads 77 tokens, CoCa 76 (+ its [CLS]).
"""
from __future__ import annotations

import os

import ml_collections

import mmjax
from mmjax.configs import load_config
from mmjax.errors import UserError

MODELS = {
    "ViT-B-32": ("clip.py", "vit_b32"),
    "ViT-B-16": ("clip.py", "vit_b16"),
    "ViT-L-14": ("clip.py", "vit_l14"),
    "coca_ViT-B-32": ("coca.py", "openclip_b32"),
    "coca_ViT-L-14": ("coca.py", "openclip_l14"),
}
QUICK_GELU = "-quickgelu"  # open_clip's suffix for OpenAI's weights, trained with x·σ(1.702x)
NAMES = tuple(MODELS) + tuple(name + QUICK_GELU for name in MODELS if not name.startswith("coca"))
TEXT_LEN = {"clip": 78, "coca": 77}  # rows the data pipeline makes; the model reads all but the last

# What fixes an architecture: two configs that agree on these describe the same open_clip model.
ARCHITECTURE = ("name", "vocab_size", "embed_dim", "vision", "text", "mlp_activation", "layernorm_eps", "coca_layout",
                "caption_queries", "image_pool", "text_pool", "projection_bias")


def configs_dir() -> str:
    """The repository's configs/: beside the mmjax package (pip install -e .), else in the
    working directory (a clone's root, as the README's commands run)."""
    beside = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(mmjax.__file__))), "configs")
    for path in (beside, os.path.abspath("configs")):
        if os.path.isfile(os.path.join(path, "clip.py")):
            return path
    raise UserError(f"the repository's configs/ is neither beside the mmjax package ({beside}) nor in the working "
                    "directory; run from a clone's root (git clone ... && pip install -e .)")


def config_for(name: str, tokenizer: str = "clip_bpe") -> ml_collections.ConfigDict:
    """The mmjax config of open_clip model `name` (UserError listing NAMES if unknown)."""
    if name not in NAMES:
        raise UserError(f"unknown open_clip model {name!r}; supported: {', '.join(NAMES)}")
    base = name.removesuffix(QUICK_GELU)
    file, variant = MODELS[base]
    config = load_config(os.path.join(configs_dir(), file), variant)
    config.model.dtype = "float32"  # open_clip's weights are f32: evaluate them as they are
    if name.endswith(QUICK_GELU):
        config.model.mlp_activation = "quick_gelu"
    config.data.tokenizer = tokenizer
    config.data.text_len = TEXT_LEN[config.model.name]
    return config


def _architecture(model_cfg) -> dict:
    d = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    return {k: d.get(k) for k in ARCHITECTURE}


def name_for(model_cfg) -> str:
    """The open_clip name of the architecture `model_cfg` describes (UserError if none)."""
    for name in NAMES:
        if _architecture(config_for(name).model) == _architecture(model_cfg):
            return name
    raise UserError(f"this {model_cfg.name} is not one of open_clip's architectures mmjax maps ({', '.join(NAMES)}): "
                    "its model section differs from every configs/ variant for them")
