"""open_clip's state dicts <-> mmjax parameters, for CLIP (ViT-B-32, B-16, L-14) and CoCa.

One table of `Link`s per model config (`links`): each ties open_clip keys to mmjax parameter
paths (unrolled layout, "a/b/c") with a conversion each way, so import (`to_mmjax`), export
(`from_mmjax`) and the expected open_clip shapes (`expected_shapes`) cannot disagree.

What the conversions undo (docs/models.md, "Numerics" and "open_clip's CoCa"):
  * torch Linear weights are [out, in]; flax kernels are [in, out];
  * open_clip's attention fuses q, k, v into in_proj_weight [3w, w] (the CoCa pooler keeps
    q_proj/k_proj/v_proj apart because its keys are wider than its queries); mmjax keeps
    [in, heads, head_dim] kernels per projection and an out kernel [heads, head_dim, w];
  * the patch embedding is a conv [w, 3, p, p] over NCHW pixels; mmjax's is a Dense over
    patches flattened as (row, column, channel).

Checkpoints: `.safetensors` are read with the safetensors package (no torch); `.bin/.pt/.pth`
with torch.load(weights_only=True), torch imported only there.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.errors import UserError
from mmjax.models import scan_layout

Array = object  # numpy array, jax array or tracer: the conversions only reshape, transpose and slice


@dataclasses.dataclass(frozen=True)
class Link:
    torch_keys: tuple[str, ...]
    paths: tuple[str, ...]  # mmjax parameter paths, unrolled layout
    to_mmjax: Callable[..., tuple]  # torch arrays -> mmjax arrays, in `paths` order
    to_torch: Callable[..., tuple]  # mmjax arrays -> torch arrays, in `torch_keys` order


def _same(*xs):
    return xs


def _concatenate(xs):
    """numpy for arrays (export: no device round trip, no compile per call), jnp for tracers (expected_shapes)."""
    return (np if all(isinstance(x, np.ndarray) for x in xs) else jnp).concatenate(xs)


def _linear(t, m) -> list[Link]:
    """torch Linear `t`.weight [out, in] / .bias <-> flax Dense `m`/kernel [in, out] / bias."""
    flip = lambda w: (w.T,)
    return [Link((f"{t}.weight",), (f"{m}/kernel",), flip, flip), Link((f"{t}.bias",), (f"{m}/bias",), _same, _same)]


def _layer_norm(t, m) -> list[Link]:
    return [Link((f"{t}.weight", f"{t}.bias"), (f"{m}/LayerNorm_0/scale", f"{m}/LayerNorm_0/bias"), _same, _same)]


def _attention(t, m, heads: int, fused: bool = True) -> list[Link]:
    """nn.MultiheadAttention `t` <-> layers.Attention `m`. fused: one in_proj_weight [3w, w];
    else q_proj_weight / k_proj_weight / v_proj_weight (keys/values of another width)."""
    names = ("query", "key", "value")

    def kernels_in(*ws):  # torch [w, in] each -> [in, heads, head_dim] each
        return tuple(w.T.reshape(w.shape[1], heads, w.shape[0] // heads) for w in ws)

    def kernels_out(*ks):
        return tuple(k.reshape(k.shape[0], -1).T for k in ks)

    if fused:
        kernels = Link(
            (f"{t}.in_proj_weight",),
            tuple(f"{m}/{n}_kernel" for n in names),
            lambda w: kernels_in(*_thirds(w)),
            lambda *ks: (_concatenate(kernels_out(*ks)),),
        )
    else:
        kernels = Link(tuple(f"{t}.{n[0]}_proj_weight" for n in names), tuple(f"{m}/{n}_kernel" for n in names),
                       kernels_in, kernels_out)
    biases = Link(
        (f"{t}.in_proj_bias",),
        tuple(f"{m}/{n}_bias" for n in names),
        lambda b: tuple(x.reshape(heads, -1) for x in _thirds(b)),
        lambda *bs: (_concatenate([b.reshape(-1) for b in bs]),),
    )
    out = Link(
        (f"{t}.out_proj.weight", f"{t}.out_proj.bias"),
        (f"{m}/out_kernel", f"{m}/out_bias"),
        lambda w, b: (w.T.reshape(heads, -1, w.shape[0]), b),
        lambda k, b: (k.reshape(-1, k.shape[-1]).T, b),
    )
    return [kernels, biases, out]


def _thirds(x):
    n = x.shape[0] // 3
    return x[:n], x[n : 2 * n], x[2 * n :]


def _mlp(t, m) -> list[Link]:
    return _linear(f"{t}.c_fc", f"{m}/fc1") + _linear(f"{t}.c_proj", f"{m}/fc2")


def _block(t, m, heads: int) -> list[Link]:
    """open_clip's ResidualAttentionBlock <-> layers.Block (self-attention and MLP)."""
    return (
        _layer_norm(f"{t}.ln_1", f"{m}/ln_attn")
        + _attention(f"{t}.attn", f"{m}/attn", heads)
        + _layer_norm(f"{t}.ln_2", f"{m}/ln_mlp")
        + _mlp(f"{t}.mlp", f"{m}/mlp")
    )


