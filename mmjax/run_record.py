"""The run record: what a workdir says about the run that made it, and the check at resume.

A workdir holds `config.json` and the tokenizer the run tokenized with: `tokenizer.model`
(a SentencePiece model, trained or given) or, for data.tokenizer="clip_bpe[:PATH]",
`clip_bpe_vocab.txt.gz` (a copy of the CLIP BPE vocabulary; the recorded data.tokenizer says
which kind to read). With a checkpoint, that is all `load` needs to rebuild the exact model
(mmjax.evaluate, mmjax.predict).

Format: `workdir/config.json` is the resolved config (`config.to_dict()`) as one JSON
object, indented by 2 spaces, keys sorted at every level, nesting as in the config
(`{"model": {"vision": {"width": 128, ...}, ...}, ...}`). Values are plain JSON: tuples
are stored as lists, None as null. It is rewritten (atomically) each time a run starts or
resumes, so it describes the latest invocation; the checkpoint beside it was trained with
these values up to any resumable change (RESUMABLE below).

At resume, `check_resume` compares the record with the new config key by key (dotted
keys, e.g. `model.vision.width`): a changed key the checkpoint cannot survive is refused
in one line before orbax is asked to restore it; resumable changes become a note.
"""
from __future__ import annotations

import fnmatch
import json
import os

from etils import epath

from mmjax import epath_io
from mmjax.errors import ConfigError, UserError
from mmjax.objectives import schema

FILENAME = "config.json"
# Written by mmjax.tools.import_openclip beside the record: the workdir holds imported
# parameters only (checkpoint step 0, no optimizer state), to evaluate or fine-tune from.
IMPORTED = "imported.json"
TOKENIZER = "tokenizer.model"

# Keys whose change a checkpoint survives: it restores as saved and the run continues with
# the new value. Every other key (model shapes and structure, the training data, its order
# and preprocessing, batch_size, seed, optimizer.name, keys this table does not know) is
# breaking.
RESUMABLE = (
    # cadences
    "log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "max_nonfinite_steps",
    "total_steps",  # at or below the checkpoint's step: nothing left to train (a note, not an error)
    # evaluation; data settings that leave the training examples' order alone (decoder and
    # max_image_pixels only change how an image decodes, or whether an oversized one is skipped)
    "eval.*", "evals.*", "data.eval", "data.num_eval", "data.prefetch", "data.max_bad_fraction",
    "data.tfds_data_dir", "data.max_image_pixels", "data.decoder",
    "mesh.*",  # the checkpoint is resharded onto the new mesh
    "init.*",  # only a run's step 0 reads it: a resumed run restores its own checkpoint
    # optimizer hyper-parameters: the optimizer state keeps its structure
    "optimizer.learning_rate", "optimizer.warmup_steps", "optimizer.final_lr_fraction",
    "optimizer.b1", "optimizer.b2", "optimizer.eps", "optimizer.weight_decay",
    "optimizer.grad_clip_norm",  # only while it stays zero or stays non-zero (_same_clip_stage)
    # model and loss options with the same parameters
    "model.dtype", "model.remat", "model.patch_dropout", "model.attention",
    # how the step is measured and compiled
    "peak_tflops", "compilation_cache", "profile_steps",
    # loss weights and implementations (a term's type decides the model's logit parameters), accumulation
    "objective.*.weight", "objective.*.options.*", "accumulate.*",
)

_ABSENT = object()  # a key only one side has

# Keys added after records were first written, with the value a run made before they existed
# trained with (and a config without them builds): such a record is read as holding that
# value, so its run still resumes.
IMPLIED_BEFORE_THEY_EXISTED = {
    "model.layernorm_eps": 1e-6,
    "model.mlp_activation": "gelu_tanh",
    "model.coca_layout": "paper",  # CoCa only; a CLIP record has no such key either way
    "init.path": "",  # no fine-tuning: fresh parameters
    "init.include": "",
    "init.exclude": "",
    "model.attention": "einsum",  # the one implementation there was
    "peak_tflops": None,
    "compilation_cache": "off",
    "profile_steps": "",
}


def _same_clip_stage(saved, now) -> bool:
    """mmjax.optim adds a clip_by_global_norm stage to the optimizer state only for a non-zero norm."""
    return _ABSENT not in (saved, now) and bool(saved) == bool(now)


# Resumable keys with a condition on (saved, now).
_RESUMABLE_IF = {"optimizer.grad_clip_norm": _same_clip_stage}


def path(workdir: str) -> str:
    return os.path.join(workdir, FILENAME)


def refuse_imported(workdir: str) -> None:
    """Training in an imported workdir would ignore its weights and start afresh: say how to use them."""
    if (epath.Path(workdir) / IMPORTED).exists():
        raise UserError(f"{workdir} holds imported weights ({IMPORTED}), not a training run; fine-tune them in a new "
                        f"workdir: --config.init.path={workdir} --workdir=NEW_DIR")


