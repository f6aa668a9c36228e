"""One CLIP training step in mmjax and in open_clip, side by side in one process.

    python -m mmjax.benchmarks.vs_openclip [--model=tiny_clip|clip_b16] [--batch=128] [--steps=10]

Both sides build the same architecture (parameter counts are checked equal) and time a
whole step: pixels normalised from uint8, forward, CLIP's symmetric softmax loss, backward,
gradient clipping and AdamW with the same hyper-parameters (no decay on vectors and
scalars). Inputs are random uint8 images and token rows. mmjax runs the trainer's own step
(mmjax.train_step.make_train_step, state donated as in training); open_clip runs
open_clip.model.CLIP with open_clip.loss.ClipLoss and torch.optim.AdamW. Time: median of
`steps` steps after warm-up (compilation), the frameworks taking turns step by step so that a
shared machine's changing load falls on both alike. On CPU both run f32 with the same number of
threads (torch.set_num_threads to the cores XLA's CPU client uses); on a GPU torch runs as
eager AMP bf16 and torch.compile'd AMP bf16 beside mmjax's configured dtype.
Started as `python -m`, the process restarts with mmjax's malloc tunables
(mmjax.host_memory), which torch's allocations then get too: the JSON records them
(MMJAX_KEEP_BUFFERS=0 runs both on glibc's defaults).

Prints one JSON object per measurement, then a table of examples/s and mmjax/open_clip.
"""
from __future__ import annotations

from mmjax import host_memory

if __name__ == "__main__":  # before jax loads: glibc reads malloc tunables at start-up only
    host_memory.restart_with_kept_buffers("mmjax.benchmarks.vs_openclip")

import json
import os
import platform
import statistics
import time

import flax.linen as nn
import jax
import numpy as np
from absl import app, flags

from mmjax import optim, train, train_step
from mmjax.configs import load_config
from mmjax.interop import openclip_models, torch_peer
from mmjax.models import build_model
from mmjax.objectives import objective
from mmjax.parallel import sharding

MODELS = ("tiny_clip", "clip_b16")

_MODEL = flags.DEFINE_enum("model", "tiny_clip", MODELS, "Architecture built on both sides.")
_BATCH = flags.DEFINE_integer("batch", None, "Global batch (default: 128 for tiny_clip, 256 for clip_b16).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps after warm-up.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps first (the first compiles).")
_TORCH = flags.DEFINE_list("torch", None, "open_clip variants: f32 (CPU default), amp_bf16, compile_bf16 "
                                          "(GPU default: both bf16 ones).")


def model_config(name: str, batch: int):
    """The mmjax config of `name`: configs/clip.py with open_clip's numerics (ε 1e-5, exact GELU)."""
    clip_py = os.path.join(openclip_models.configs_dir(), "clip.py")
    if name == "tiny_clip":
        # The speed issue's tiny CLIP: both towers 256 wide, 4 layers, 4 heads of 64; 64-px
        # images in 8-px patches; 32-token context over a 96-piece vocabulary; 6.55M parameters.
        c = load_config(clip_py)
        c.model.embed_dim = 256
        c.model.vision.update(dict(patch_size=8, width=256, depth=4, mlp_dim=1024, heads=4))
        c.model.text.update(dict(width=256, depth=4, mlp_dim=1024, heads=4))
        c.model.layernorm_eps, c.model.mlp_activation = 1e-5, "gelu"
        c.data.image_size, c.data.text_len, c.data.vocab_size = 64, 33, 96
    elif name == "clip_b16":
        c = load_config(clip_py, "vit_b16")  # open_clip's ViT-B-16: its numerics, vocabulary, 224 px
        c.data.text_len = openclip_models.TEXT_LEN["clip"]
    else:
        raise ValueError(f"unknown model {name!r}; valid: {list(MODELS)}")
    c.batch_size = batch
    c.mesh.data = 1  # one device: the benchmark times a single chip
    return c


def vocab_size(config) -> int:
    return config.model.get("vocab_size") or config.data.vocab_size


