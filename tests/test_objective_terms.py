"""config.objective as named terms (mmjax.objectives): the default CoCa/CLIP/SigLIP losses are
the old formula's to the bit, a new term is one registration, old config.json files read in
today's schema, and flags and validation reach every term."""
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import ml_collections

from mmjax import run_record, validation
from mmjax.configs import load_config
from mmjax.errors import ConfigError
from mmjax.objectives import captioning, contrastive, objective, registry

B, D, L, V, PAD = 16, 8, 6, 11, 0


def fake_outputs(kind, seed=0):
    """Model outputs of the right shapes: unit embeddings, scalars, caption logits."""
    keys = jax.random.split(jax.random.key(seed), 3)
    unit = lambda k: (lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True))(jax.random.normal(k, (B, D)))
    outputs = {"image_embedding": unit(keys[0]), "text_embedding": unit(keys[1]), "logit_scale": jnp.float32(2.3),
               "caption_logits": jax.random.normal(keys[2], (B, L, V))}
    if kind == "siglip":
        outputs["logit_bias"] = jnp.float32(-10.0)
    return outputs


def fake_batch(seed=1):
    targets = np.array(jax.random.randint(jax.random.key(seed), (B, L), 1, V))
    targets[::3, 4:] = PAD
    return {"targets": jnp.asarray(targets)}


def old_total_loss(outputs, targets, kind, con_weight, cap_weight, block_size):
    """The objective before named terms (mmjax.objectives.multimodal.total_loss, one device)."""
    total = 0.0
    if con_weight:
        total = total + con_weight * contrastive.contrastive_loss(
            kind, outputs["image_embedding"], outputs["text_embedding"], outputs["logit_scale"],
            outputs.get("logit_bias"), impl="blockwise", block_size=block_size, mesh=None)
    if cap_weight:
        total = total + cap_weight * captioning.captioning_loss(outputs["caption_logits"], targets, PAD)
    return total


@pytest.mark.parametrize("path,kind,caption_weight", [
    ("configs/coca.py", "clip", 2.0), ("configs/clip.py", "clip", 0.0), ("configs/siglip.py", "siglip", 0.0)])
def test_default_losses_and_gradients_are_the_old_formula_to_the_bit(path, kind, caption_weight):
    config = load_config(path)
    assert objective.contrastive_type(config.objective) == kind
    terms = objective.build(config.objective, mesh=None, pad_id=PAD)
    outputs, batch = fake_outputs(kind), fake_batch()
    block = config.objective.contrastive.options.block_size
    new = jax.jit(jax.value_and_grad(lambda o: objective.total_loss(terms, o, batch)[0]))(outputs)
    old = jax.jit(jax.value_and_grad(
        lambda o: old_total_loss(o, batch["targets"], kind, 1.0, caption_weight, block)))(outputs)
    np.testing.assert_array_equal(new[0], old[0])
    for key in old[1]:
        np.testing.assert_array_equal(new[1][key], old[1][key], err_msg=key)
    logs = objective.total_loss(terms, outputs, batch)[1]
    assert set(logs) == {"contrastive_loss", *(["caption_loss"] if caption_weight else [])}


def test_a_new_term_is_one_registration(monkeypatch):
    monkeypatch.setattr(registry, "TYPES", dict(registry.TYPES))
    squared = lambda outputs, batch, context: (context.options["scale"] * jnp.mean(outputs["logit_scale"] ** 2), {})
    registry.register("scale_penalty", registry.TermType(squared, batch_coupled=False, options=dict(scale=0.5),
                                                         option_rules=dict(scale=validation.number(0))))
    config = load_config("configs/clip.py")
    config.objective.penalty = objective.term("scale_penalty", 0.1)
    validation.validate(config)
    terms = objective.build(config.objective, mesh=None, pad_id=PAD)
    total, logs = objective.total_loss(terms, fake_outputs("clip"), fake_batch())
    assert logs["penalty_loss"] == pytest.approx(0.5 * 2.3**2)
    assert float(total) == pytest.approx(float(logs["contrastive_loss"] + 0.1 * logs["penalty_loss"]))


def test_weight_zero_terms_are_neither_computed_nor_logged():
    config = load_config("configs/coca.py")
    config.objective.contrastive.weight = 0.0
    terms = objective.build(config.objective, mesh=None, pad_id=PAD)
    assert [t.name for t in terms.terms] == ["caption"]


@pytest.mark.parametrize("path", ["configs/coca.py", "configs/clip.py", "configs/siglip.py"])
def test_an_old_flat_config_json_reads_in_todays_schema(tmp_path, path):
    config = load_config(path)
    record = run_record.as_record(config)
    options = record["objective"]["contrastive"]["options"]
    record["objective"] = dict(contrastive=record["objective"]["contrastive"]["type"], contrastive_weight=1.0,
                               caption_weight=record["objective"].get("caption", {}).get("weight", 0.0),
                               impl=options["impl"], block_size=options["block_size"])
    del record["accumulate"]
    (tmp_path / run_record.FILENAME).write_text(json.dumps(record))
    read = run_record.read(str(tmp_path))
    assert read == run_record.as_record(config)
    assert run_record.check_resume(read, config, saved_step=1) == []  # resumes with no change noted


def test_flags_reach_every_term():
    """The command line's parser (mmjax.main.parse_flags, validation included) in a fresh process."""
    code = ("import json, sys; from absl import flags; from mmjax import main; main.parse_flags(sys.argv); "
            "print(json.dumps(flags.FLAGS.config.to_dict()))")
    args = ["--config=configs/coca.py", "--config.objective.contrastive.type=siglip",
            "--config.objective.caption.weight=0", "--config.objective.contrastive.options.impl=dense",
            "--config.accumulate.steps=4"]
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    config = ml_collections.ConfigDict(json.loads(result.stdout.splitlines()[-1]))
    assert objective.contrastive_type(config.objective) == "siglip"
    assert (config.objective.caption.weight, config.objective.contrastive.options.impl) == (0.0, "dense")
    assert config.accumulate.steps == 4


@pytest.mark.parametrize("change,expected", [
    (lambda c: c.objective.update(extra=objective.term("clip", 1.0)), "each train the model's logit scale"),
    (lambda c: c.objective.contrastive.update(dict(extra=1)), "a term has exactly ['type', 'weight', 'options']"),
    (lambda c: [c.objective.__delattr__(n) for n in ("contrastive", "caption")], "an empty objective leave no loss"),
])
def test_bad_objectives_are_one_line(change, expected):
    config = load_config("configs/coca.py")
    change(config)
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("]", r"\]")) as e:
        validation.validate(config)
    assert "\n" not in str(e.value)
