"""config.profile_steps: a jax.profiler trace of the chosen train steps in the workdir."""
import glob
import os

import pytest

from mmjax import profiling, train
from tests.helpers import tiny_train_config


@pytest.mark.parametrize("spec,steps", [("", None), ("2,3", (2, 3)), ("4,4", (4, 4))])
def test_parse(spec, steps):
    assert profiling.parse(spec) == steps


@pytest.mark.parametrize("spec", ["3", "5,2", "0,1", "a,b", "1,2,3"])
def test_parse_refuses(spec):
    with pytest.raises(ValueError, match="N,M|N <= M"):
        profiling.parse(spec)


def test_the_trainer_traces_the_chosen_steps(tmp_path, capsys):
    config = tiny_train_config(**{"total_steps": 3, "log_every": 1, "checkpoint_every": 3, "profile_steps": "2,3"})
    config.evals = {}  # the test is about the steps
    workdir = str(tmp_path / "run")
    train.run(config, workdir)
    assert f"profile of steps 2-3 written to {os.path.join(workdir, 'profile')}" in capsys.readouterr().out
    (trace,) = glob.glob(os.path.join(workdir, "profile", "**", "*.xplane.pb"), recursive=True)
    assert os.path.getsize(trace) > 1000
