"""Caption decoding throughput with and without the KV cache.

    python -m mmjax.benchmarks.decode [--size=small|base] [--batch=...] [--context=64] [--method=greedy]

Decodes `batch` captions of `context` tokens (text_len = context + 1) from precomputed
image tokens (random, [batch, image_tokens, width]): the image encoder costs the same with
and without the cache, so it is left out. EOS is banned (min_len = context), so every
caption is full length and both variants do the same number of steps. Parameters are a
random init. Each variant is compiled and run once, then the two are timed round-robin
(`--repeats` times each; the median is reported), so a noisy shared machine slows both
alike. Prints one JSON object per measurement, then a table.

--size=base is a CoCa-Base text decoder (width 768, 12 heads, 12 unimodal + 12 multimodal
layers, MLP 3072, 256 image tokens, 64k vocabulary); small is a CPU-sized one (width 256,
4 heads, 2 + 2 layers, MLP 1024, 64 image tokens, 8k vocabulary). The default is base on an
accelerator and small on CPU.
"""
from __future__ import annotations

import json
import platform
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app, flags

from mmjax.models import decoding
from mmjax.models.coca import CoCa

SIZES = {
    "small": dict(width=256, heads=4, unimodal=2, multimodal=2, mlp=1024, image_tokens=64, vocab=8192),
    "base": dict(width=768, heads=12, unimodal=12, multimodal=12, mlp=3072, image_tokens=256, vocab=64000),
}

_SIZE = flags.DEFINE_enum("size", None, list(SIZES), "Decoder size; default: base on an accelerator, small on CPU.")
_BATCH = flags.DEFINE_integer("batch", None, "Captions per call; default: 64 (base), 8 (small).")
_CONTEXT = flags.DEFINE_integer("context", 64, "Generated tokens per caption (text_len = context + 1).")
_METHOD = flags.DEFINE_enum("method", "greedy", list(decoding.METHODS), "Decoding method.")
_BEAM = flags.DEFINE_integer("beam_size", 4, "Beams, for --method=beam.")
_DTYPE = flags.DEFINE_enum(
    "dtype", None, ["float32", "bfloat16"], "Activations; default: bf16 on an accelerator, f32 on CPU."
)
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per variant, after one warm-up call each.")
_VARIANTS = flags.DEFINE_list("variants", ["cached", "uncached"], "Which of cached,uncached to measure.")

BOS, EOS, PAD = 1, 2, 0


def decoder_model(size: str, dtype) -> CoCa:
    s = SIZES[size]
    # The vision tower is never run (decoding starts from image tokens): keep it minimal.
    return CoCa(
        vocab_size=s["vocab"], patch_size=16, vision_width=s["width"], vision_depth=1, vision_mlp_dim=s["mlp"],
        vision_heads=s["heads"], text_width=s["width"], unimodal_depth=s["unimodal"], multimodal_depth=s["multimodal"],
        text_mlp_dim=s["mlp"], text_heads=s["heads"], embed_dim=s["width"], caption_queries=s["image_tokens"],
        pad_id=PAD, dtype=dtype,
    )


def decoder_params(model: CoCa, text_len: int):
    """Random-init parameters of the two text decoders (and the model's scalars) only."""
    image_tokens = jnp.zeros((1, model.caption_queries, model.text_width), model.dtype)
    tokens = jnp.zeros((1, text_len - 1), jnp.int32)
    init = jax.jit(lambda key: nn.unbox(model.init(key, image_tokens, tokens, method=model.caption_prefill)["params"]))
    return init(jax.random.key(0))


def main(argv):
    del argv
    backend = jax.default_backend()
    size = _SIZE.value or ("small" if backend == "cpu" else "base")
    batch = _BATCH.value or (8 if size == "small" else 64)
    dtype_name = _DTYPE.value or ("float32" if backend == "cpu" else "bfloat16")
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype_name]
    context = _CONTEXT.value
    text_len = context + 1
    options = decoding.DecodeOptions(method=_METHOD.value, beam_size=_BEAM.value, min_len=context)
    model = decoder_model(size, dtype)
    params = decoder_params(model, text_len)
    image_tokens = jax.random.normal(jax.random.key(1), (batch, model.caption_queries, model.text_width), dtype)
    env = {"device": jax.devices()[0].device_kind, "backend": backend, "jax": jax.__version__,
           "cpu": platform.processor() or platform.machine()}
    common = {"size": size, **SIZES[size], "batch": batch, "context": context, "method": options.method,
              "dtype": jnp.dtype(dtype).name, **({"beam_size": options.beam_size} if options.method == "beam" else {})}

    def decoder(use_cache):
        fn = lambda p, t: decoding.caption_from_image_tokens(
            model, p, t, text_len=text_len, bos_id=BOS, eos_id=EOS, pad_id=PAD, options=options,
            rng=jax.random.key(2), use_cache=use_cache,
        )
        return jax.jit(fn)

    fns, compile_s, times, outputs = {}, {}, {}, {}
    for variant in _VARIANTS.value:
        if variant not in ("cached", "uncached"):
            raise app.UsageError(f"--variants: unknown {variant!r}; valid: cached, uncached")
        fns[variant] = decoder(variant == "cached")
        start = time.perf_counter()
        outputs[variant] = jax.block_until_ready(fns[variant](params, image_tokens))  # compile + warm-up
        compile_s[variant] = time.perf_counter() - start
        times[variant] = []
    for _ in range(_REPEATS.value):
        for variant, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(params, image_tokens))
            times[variant].append(time.perf_counter() - start)
    rows = []
    for variant in fns:
        seconds = statistics.median(times[variant])
        rows.append({"name": f"decode_{variant}", **common, "seconds": seconds, "captions_per_sec": batch / seconds,
                     "tokens_per_sec": batch * context / seconds, "ms_per_step": 1e3 * seconds / context,
                     "first_call_seconds": compile_s[variant], "all_seconds": times[variant], **env})
    if len(rows) == 2:
        same = bool((outputs["cached"] == outputs["uncached"]).all())
        speedup = rows[1]["seconds"] / rows[0]["seconds"]
        for r in rows:
            r["cached_speedup"] = speedup
            r["same_tokens"] = same
    for r in rows:
        print(json.dumps(r))
    print("\n| variant | captions/s | tokens/s | ms per step | speed-up |\n|---|---:|---:|---:|---:|")
    base = rows[-1]["seconds"]
    for r in rows:
        print(f"| {r['name']} | {r['captions_per_sec']:.2f} | {r['tokens_per_sec']:.0f} | {r['ms_per_step']:.2f} | "
              f"{base / r['seconds']:.1f}× |")


if __name__ == "__main__":
    app.run(main)
