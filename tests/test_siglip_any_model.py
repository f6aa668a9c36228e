"""SigLIP's sigmoid loss on every model: the contrastive term's type decides the bias and the inits."""
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from mmjax import train
from mmjax.configs import load_config
from mmjax.data import pipeline
from mmjax.errors import ConfigError
from mmjax.models import build_model
from mmjax.parallel import sharding
from tests.helpers import tiny_train_config, tiny_zoo_model

VOCAB = 64


def sigmoid_loss_reference(img, txt, logit_scale, logit_bias):
    """SigLIP eq. 1, dense, in float64: −Σ_ij log σ(z_ij·(e^t′·⟨x_i, y_j⟩ + b)) / B."""
    img, txt = np.asarray(img, np.float64), np.asarray(txt, np.float64)
    logits = np.exp(float(logit_scale)) * img @ txt.T + float(logit_bias)
    labels = 2 * np.eye(len(img)) - 1
    return np.sum(np.logaddexp(0.0, -labels * logits)) / len(img)  # −log σ(x) = log(1 + e^−x)


def test_coca_trains_with_the_sigmoid_loss(tmp_path):
    # No warmup: the first step's learning rate is not 0, so the step moves b.
    config = tiny_train_config(**{"objective.contrastive.type": "siglip", "optimizer.warmup_steps": 0})
    parts = train.build_components(config, str(tmp_path / "tok.model"))
    batch = next(pipeline.train_iterator(config.data, parts.tokenizer, config.batch_size, config.seed))
    model = parts.model
    with jax.set_mesh(parts.mesh), nn.logical_axis_rules(parts.rules):
        state, shardings = train.build_state(model, parts.tx, config, parts.mesh, parts.rules)
        batch = pipeline.to_global({k: batch[k] for k in ("image", "tokens")}, sharding.batch_sharding(parts.mesh))
        forward = jax.jit(lambda p, b: model.apply({"params": p}, b["image"], b["tokens"][:, :-1]))
        outputs = jax.device_get(forward(state["params"], batch))
        new_state, logs = jax.jit(parts.train_step(config), out_shardings=(shardings, None))(state, batch)

    assert float(state["params"]["logit_bias"]) == -10.0
    assert float(state["params"]["logit_scale"]) == pytest.approx(math.log(10.0))
    # The trainer's loss (a ring over the 8 devices, 8×8 tiles) is SigLIP's on the model's embeddings.
    expected = sigmoid_loss_reference(
        outputs["image_embedding"], outputs["text_embedding"], outputs["logit_scale"], outputs["logit_bias"]
    )
    np.testing.assert_allclose(logs["contrastive_loss"], expected, rtol=1e-5)
    assert float(logs["logit_bias"]) == -10.0
    assert float(new_state["params"]["logit_bias"]) != -10.0  # b is learned


@pytest.mark.parametrize("path", ["configs/coca.py", "configs/clip.py"])
@pytest.mark.parametrize("contrastive", ["clip", "siglip"])
def test_the_bias_and_inits_follow_the_objective(path, contrastive):
    model = build_model(tiny_zoo_model(path, depth=1), VOCAB, contrastive=contrastive)
    images, tokens = np.zeros((1, 32, 32, 3), np.uint8), np.ones((1, 7), np.int32)
    init = lambda key: nn.unbox(model.init(key, images, tokens))["params"]
    shapes = jax.eval_shape(init, jax.random.key(0))
    outputs = jax.eval_shape(lambda p: model.apply({"params": p}, images, tokens), shapes)
    # Only the scalars are computed: XLA drops the rest of the initialisation.
    scalars = jax.jit(lambda key: {k: v for k, v in init(key).items() if k.startswith("logit_")})(jax.random.key(0))
    if contrastive == "siglip":
        assert "logit_bias" in outputs and float(scalars["logit_bias"]) == -10.0
        assert float(scalars["logit_scale"]) == pytest.approx(math.log(10.0))
    else:
        assert "logit_bias" not in shapes and "logit_bias" not in outputs
        assert float(scalars["logit_scale"]) == pytest.approx(math.log(1 / 0.07))


def test_a_config_may_pin_the_inits():
    model_cfg = load_config("configs/coca.py").model
    model_cfg.update(dict(logit_scale_init=0.0, logit_scale_max=math.inf, logit_bias_init=-5.0))
    model = build_model(model_cfg, VOCAB, contrastive="siglip")
    assert (model.logit_scale_init, model.logit_scale_max, model.logit_bias_init) == (0.0, math.inf, -5.0)
    with pytest.raises(ConfigError, match="logit_bias_init"):  # the softmax loss has no bias
        build_model(model_cfg, VOCAB, contrastive="clip")
    with pytest.raises(ConfigError, match="objective.contrastive"):
        build_model(model_cfg, VOCAB, contrastive="sigmoid")


def test_cli_trains_coca_with_the_sigmoid_loss(tmp_path):
    args = [
        "--config=configs/coca.py",
        f"--workdir={tmp_path}",
        "--config.objective.contrastive.type=siglip",
        "--config.total_steps=2",
        "--config.batch_size=16",
        "--config.data.num_eval=32",
        "--config.eval.batch_size=16",
        "--config.model.vision.depth=1",
        "--config.model.text.unimodal_depth=1",
        "--config.model.text.multimodal_depth=1",
        "--config.eval_every=2",
        "--config.checkpoint_every=2",
        "--config.log_every=1",
    ]
    # One CPU device, not conftest's 8 simulated ones: the run compiles in half the time.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run(
        [sys.executable, "-m", "mmjax.main", *args], capture_output=True, text=True, timeout=600, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
