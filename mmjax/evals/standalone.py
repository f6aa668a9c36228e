"""Evaluators outside the trainer: a workdir's checkpoint, rebuilt from the workdir alone
(mmjax.inference), evaluated with the config.evals entries it records or is given."""
from __future__ import annotations

import json

import jax
from etils import epath

from mmjax import epath_io, evals, inference
from mmjax.errors import UserError
from mmjax.evals.predictor import Predictor


def evaluate(workdir: str, config, step: int | None = None, names=()) -> tuple[int, dict, dict]:
    """-> (step, results, chance): the evaluators of `config` (only `names`, when given) on the
    checkpoint `step` (default: the latest) of `workdir`."""
    run = inference.load(workdir, step, config)
    scheduled = evals.build(run.config, run.model.has_decoder, names=list(names))
    if not scheduled:
        raise UserError("no evaluator can run on this model and data (see the notes above)")
    shardings = jax.tree.map(lambda x: x.sharding, run.params)
    predictor = Predictor(run.model, run.tokenizer, run.config.data.text_len, run.mesh, shardings,
                          run.config.eval.batch_size)
    results = evals.run(scheduled, predictor.bind(run.params), run.step, final=True, workdir=run.workdir)
    return run.step, results, evals.chance(scheduled)


def write_results(path: str, step: int, results: dict) -> str:
    """Add `results` to the step's file: evaluations of one checkpoint run at different times
    accumulate (a metric measured again is replaced)."""
    try:
        saved = json.loads(epath.Path(path).read_text())["results"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        saved = {}
    epath_io.write_atomic(path, json.dumps({"step": step, "results": {**saved, **results}}, indent=2).encode())
    return path


def add_entries_named_in(config, argv) -> None:
    """--config.evals.NAME.type=TYPE for a NAME config.evals lacks: a new entry of that type
    with its defaults, which the NAME's other flags then set."""
    for arg in argv:
        prefix, _, kind = arg.partition("=")
        parts = prefix.split(".")
        if len(parts) == 4 and parts[:2] == ["--config", "evals"] and parts[3] == "type":
            if "evals" not in config:
                config.evals = {}
            if parts[2] not in config.evals:
                config.evals[parts[2]] = evals.entry(kind)