def _cross_block(t, m, heads: int) -> list[Link]:
    """open_clip's cross-attention ResidualAttentionBlock <-> the second half of an
    open_clip-layout layers.Block."""
    return (
        _layer_norm(f"{t}.ln_1", f"{m}/ln_cross")
        + _layer_norm(f"{t}.ln_1_kv", f"{m}/ln_context")
        + _attention(f"{t}.attn", f"{m}/cross_attn", heads)
        + _layer_norm(f"{t}.ln_2", f"{m}/ln_cross_mlp")
        + _mlp(f"{t}.mlp", f"{m}/cross_mlp")
    )


def _tower(t, m, depth: int, heads: int, block=_block) -> list[Link]:
    return [link for i in range(depth) for link in block(f"{t}.{i}", f"{m}/block{i}", heads)]


def _param(t, m) -> Link:
    return Link((t,), (m,), _same, _same)


def _clip_vit(model_cfg, m: str) -> list[Link]:
    """open_clip's VisionTransformer up to (not including) its pooling <-> mmjax's ViT with a
    class token and ln_pre."""
    v = model_cfg.vision
    p = v.patch_size

    def conv_to_dense(w):  # [w, c, p, p] -> [(row, col, c), w]
        return (w.transpose(2, 3, 1, 0).reshape(p * p * w.shape[1], w.shape[0]),)

    def dense_to_conv(k):
        return (k.reshape(p, p, -1, k.shape[-1]).transpose(3, 2, 0, 1),)

    return [
        Link(("visual.conv1.weight",), (f"{m}/patch_embed/kernel",), conv_to_dense, dense_to_conv),
        _param("visual.class_embedding", f"{m}/cls"),
        _param("visual.positional_embedding", f"{m}/pos_embedding"),
        *_layer_norm("visual.ln_pre", f"{m}/ln_pre"),
        *_tower("visual.transformer.resblocks", f"{m}/encoder", v.depth, v.heads),
    ]


def _clip_links(model_cfg) -> list[Link]:
    t = model_cfg.text
    return [
        *_clip_vit(model_cfg, "image_encoder"),
        *_layer_norm("visual.ln_post", "image_encoder/ln_out"),
        _param("visual.proj", "image_proj/kernel"),  # used as x @ proj: already [in, out]
        _param("token_embedding.weight", "text_encoder/token_embedding/embedding"),
        _param("positional_embedding", "text_encoder/pos_embedding"),
        *_tower("transformer.resblocks", "text_encoder/encoder", t.depth, t.heads),
        *_layer_norm("ln_final", "text_encoder/ln_out"),
        _param("text_projection", "text_proj/kernel"),
        _param("logit_scale", "logit_scale"),
    ]


def _coca_links(model_cfg) -> list[Link]:
    t = model_cfg.text
    return [
        *_clip_vit(model_cfg, "image_encoder"),
        *_layer_norm("visual.attn_pool.ln_k", "image_encoder/ln_out"),  # the pooler normalises the ViT's output
        _param("visual.attn_pool.query", "image_pooler/queries"),
        *_layer_norm("visual.attn_pool.ln_q", "image_pooler/ln_queries"),
        *_attention("visual.attn_pool.attn", "image_pooler/attn", t.heads, fused=False),
        *_layer_norm("visual.ln_post", "image_pooler/ln_out"),
        _param("visual.proj", "image_proj/kernel"),
        _param("text.token_embedding.weight", "unimodal_decoder/token_embedding/embedding"),
        _param("text.positional_embedding", "unimodal_decoder/pos_embedding"),
        _param("text.cls_emb", "unimodal_decoder/cls"),
        *_tower("text.transformer.resblocks", "unimodal_decoder/decoder", t.unimodal_depth, t.heads),
        *_layer_norm("text.ln_final", "unimodal_decoder/ln_cls"),
        _param("text.text_projection", "text_proj/kernel"),
        *_tower("text_decoder.resblocks", "multimodal_decoder/decoder", t.multimodal_depth, t.heads),
        *_tower("text_decoder.cross_attn", "multimodal_decoder/decoder", t.multimodal_depth, t.heads, _cross_block),
        *_layer_norm("text_decoder.ln_final", "multimodal_decoder/ln_out"),
        _param("text_decoder.text_projection", "multimodal_decoder/to_vocab/kernel"),
        _param("logit_scale", "logit_scale"),
    ]


