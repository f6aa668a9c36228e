"""model.remat=auto: the least rematerialisation whose compiled step fits the device's memory."""
import jax
import jax.numpy as jnp
import pytest

from mmjax import remat_auto, train
from tests.helpers import tiny_train_config


class FakeCompiled:
    def __init__(self, temp):
        self.temp = temp

    def memory_analysis(self):
        return type("Stats", (), dict(argument_size_in_bytes=100, output_size_in_bytes=100, alias_size_in_bytes=100,
                                      temp_size_in_bytes=self.temp, generated_code_size_in_bytes=0))()


TEMPS = {"none": 1000, "dots": 500, "full": 200}  # bytes each choice's step needs beyond its 100 of arguments


@pytest.mark.parametrize("limit,chosen,compiled", [
    (10_000, "none", ["none"]),  # 1,100 <= 0.9 × 10,000
    (1_000, "dots", ["none", "dots"]),  # 600 <= 900 < 1,100
    (400, "full", ["none", "dots", "full"]),  # 300 <= 360
    (100, "full", ["none", "dots", "full"]),  # nothing fits: the least it can keep, and the run says so
    (None, "none", ["none"]),  # a device without a limit (a CPU): no remat, one compile
])
def test_chooses_the_least_remat_that_fits(limit, chosen, compiled):
    tried = []

    def compile_with(remat):
        tried.append(remat)
        return FakeCompiled(TEMPS[remat])

    remat, step, notes = remat_auto.choose(compile_with, limit)
    assert (remat, tried, step.temp) == (chosen, compiled, TEMPS[chosen])
    assert len(notes) == len(compiled)


def test_needed_bytes_counts_donated_outputs_once():
    def f(x, y):
        return x + 1, y.sum()

    x, y = jnp.zeros((256, 256)), jnp.zeros((128,))
    compiled = jax.jit(f, donate_argnums=0).lower(x, y).compile()
    m = compiled.memory_analysis()
    assert m.alias_size_in_bytes == x.nbytes  # the new x reuses the donated one
    assert remat_auto.needed_bytes(compiled) == (x.nbytes + y.nbytes + m.output_size_in_bytes - x.nbytes
                                                 + m.temp_size_in_bytes + m.generated_code_size_in_bytes)


def test_the_trainer_compiles_the_choice_and_trains_with_it(tmp_path, monkeypatch, capsys):
    config = tiny_train_config(**{"model.remat": "auto", "total_steps": 1, "log_every": 1, "checkpoint_every": 1})
    config.evals = {}  # nothing to evaluate: the test is about the step
    monkeypatch.setattr(remat_auto, "device_memory", lambda device: 1)  # nothing fits: each choice compiled
    monkeypatch.setattr(remat_auto, "ORDER", ("dots", "full"))  # two compiles, not three: the suite's time
    train.run(config, str(tmp_path / "run"))
    out = capsys.readouterr().out
    assert "model.remat=auto chose full: dots needs" in out and "; full needs" in out
    assert "step      1/1" in out
