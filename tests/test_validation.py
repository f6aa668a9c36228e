"""mmjax.validation: a rule for every config key, one line per bad value, and the command
line stopping on it before any work (exit status 2, no workdir)."""
import fnmatch
import functools
import subprocess
import sys

import ml_collections
import pytest

from mmjax import configs, validation
from mmjax.errors import ConfigError

CONFIG_FILES = ("configs/coca.py", "configs/clip.py", "configs/siglip.py")
SHIPPED = [(path, variant) for path in CONFIG_FILES for variant in configs.variants(path)]


@functools.cache
def _shipped(path: str, variant: str) -> dict:
    return configs.load_config(path, variant).to_dict()


def config(name: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
    """A shipped config ("configs/clip.py[:variant]") with dotted-key overrides of any type,
    as a config file could hold them."""
    path, _, variant = name.partition(":")
    c = ml_collections.ConfigDict(_shipped(path, variant), type_safe=False)
    for key, value in (overrides or {}).items():
        *sections, leaf = key.split(".")
        node = c
        for section in sections:
            node = node[section]
        node[leaf] = value
    return c


@pytest.mark.parametrize("path,variant", SHIPPED)
def test_every_shipped_config_is_valid(path, variant):
    validation.validate(configs.load_config(path, variant))


def test_every_config_key_has_a_rule_and_every_rule_a_key():
    keys = {key for path, variant in SHIPPED for key, _ in validation.leaves(configs.load_config(path, variant))}
    assert sorted(k for k in keys if validation.rule_for(k) is None) == [], "config keys without a rule"
    unused = [rule for rule in validation.RULES if not any(fnmatch.fnmatchcase(k, rule) for k in keys)]
    assert unused == [], "rules for keys no shipped config has"


def test_every_evaluator_option_has_a_rule():
    from mmjax import evals

    for kind in evals.TYPES:
        module = evals.module(kind)
        assert set(module.OPTION_RULES) == set(module.OPTIONS), kind
        validation.evaluator_entries(ml_collections.ConfigDict({"evals": {"x": evals.entry(kind)}}))


BAD = [
    # (config, overrides, what the message must name besides each key and value)
    ("configs/coca.py", {"objective.contrastive.options.impl": "nonsense"},
     ["dense, blockwise, pallas, ring", "--config.objective.contrastive.options.impl"]),
    ("configs/coca.py", {"objective.contrastive.type": "nonsense"}, ["clip, siglip, captioning"]),
    ("configs/coca.py", {"objective.contrastive.options.tile": 8}, ["impl, block_size"]),
    ("configs/coca.py", {"objective.caption.weight": -1.0}, ["at least 0"]),
    ("configs/coca.py", {"model.dtype": "float8"}, ["float32, bfloat16"]),
    ("configs/coca.py", {"batch_size": 0}, ["at least 1", "--config.batch_size"]),
    ("configs/coca.py", {"eval.batch_size": -4}, ["at least 1"]),
    ("configs/coca.py", {"keep_checkpoints": 0}, ["at least 1"]),
    ("configs/coca.py", {"total_steps": "800"}, ["an integer at least 1"]),
    ("configs/coca.py", {"optimizer.learning_rate": -1.0}, ["above 0"]),
    ("configs/coca.py", {"optimizer.learning_rate": float("inf")}, ["a finite number above 0"]),
    ("configs/coca.py", {"optimizer.b2": 1.0}, ["[0, 1)"]),
    ("configs/coca.py", {"optimizer.eps": 0.0}, ["above 0"]),
    ("configs/coca.py", {"optimizer.final_lr_fraction": 1.5}, ["[0, 1]"]),
    ("configs/coca.py", {"optimizer.name": "sgd"}, ["adamw"]),
    ("configs/coca.py", {"mesh.data": 0}, ["-1 (all remaining devices) or an integer at least 1"]),
    ("configs/coca.py", {"mesh.data": -1, "mesh.fsdp": -1}, ["at most one mesh axis may be -1"]),
    ("configs/coca.py", {"mesh.rules": [("embed", "fdsp")]}, ["data, fsdp, tensor"]),
    ("configs/coca.py", {"data.train": "nosuch:x"}, ["shapes:, tfds:, wds:", "--config.data.train"]),
    ("configs/coca.py", {"data.train": "shapes@0.7,shapes:eval@-1"}, ["positive weight"]),
    ("configs/siglip.py", {"data.eval": "shapes:test"}, ["train, eval"]),
    ("configs/coca.py", {"data.tokenizer": "/no/such.model"}, ["SentencePiece .model file", "clip_bpe"]),
    ("configs/clip.py", {"data.tokenizer": "clip_bpe:/no/vocab.txt.gz"}, ["bpe_simple_vocab_16e6.txt.gz"]),
    ("configs/coca.py", {"data.text_len": 1}, ["at least 2"]),
    ("configs/coca.py", {"data.image_size": 30}, ["model.vision.patch_size=8", "24 or 32"]),
    ("configs/coca.py", {"data.augment.crop": "random"}, ["random_resized, center"]),
    ("configs/coca.py", {"data.decoder": "turbo"}, ["auto, pillow, simplejpeg"]),
    ("configs/coca.py", {"data.max_bad_fraction": 2.0}, ["[0, 1]"]),
    ("configs/coca.py", {"model.vision.heads": 3}, ["model.vision.width=128", "1, 2, 4, 8, 16, 32, 64"]),
    ("configs/clip.py:vit_l14", {"model.text.heads": 7}, ["model.text.width=768", "1, 2, 3, 4, 6, 8"]),
    ("configs/coca.py", {"model.remat": "some"}, ["none, full, dots"]),
    ("configs/coca.py", {"model.patch_dropout": 1.0}, ["[0, 1)"]),
    ("configs/coca.py", {"model.image_std": (0.5, 0.5, 0.0)}, ["3 numbers above 0"]),
    ("configs/coca.py", {"model.lock_text": "yes"}, ["True or False"]),
    ("configs/coca.py:base", {"model.vocab_size": 50}, ["data.vocab_size=96"]),
    ("configs/clip.py", {"model.image_pool": "avg"}, ["cls, map"]),
    ("configs/siglip.py", {"model.text_pool": "mean"}, ["eot, last"]),
    ("configs/siglip.py", {"objective.contrastive.type": "clip", "model.logit_bias_init": -10.0}, ["no bias"]),
    ("configs/clip.py", {"objective.contrastive.type": "captioning"}, ["model.name='clip'", "coca"]),
    ("configs/coca.py", {"objective.contrastive.weight": 0.0, "objective.caption.weight": 0.0}, ["no loss"]),
    ("configs/coca.py", {"accumulate.steps": 4, "accumulate.mode": "grads"}, ["objective.contrastive", "gradcache"]),
    ("configs/clip.py", {"model.lock_image": True, "model.lock_text": True}, ["nothing to train"]),
    ("configs/coca.py", {"evals.zeroshot.type": "zero"}, ["zeroshot, retrieval, captioning, linear_probe"]),
    ("configs/coca.py", {"evals.zeroshot.options.protocol": "mean"}, ["clip, prob_sum"]),
    ("configs/coca.py", {"evals.captioning.options.method": "nucleus"}, ["greedy, beam, sample"]),
    ("configs/coca.py", {"evals.captioning.options.top_p": 0.0}, ["(0, 1]"]),
    ("configs/coca.py", {"evals.retrieval.options.ks": (0, 5)}, ["a tuple of integers at least 1"]),
    ("configs/coca.py", {"evals.retrieval.data": "nosuch:x"}, ["shapes:, tfds:"]),
    ("configs/coca.py", {"evals.retrieval.every": -1}, ["at least 0"]),
    ("configs/clip.py", {"evals.retrieval.type": "captioning"}, ["no decoder"]),
]


@pytest.mark.parametrize("name,overrides,expected", BAD, ids=[" ".join(f"{k}={v}" for k, v in o.items()) for _, o, _ in BAD])
def test_bad_value_is_one_line_naming_key_value_and_valid_ones(name, overrides, expected):
    with pytest.raises(ConfigError) as e:
        validation.validate(config(name, overrides))
    message = str(e.value)
    assert "\n" not in message
    for key, value in overrides.items():
        shown = [value, *value] if isinstance(value, list) else [value]  # a list: its bad entry will do
        assert key in message and any(repr(v) in message or str(v) in message for v in shown), message
    for text in expected:
        assert text in message, message


@pytest.mark.parametrize("name,overrides", [
    ("configs/coca.py", {"objective.contrastive.type": "siglip"}),  # every model learns SigLIP's bias itself
    ("configs/clip.py", {"objective.contrastive.type": "siglip"}),
    ("configs/coca.py", {"objective.contrastive.weight": 0.0, "accumulate.steps": 4, "accumulate.mode": "grads"}),
    ("configs/coca.py", {"model.lock_image": True, "model.lock_text": True}),  # the decoder still learns
    ("configs/coca.py", {"mesh.data": 2, "mesh.fsdp": -1}),
])
def test_valid_combinations_pass(name, overrides):
    validation.validate(config(name, overrides))


def test_validating_twice_changes_nothing():
    c = configs.load_config("configs/coca.py")
    before = c.to_json()
    validation.validate(c)
    validation.validate(c)
    assert c.to_json() == before


@pytest.mark.parametrize("flag,where", [
    ("--config.model.vison.width=3", "(model has: attention, caption_queries, "),
    ("--config.optimizer.lr=1", "(optimizer has: b1, b2, "),
    ("--config.model.vision.width.x=3", "(model.vision.width is a value, not a section)"),
    ("--config.mesh.rules.x=1", "(mesh.rules is a value, not a section)"),
])
def test_misspelt_key_at_any_depth_is_named(flag, where):
    from mmjax import main  # ml_collections raises KeyError, AttributeError or TypeError for these

    key = flag[len("--config."):].split("=")[0]
    line = main._bad_override([flag], "configs/coca.py")
    assert line.startswith(f"unknown config key {key!r} {where}") and line.endswith(f"fix the --config.{key} flag")


def mmjax_main(*args):
    return subprocess.run([sys.executable, "-m", "mmjax.main", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("flag,expected", [
    ("--config.modle.dtype=x", "error: unknown config key 'modle.dtype' (top level has: accumulate, batch_size, "),
    ("--config.data.name=coco", "error: unknown config key 'data.name' (data has: augment, "),
    ("--config.batch_size=0", "error: batch_size must be at least 1, got 0; set --config.batch_size to"),
    ("--config.model.dtype=float8", "error: unknown model.dtype 'float8'; valid: float32, bfloat16; "),
    ("--config.mesh.rules=3", "error: --config.mesh.rules cannot be set on the command line"),
])
def test_command_line_stops_with_one_line_before_any_work(tmp_path, flag, expected):
    workdir = tmp_path / "run"
    result = mmjax_main("--config=configs/coca.py", f"--workdir={workdir}", flag)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [result.stderr.strip()], result.stderr
    assert result.stderr.startswith(expected), result.stderr
    assert not workdir.exists()