def mappable(model_cfg) -> str | None:
    """Why `model_cfg` has no open_clip counterpart; None when it has one."""
    if model_cfg.name == "clip":
        if model_cfg.image_pool != "cls" or model_cfg.text_pool != "eot" or model_cfg.projection_bias:
            return "only CLIP models with image_pool=cls, text_pool=eot and no projection bias are open_clip's"
        return None
    if model_cfg.get("coca_layout", "paper") != "open_clip":
        return "only CoCa with model.coca_layout=open_clip has open_clip's architecture"
    return None


def links(model_cfg) -> list[Link]:
    reason = mappable(model_cfg)
    if reason:
        raise UserError(f"model {model_cfg.name!r} cannot be mapped to open_clip: {reason}")
    return _clip_links(model_cfg) if model_cfg.name == "clip" else _coca_links(model_cfg)


def _flatten(tree, prefix=""):
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for name, sub in tree.items():
        out.update(_flatten(sub, f"{prefix}/{name}" if prefix else name))
    return out


def _unflatten(flat: dict) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


def to_mmjax(state: dict, model_cfg) -> dict:
    """An open_clip state dict (key -> array) -> mmjax parameters (nested dict) for
    `model_cfg`, stacked when it scans its layers. The state dict must match exactly
    (`check_state` first for a readable error)."""
    flat = {}
    for link in links(model_cfg):
        values = link.to_mmjax(*(np.asarray(state[k], np.float32) for k in link.torch_keys))
        flat.update({path: np.asarray(v) for path, v in zip(link.paths, values)})
    params = _unflatten(flat)
    return scan_layout.stack_blocks(params) if model_cfg.scan_layers else params


def from_mmjax(params: dict, model_cfg) -> dict:
    """mmjax parameters (either layout) -> an open_clip state dict (key -> array)."""
    flat = _flatten(scan_layout.unroll_blocks(params))
    state = {}
    for link in links(model_cfg):
        state.update(zip(link.torch_keys, link.to_torch(*(flat[p] for p in link.paths))))
    return state


def expected_shapes(abstract_params: dict, model_cfg) -> dict[str, tuple]:
    """open_clip key -> shape, for the model whose parameters' shapes are `abstract_params`."""
    shapes = jax.eval_shape(lambda p: from_mmjax(p, model_cfg), abstract_params)
    return {k: tuple(v.shape) for k, v in shapes.items()}


def check_state(state: dict, expected: dict[str, tuple], source: str, model: str, fix: str = "check --model") -> None:
    """UserError, in one line, listing the first mismatches when `state` is not `model`'s (say,
    "open_clip's ViT-B-32")."""
    problems = [  # the most telling first: a wrong shape names the wrong model
        f"{k}: {list(np.shape(state[k]))} in the checkpoint, {list(shape)} in {model}"
        for k, shape in expected.items()
        if k in state and tuple(np.shape(state[k])) != shape
    ]
    problems += [f"{k}: not in {model}" for k in state if k not in expected]
    problems += [f"{k}: missing" for k in expected if k not in state]
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise UserError(f"{source} does not match {model} ({len(problems)} mismatched keys: {shown}); "
                        f"{fix}")


CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def read_checkpoint(path: str) -> dict[str, np.ndarray]:
    """An open_clip checkpoint file -> {key: float32 array}. Accepts a bare state dict or a
    training checkpoint ({"state_dict": ...}, keys maybe prefixed "module.")."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} not found")
    if not path.endswith(CHECKPOINT_SUFFIXES):
        raise UserError(f"checkpoint {path}: unknown file type; give one of {', '.join(CHECKPOINT_SUFFIXES)}")
    try:
        state = _read_safetensors(path) if path.endswith(".safetensors") else _read_torch(path)
    except UserError:
        raise
    except Exception as e:  # a truncated or foreign file: say so in one line
        raise UserError(f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise UserError(f"checkpoint {path} holds no state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _read_safetensors(path):
    from safetensors import safe_open

    with safe_open(path, framework="flax") as f:  # flax, not numpy: numpy has no bfloat16
        return {k: np.asarray(f.get_tensor(k).astype(jnp.float32)) for k in f.keys()}


def _read_torch(path):
    try:
        import torch
    except ImportError:
        raise UserError(f"reading {path} needs torch (pip install torch), or convert it to .safetensors") from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return {k: v.float().numpy() if hasattr(v, "numpy") else v for k, v in state.items()}


def write_safetensors(state: dict, path: str) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.array(v, np.float32, order="C") for k, v in state.items()}, path)  # keeps 0-d logit_scale 0-d
