"""Evaluators as config entries (big_vision's `config.evals`).

    config.evals.<name> = evals.entry(TYPE, data=SPEC, every=STEPS, limit=N, prefix="", **options)

TYPE names a module of mmjax.evals.evaluators (TYPES); each has OPTIONS (defaults),
OPTION_RULES (mmjax.validation checks) and an `Evaluator(name, entry, context)` whose
`run(predictions)` takes prediction functions (mmjax.evals.predictor), never the trainer, and
returns {metric: value}. Results are logged as `<prefix><metric>`, prefix defaulting to
`eval/<name>/`. Empty shared fields fall back: data "" reads data.eval (its first
data.num_eval records), every 0 is eval_every, limit 0 is the whole split.
"""
from __future__ import annotations

import dataclasses
import importlib
import os

import ml_collections

from mmjax.errors import UserError

TYPES = {
    "zeroshot": "mmjax.evals.evaluators.zeroshot",
    "retrieval": "mmjax.evals.evaluators.retrieval",
    "captioning": "mmjax.evals.evaluators.captioning",
    "linear_probe": "mmjax.evals.evaluators.linear_probe",
}
ENTRY_FIELDS = ("type", "data", "every", "limit", "prefix", "options")


class Unavailable(Exception):
    """This evaluator cannot run on this model or data (a note, not an error): e.g. zero-shot
    on a split without classes, captioning without a decoder."""


def module(kind: str):
    if kind not in TYPES:
        raise UserError(f"unknown evaluator type {kind!r}; valid: {', '.join(TYPES)}")
    return importlib.import_module(TYPES[kind])


def entry(kind: str, *, data: str = "", every: int = 0, limit: int = 0, prefix: str = "",
          **options) -> ml_collections.ConfigDict:
    """A config.evals entry with every option of its type present (so --config.evals.X.options.Y works)."""
    defaults = module(kind).OPTIONS
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {kind} options {unknown}; valid: {sorted(defaults)}")
    return ml_collections.ConfigDict(
        dict(type=kind, data=data, every=every, limit=limit, prefix=prefix, options={**defaults, **options}))


def embedded_entries(has_decoder: bool) -> ml_collections.ConfigDict:
    """The default evaluation on data.eval: zero-shot with the split's own prompts (shapes' classes
    are unions of sub-classes, hence the probability sum), retrieval, and captioning for captioners."""
    entries = dict(
        zeroshot=entry("zeroshot", protocol="prob_sum"),
        retrieval=entry("retrieval"),
    )
    if has_decoder:
        entries["captioning"] = entry("captioning")
    return ml_collections.ConfigDict(entries)


class Context:
    """What evaluators share: the run's data settings, the model's abilities, and one copy of
    each evaluation split however many evaluators read it."""

    def __init__(self, config, has_decoder: bool):
        self.config = config
        self.data_cfg = config.data
        self.has_decoder = has_decoder
        self._sets = {}

    def dataset(self, entry):
        """The entry's split: its `data` (`limit` records; 0: all), or data.eval's first data.num_eval."""
        spec = entry.data or self.data_cfg.eval
        limit = entry.limit or (self.data_cfg.num_eval if not entry.data else 0)
        return self.load(spec, limit)

    def load(self, spec: str, limit: int):
        from mmjax.evals import datasets

        if (spec, limit) not in self._sets:
            self._sets[spec, limit] = datasets.load(spec, self.data_cfg, limit)
        return self._sets[spec, limit]


def check_sources(config) -> None:
    """Open every evaluation split config.evals names, so that a missing one stops the run (one
    line) before anything is written."""
    from mmjax.data import sources

    for e in (config.get("evals") or {}).values():
        for spec in (e.data, e.options.get("train_data", "")):
            if spec:
                sources.open_source(spec, config.data)


class Scheduled:
    """An evaluator with its name, cadence and log prefix."""

    def __init__(self, name: str, entry, evaluator, every: int):
        self.name, self.entry, self.evaluator, self.every = name, entry, evaluator, every
        self.prefix = entry.prefix or f"eval/{name}/"

    def due(self, step: int, final: bool) -> bool:
        return final or step % self.every == 0


def build(config, has_decoder: bool, names=None, log=print) -> list[Scheduled]:
    """The evaluators config.evals lists (only `names`, when given), with their data loaded. One
    that cannot run here is left out with a note (`log`)."""
    entries = config.get("evals") or {}
    if names:
        missing = [n for n in names if n not in entries]
        if missing:
            raise UserError(f"no evaluator named {', '.join(missing)} in config.evals; it has: "
                            f"{', '.join(entries) or 'none'}")
    context = Context(config, has_decoder)
    built = []
    for name, e in entries.items():
        if names and name not in names:
            continue
        try:
            evaluator = module(e.type).Evaluator(name, e, context)
        except Unavailable as why:
            log(f"note: evals.{name} ({e.type}) does not run: {why}")
            continue
        built.append(Scheduled(name, e, evaluator, e.every or config.eval_every))
    return built


def run(scheduled: list[Scheduled], predictions, step: int, final: bool, workdir: str | None) -> dict[str, float]:
    """Run the evaluators due at `step`; -> {prefixed metric: value}. Pictures go to `workdir`."""
    results = {}
    predictions = _images_embedded_once(predictions)
    for s in scheduled:
        if not s.due(step, final):
            continue
        metrics = s.evaluator.run(predictions)
        results.update({f"{s.prefix}{k}": v for k, v in metrics.items()})
        if workdir and hasattr(s.evaluator, "draw"):
            s.evaluator.draw(os.path.join(workdir, f"eval_{s.name}.png"))
    return results


def _images_embedded_once(predictions):
    """Evaluators sharing a split (zero-shot and retrieval on data.eval) get its image embeddings
    computed once per round."""
    done = {}  # id(images) -> (images, embeddings); holding images keeps the id theirs

    def embed_images(images):
        if id(images) not in done:
            done[id(images)] = images, predictions.embed_images(images)
        return done[id(images)][1]

    return dataclasses.replace(predictions, embed_images=embed_images)


def chance(scheduled: list[Scheduled]) -> dict[str, float]:
    """What a model that learned nothing scores, for the results table."""
    return {f"{s.prefix}{k}": v for s in scheduled for k, v in s.evaluator.chance().items()}


def samples(scheduled: list[Scheduled]) -> list[tuple[str, str]]:
    """(reference, generated) caption pairs of the last captioning run, for the console."""
    for s in scheduled:
        if getattr(s.evaluator, "samples", None):
            return s.evaluator.samples
    return []


def table(results: dict[str, float], chance: dict[str, float]) -> str:
    """The results as aligned rows: metric, value, and what chance scores where it is known."""
    names = {key: key.removeprefix("eval/") for key in results}
    width = max([len(n) for n in names.values()] + [24]) + 2
    lines = [f"  {'metric':<{width}}{'value':>8}{'chance':>9}"]
    for key, value in results.items():
        ch = f"{chance[key]:.3f}" if key in chance else "-"
        lines.append(f"  {names[key]:<{width}}{value:>8.3f}{ch:>9}")
    return "\n".join(lines)