def open_clip_kwargs(config) -> dict:
    """open_clip.model.CLIP's arguments for the architecture of an mmjax CLIP config."""
    m, v, t = config.model, config.model.vision, config.model.text
    if m.mlp_activation == "gelu_tanh" or m.layernorm_eps != 1e-5 or m.image_pool != "cls" or m.text_pool != "eot":
        raise ValueError("open_clip's CLIP has LayerNorm ε 1e-5, an exact or quick GELU, [CLS] and EOT pooling; "
                         f"this config has {m.layernorm_eps}, {m.mlp_activation}, {m.image_pool}, {m.text_pool}")
    vision = dict(image_size=config.data.image_size, patch_size=v.patch_size, width=v.width, layers=v.depth,
                  head_width=v.width // v.heads, mlp_ratio=v.mlp_dim / v.width)
    text = dict(context_length=config.data.text_len - 1, vocab_size=vocab_size(config), width=t.width,
                heads=t.heads, layers=t.depth, mlp_ratio=t.mlp_dim / t.width)
    return dict(embed_dim=m.embed_dim, vision_cfg=vision, text_cfg=text, quick_gelu=m.mlp_activation == "quick_gelu")


def random_batch(config, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    size, length = config.data.image_size, config.data.text_len
    return {
        "image": rng.integers(0, 256, (config.batch_size, size, size, 3), dtype=np.uint8),
        "tokens": rng.integers(1, vocab_size(config), (config.batch_size, length), dtype=np.int32),
    }


def round_robin(steps: dict, warmup: int, repeats: int) -> dict:
    """{name: step fn} -> {name: median seconds}. The steps take turns, so a shared machine's
    changing load falls on all of them alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def mmjax_step(config, batch: dict):
    """-> (the trainer's step on one device, its state donated and carried from step to
    step; parameter count)."""
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    rules = sharding.rules_from_config(config.mesh)
    model = build_model(config.model, vocab_size(config), 0, contrastive=objective.contrastive_type(config.objective))
    tx = optim.make_optimizer(config.optimizer, config.total_steps)
    schedule = optim.learning_rate_schedule(config.optimizer, config.total_steps)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state, _ = train.build_state(model, tx, config, mesh, rules)
        step = jax.jit(train_step.make_train_step(model, tx, schedule, config, mesh, 0), donate_argnums=0)
        on_device = jax.device_put(batch, sharding.batch_sharding(mesh))
    box = [state]

    def one_step():
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            box[0], logs = step(box[0], on_device)
        jax.block_until_ready(logs["loss"])

    return one_step, sum(x.size for x in jax.tree.leaves(state["params"]))


def _torch_optimizer(torch, model, opt_cfg):
    """AdamW as mmjax's: weight decay on matrices only (mmjax.optim.decay_mask)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": opt_cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=opt_cfg.learning_rate, betas=(opt_cfg.b1, opt_cfg.b2), eps=opt_cfg.eps)


def open_clip_step(config, batch: dict, variant: str, device: str):
    """-> (one step of open_clip's training loop for its CLIP: loss, backward, clip, AdamW;
    parameter count)."""
    open_clip = torch_peer.open_clip()
    import torch

    torch.manual_seed(0)
    model = open_clip.model.CLIP(**open_clip_kwargs(config)).to(device).train()
    loss_fn = open_clip.loss.ClipLoss()
    opt = _torch_optimizer(torch, model, config.optimizer)
    mean = torch.tensor(config.model.image_mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(config.model.image_std, device=device).view(1, 3, 1, 1)
    images = torch.from_numpy(batch["image"]).to(device)
    tokens = torch.from_numpy(batch["tokens"][:, :-1]).long().to(device)  # the model reads all but the last

    def forward_loss(images, tokens):
        pixels = (images.permute(0, 3, 1, 2).float() / 255.0 - mean) / std
        with torch.autocast(device, torch.bfloat16, enabled=variant != "f32"):
            img, txt, scale = model(pixels, tokens)
            return loss_fn(img.float(), txt.float(), scale.float())

    if variant == "compile_bf16":
        forward_loss = torch.compile(forward_loss)

    def one_step():
        opt.zero_grad(set_to_none=True)
        forward_loss(images, tokens).backward()
        if config.optimizer.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.optimizer.grad_clip_norm)
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()

    return one_step, sum(p.numel() for p in model.parameters())


def environment() -> dict:
    import torch

    import open_clip

    return {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "torch": torch.__version__,
            "open_clip": open_clip.__version__, "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "glibc_tunables": os.environ.get("GLIBC_TUNABLES")}


def compare(model: str, batch: int, steps: int, warmup: int = 2, torch_variants=None) -> list[dict]:
    """Time both frameworks; -> one dict per measurement (mmjax first). Raises if the two
    models' parameter counts differ (they would not be the same architecture)."""
    torch_peer.open_clip()
    import torch

    gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
    config = model_config(model, batch)
    if not gpu:
        config.model.dtype = "float32"  # CPU: f32 on both sides
        # XLA's CPU client runs one intra-op thread per core it may use: give torch as many.
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    variants = torch_variants or (["amp_bf16", "compile_bf16"] if gpu else ["f32"])
    data = random_batch(config)
    built = {("mmjax", config.model.dtype): mmjax_step(config, data)}
    for v in variants:
        built["open_clip", v] = open_clip_step(config, data, v, "cuda" if gpu else "cpu")
    counts = {key: int(params) for key, (_, params) in built.items()}
    if len(set(counts.values())) != 1:
        raise AssertionError(f"parameter counts differ: {counts}")
    seconds = round_robin({key: step for key, (step, _) in built.items()}, warmup, steps)
    env = environment()
    return [{"framework": framework, "variant": variant, "model": model, "batch": batch,
             "params": counts[framework, variant], "step_seconds": s, "examples_per_sec": batch / s, **env}
            for (framework, variant), s in seconds.items()]


def table(rows: list[dict]) -> str:
    reference = {r["variant"]: r["examples_per_sec"] for r in rows if r["framework"] == "open_clip"}
    lines = ["| framework | variant | params | step (s) | examples/s | mmjax / this |", "|---|---|---:|---:|---:|---:|"]
    ours = rows[0]["examples_per_sec"]
    for r in rows:
        ratio = f"{ours / reference[r['variant']]:.2f}×" if r["framework"] == "open_clip" else "-"
        lines.append(f"| {r['framework']} | {r['variant']} | {r['params']:,} | {r['step_seconds']:.3f} | "
                     f"{r['examples_per_sec']:.1f} | {ratio} |")
    return "\n".join(lines)


def main(argv):
    del argv
    batch = _BATCH.value or (128 if _MODEL.value == "tiny_clip" else 256)
    rows = compare(_MODEL.value, batch, _STEPS.value, _WARMUP.value, _TORCH.value)
    for r in rows:
        print(json.dumps(r))
    print(f"\n{rows[0]['model']}, batch {batch}, {rows[0]['device']}, {rows[0]['threads']} torch threads "
          f"(XLA's CPU client uses every core it may: {len(os.sched_getaffinity(0))})\n")
    print(table(rows))


if __name__ == "__main__":
    app.run(main)