def as_record(config) -> dict:
    """The config as config.json holds it: plain JSON values (tuples become lists)."""
    return json.loads(json.dumps(config.to_dict()))


def write(workdir: str, config, tokenizer=None) -> None:
    """Write the record (and the tokenizer's model, when given); locally through temporary files
    renamed over the old ones: a crash leaves the old file or the new one, never half a file
    (epath_io.write_atomic)."""
    epath_io.write_atomic(path(workdir), (json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n").encode())
    if tokenizer is not None:  # its files: tokenizer.model, or clip_bpe_vocab.txt.gz
        for name, data in tokenizer.workdir_files().items():
            tokenizer_path = epath.Path(workdir) / name
            if not tokenizer_path.exists() or tokenizer_path.read_bytes() != data:
                epath_io.write_atomic(tokenizer_path, data)


def load(workdir: str):
    """-> (config as a ConfigDict, Tokenizer): what a later command needs to rebuild the run's
    model. UserError, naming what is missing, when the workdir lacks either."""
    import ml_collections

    from mmjax.data import clip_bpe, tokenizer as tokenizer_lib

    if not epath.Path(workdir).is_dir():
        raise UserError(f"workdir {workdir} does not exist; pass the --workdir of a training run")
    record = read(workdir)
    if record is None:
        raise UserError(f"{path(workdir)} not found: {workdir} is not a training run's workdir (the trainer writes "
                        "config.json when it starts); pass the --workdir of a run")
    spec = record.get("data", {}).get("tokenizer") or ""
    if clip_bpe.is_spec(spec):  # the workdir's copy of the vocabulary, not the recorded path
        return ml_collections.ConfigDict(record), clip_bpe.load_workdir(workdir)
    tokenizer_path = os.path.join(workdir, TOKENIZER)  # a string join: workdir may be a URL
    if not epath.Path(tokenizer_path).exists():
        raise UserError(f"{tokenizer_path} not found: the run's tokenizer is missing; copy the SentencePiece model "
                        f"it trained with (data.tokenizer={record.get('data', {}).get('tokenizer')!r}) there")
    return ml_collections.ConfigDict(record), tokenizer_lib.load(tokenizer_path)


def read(workdir: str) -> dict | None:
    """The workdir's record, or None when it has none (a new workdir, or one from before records).
    A record from before the objective's named terms is read in today's schema (objectives.schema)."""
    try:
        return schema.upgrade(json.loads(epath.Path(path(workdir)).read_text()))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path(workdir)} is not valid JSON ({e}); restore it, or delete it to resume unchecked")


def check_resume(saved: dict, config, saved_step: int) -> list[str]:
    """Compare the saved record with `config` before restoring the checkpoint of `saved_step`.

    Raises ConfigError naming every changed key the checkpoint cannot survive; returns the
    note lines (possibly none) for the trainer to print.
    """
    # A key either side lacks means its implied value (mmjax.models reads a missing one the same way).
    old = {**IMPLIED_BEFORE_THEY_EXISTED, **_flatten(saved)}
    new = {**IMPLIED_BEFORE_THEY_EXISTED, **_flatten(as_record(config))}
    pairs = {k: (old.get(k, _ABSENT), new.get(k, _ABSENT)) for k in {**old, **new}}
    changed = {k: (a, b) for k, (a, b) in pairs.items() if a != b}
    breaking = [f"{k}: saved {_short(a)}, now {_short(b)}" for k, (a, b) in changed.items() if not _resumable(k, a, b)]
    if breaking:
        raise ConfigError(
            f"{'; '.join(breaking)}; this workdir's checkpoint (step {saved_step}) was trained with the saved values: "
            "revert these flags to resume, or pass a new --workdir to start fresh"
        )
    finished = config.total_steps <= saved_step
    if finished:
        changed.pop("total_steps", None)  # the note below says it
    notes = []
    if changed:
        listed = ", ".join(f"{k} {_short(a)} -> {_short(b)}" for k, (a, b) in changed.items())
        notes.append(f"resuming with changed settings: {listed}")
    if finished:
        notes.append(
            f"the checkpoint is already at step {saved_step} ≥ total_steps {config.total_steps}: nothing will be "
            f"trained and step {saved_step}'s final evaluation is reported; raise --config.total_steps to train on"
        )
    return notes


def _resumable(key: str, saved, now) -> bool:
    if not any(fnmatch.fnmatchcase(key, pattern) for pattern in RESUMABLE):
        return False
    condition = _RESUMABLE_IF.get(key)
    return condition is None or condition(saved, now)


def _flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and empty dicts are leaves."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _short(value, limit: int = 40) -> str:
    text = "(absent)" if value is _ABSENT else repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
