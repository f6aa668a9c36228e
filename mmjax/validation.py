"""Every config value checked before any work: `validate(config)` raises ConfigError with one
line naming the key, the bad value, what is valid and the flag that fixes it.

RULES maps each dotted key to a check of its value alone; COMBINATIONS then check values
against each other. Valid choices come from the code that uses them (mmjax.models.DTYPES,
mmjax.objectives.contrastive.IMPLS, ...). Nothing here touches a device or writes a file,
so the command line runs it before jax starts and the trainer may run it again. A key
without a rule passes (tests/test_validation.py gives every shipped key one).
"""
from __future__ import annotations

import fnmatch
import math
import os
import re
from typing import Any, Callable, Iterator

from mmjax import models, optim, profiling
from mmjax.data import clip_bpe, preprocess, sources
from mmjax.errors import ConfigError, UserError
from mmjax.models import clip, coca, layers, text, towers
from mmjax.parallel import sharding

Check = Callable[[str, Any], None]  # (dotted key, value) -> None, or raises ConfigError


def leaves(section, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) for every non-section value under `section`."""
    for name, value in section.items():
        if hasattr(value, "items"):
            yield from leaves(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", value


# --- checks of one value --------------------------------------------------------------


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require(ok: bool, key: str, value, requirement: str, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {requirement}, got {value!r}; set --config.{key} to {fix}")


def one_of(choices) -> Check:
    names = tuple(choices)

    def check(key, value):
        if value not in names:
            raise ConfigError(
                f"unknown {key} {value!r}; valid: {', '.join(names)}; set --config.{key} to one of them"
            )

    return check


def integer(minimum: int) -> Check:
    def check(key, value):
        wanted = f"an integer at least {minimum}"
        _require(_is_int(value), key, value, wanted, wanted)
        _require(value >= minimum, key, value, f"at least {minimum}", wanted)

    return check


def number(low: float = -math.inf, high: float = math.inf, *, low_open=False, high_open=False, finite=True) -> Check:
    """A number in the interval from low to high (infinite bounds: none on that side)."""
    if high < math.inf:
        words = f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low > -math.inf:
        words = f" above {low}" if low_open else f" at least {low}"
    else:
        words = ""
    wanted = ("a finite number" if finite else "a number") + words

    def check(key, value):
        _require(_is_number(value) and not math.isnan(value), key, value, wanted, wanted)
        _require(math.isfinite(value) or not finite, key, value, wanted, wanted)
        inside = (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
        _require(inside, key, value, words.strip(), wanted)

    return check


def optional(check: Check, meaning: str) -> Check:
    """None (which `meaning` explains) or a value `check` accepts."""

    def optional_check(key, value):
        if value is None:
            return
        try:
            check(key, value)
        except ConfigError as e:
            raise ConfigError(f"{e} (or None: {meaning})") from None

    return optional_check


def flag(key, value) -> None:
    _require(isinstance(value, bool), key, value, "True or False", "True or False")


def string(key, value) -> None:
    _require(isinstance(value, str), key, value, "a string", "a string")


def regex(key, value) -> None:
    """A regular expression (re.search syntax)."""
    string(key, value)
    try:
        re.compile(value)
    except re.error as e:
        raise ConfigError(f"{key}={value!r} is not a regular expression ({e}); fix --config.{key}") from None


def numbers(count: int, description: str, ok: Callable[[tuple], bool], example: str) -> Check:
    """A tuple of `count` finite numbers that `ok` accepts."""

    def check(key, value):
        valid = (
            isinstance(value, (tuple, list))
            and len(value) == count
            and all(_is_number(x) and math.isfinite(x) for x in value)
            and ok(tuple(value))
        )
        _require(valid, key, value, f"{count} {description}", f"e.g. '{example}'")

    return check


def mesh_size(key, value) -> None:
    wanted = "-1 (all remaining devices) or an integer at least 1"
    _require(_is_int(value) and (value == -1 or value >= 1), key, value, wanted, wanted)


def mesh_rules(key, value) -> None:
    """(logical axis name, None | a mesh axis | a list of mesh axes) pairs."""

    def is_axes(axes):
        if axes is None or axes in sharding.MESH_AXES:
            return True
        return isinstance(axes, (list, tuple)) and all(a in sharding.MESH_AXES for a in axes)

    for rule in value if isinstance(value, (list, tuple)) else [value]:
        if not (isinstance(rule, (list, tuple)) and len(rule) == 2 and isinstance(rule[0], str) and is_axes(rule[1])):
            raise ConfigError(
                f"{key} entry {rule!r} is not (logical axis name, None | a mesh axis | a list of mesh axes) with "
                f"mesh axes from: {', '.join(sharding.MESH_AXES)}; fix {key} in the config file"
            )


def _source_specs(value: str, mixture: bool) -> list[str]:
    """The specs of `value`; raises UserError for a bad mixture or an unknown scheme."""
    specs = [spec for spec, _ in sources.parse_mixture(value)] if mixture else [value]
    for spec in specs:
        sources.split_spec(spec)
    return specs


def source(mixture: bool) -> Check:
    """A data source spec (mmjax.data.sources), or with `mixture` a weighted mixture of them."""

    def check(key, value):
        string(key, value)
        try:
            _source_specs(value, mixture)
        except UserError as e:
            raise ConfigError(f"{key}={value!r}: {e}; fix --config.{key}") from None

    return check


def tokenizer_file(key, value) -> None:
    """As pipeline.make_tokenizer reads it: "" trains one, "clip_bpe[:PATH]" is open_clip's CLIP BPE
    vocabulary (the installed open_clip's, or PATH), anything else is a SentencePiece model file."""
    string(key, value)
    if clip_bpe.is_spec(value):
        try:
            clip_bpe.vocab_path(value)
        except UserError as e:
            raise ConfigError(f"{key}={value!r}: {e}") from None
        return
    if value and not os.path.isfile(os.path.expanduser(value)):
        raise ConfigError(
            f"{key}={value!r} is not a file; set --config.{key} to a SentencePiece .model file, to 'clip_bpe' "
            "(open_clip's CLIP BPE), or to '' to train one on the training captions"
        )


def decoder(key, value) -> None:
    one_of(preprocess.DECODERS)(key, value)
    if value == "simplejpeg" and preprocess.simplejpeg is None:
        raise ConfigError(
            f"{key}='simplejpeg' needs the simplejpeg package, which is not installed: pip install simplejpeg, "
            f"or set --config.{key} to auto or pillow"
        )


def integers(minimum: int) -> Check:
    """A non-empty tuple of integers, each at least `minimum`."""

    def check(key, value):
        valid = isinstance(value, (tuple, list)) and value and all(_is_int(x) and x >= minimum for x in value)
        _require(valid, key, value, f"a tuple of integers at least {minimum}", "e.g. '(1, 5, 10)'")

    return check


def optional_source(key, value) -> None:
    """"" (the evaluator's documented default) or one source spec."""
    string(key, value)
    if value:
        source(mixture=False)(key, value)


def checked_with_its_entry(key, value) -> None:
    """An evaluator's option: its type's OPTION_RULES check it in `evaluator_entries`."""


def profile_steps(key, value) -> None:
    try:
        profiling.parse(value)
    except (ValueError, TypeError, AttributeError) as e:
        raise ConfigError(f"{key}: {e}; set --config.{key}=N,M (train steps N to M, 1 <= N <= M) or '' for none")


def accumulation_mode(key, value) -> None:
    from mmjax.objectives import accumulate  # it imports the objective's registry, which imports this module

    one_of(accumulate.MODES)(key, value)


POSITIVE = integer(1)
PAPER_INIT = "the paper's value for objective.contrastive.type"

RULES: dict[str, Check] = {
    "seed": integer(0),
    "total_steps": POSITIVE,
    "batch_size": POSITIVE,
    "log_every": POSITIVE,
    "eval_every": POSITIVE,
    "checkpoint_every": POSITIVE,
    "keep_checkpoints": POSITIVE,
    "max_nonfinite_steps": POSITIVE,
    "peak_tflops": optional(number(0, low_open=True), "the device's row of mmjax.throughput.PEAK_TFLOPS"),
    "compilation_cache": string,  # user | workdir | off | a directory
    "profile_steps": profile_steps,
    # fine-tuning (mmjax.init_from); the trainer checks that init.path exists when it will read it
    "init.path": string,
    "init.include": regex,
    "init.exclude": regex,
    "eval.batch_size": POSITIVE,
    # data
    "data.train": source(mixture=True),
    "data.eval": source(mixture=False),  # the trainer opens one held-out split
    "data.num_eval": POSITIVE,
    "data.image_size": POSITIVE,
    "data.text_len": integer(2),  # BOS and EOS
    "data.tokenizer": tokenizer_file,
    "data.vocab_size": POSITIVE,
    "data.tokenizer_max_texts": POSITIVE,
    "data.image_key": string,
    "data.text_key": string,
    "data.tfds_data_dir": string,
    "data.augment.crop": one_of(preprocess.CROPS),
    "data.augment.scale": numbers(2, "numbers 0 < low <= high <= 1", lambda s: 0 < s[0] <= s[1] <= 1, "(0.9, 1.0)"),
    "data.augment.ratio": numbers(2, "numbers 0 < low <= high", lambda r: 0 < r[0] <= r[1], "(0.75, 1.333)"),
    "data.augment.flip": flag,
    "data.decoder": decoder,
    "data.max_image_pixels": POSITIVE,
    "data.max_bad_fraction": number(0, 1),
    "data.shuffle_buffer": POSITIVE,
    "data.cycle_length": POSITIVE,
    "data.worker_count": integer(0),
    "data.prefetch": integer(0),
    # model
    "model.name": one_of(models.MODELS),
    "model.dtype": one_of(models.DTYPES),
    "model.embed_dim": POSITIVE,
    "model.vocab_size": optional(POSITIVE, "the tokenizer's size"),
    "model.caption_queries": POSITIVE,
    "model.coca_layout": one_of(coca.LAYOUTS),
    **{f"model.vision.{k}": POSITIVE for k in ("patch_size", "width", "depth", "mlp_dim", "heads")},
    **{
        f"model.text.{k}": POSITIVE
        for k in ("width", "depth", "unimodal_depth", "multimodal_depth", "mlp_dim", "heads")
    },
    "model.image_pool": one_of(clip.IMAGE_POOLING),
    "model.text_pool": one_of(text.TEXT_POOLING),
    "model.projection_bias": flag,
    "model.layernorm_eps": number(0, low_open=True),
    "model.mlp_activation": one_of(layers.ACTIVATIONS),
    "model.logit_scale_init": optional(number(), PAPER_INIT),
    "model.logit_scale_max": optional(number(finite=False), PAPER_INIT + "; inf: no clamp"),
    "model.logit_bias_init": optional(number(), PAPER_INIT),
    "model.remat": one_of((*layers.REMAT_CHOICES, layers.REMAT_AUTO)),
    "model.scan_layers": flag,
    "model.attention": one_of(layers.ATTENTION_IMPLS),
    "model.patch_dropout": number(0, 1, high_open=True),
    **{f"model.lock_{tower}": flag for tower in towers.LOCKABLE},
    "model.image_mean": numbers(3, "numbers (R, G, B)", lambda m: True, "(0.5, 0.5, 0.5)"),
    "model.image_std": numbers(3, "numbers above 0 (R, G, B)", lambda s: min(s) > 0, "(0.5, 0.5, 0.5)"),
    # objective: named terms (mmjax.objectives.registry); objective_terms checks types and options
    "objective.*.type": string,
    "objective.*.weight": number(0),
    "objective.*.options.*": checked_with_its_entry,
    "accumulate.steps": POSITIVE,
    "accumulate.mode": accumulation_mode,
    # optimizer
    "optimizer.name": one_of(optim.OPTIMIZERS),
    "optimizer.learning_rate": number(0, low_open=True),
    "optimizer.warmup_steps": integer(0),
    "optimizer.final_lr_fraction": number(0, 1),
    "optimizer.b1": number(0, 1, high_open=True),
    "optimizer.b2": number(0, 1, high_open=True),
    "optimizer.eps": number(0, low_open=True),
    "optimizer.weight_decay": number(0),
    "optimizer.grad_clip_norm": number(0),  # 0: no clipping
    # mesh
    **{f"mesh.{axis}": mesh_size for axis in sharding.MESH_AXES},
    "mesh.dcn_data": POSITIVE,  # slices along data (a hybrid ICI/DCN mesh above 1)
    "mesh.rules": mesh_rules,
    # evaluators (mmjax.evals): any name, one entry each
    "evals.*.type": string,
    "evals.*.data": optional_source,
    "evals.*.every": integer(0),  # 0: eval_every
    "evals.*.limit": integer(0),  # 0: the whole split (data.num_eval for data.eval)
    "evals.*.prefix": string,
    "evals.*.options.*": checked_with_its_entry,
}


def rule_for(key: str) -> Check | None:
    """The rule of a dotted key: its own, or a pattern's ("evals.*.type")."""
    if key in RULES:
        return RULES[key]
    return next((check for pattern, check in RULES.items() if "*" in pattern and fnmatch.fnmatchcase(key, pattern)),
                None)


# --- checks of values together ----------------------------------------------------------


def _get(config, key: str, default=None):
    for part in key.split("."):
        if not hasattr(config, "get") or part not in config:
            return default
        config = config[part]
    return config


def heads_divide_width(config) -> None:
    for tower in ("vision", "text"):
        width, heads = _get(config, f"model.{tower}.width"), _get(config, f"model.{tower}.heads")
        if width is not None and heads is not None and width % heads:
            divisors = ", ".join(str(d) for d in range(1, min(width, 64) + 1) if width % d == 0)
            raise ConfigError(
                f"model.{tower}.heads={heads} does not divide model.{tower}.width={width}; set "
                f"--config.model.{tower}.heads to a divisor of {width} ({divisors}{', ...' if width > 64 else ''}) "
                f"or change the width"
            )


def patches_tile_image(config) -> None:
    size, patch = _get(config, "data.image_size"), _get(config, "model.vision.patch_size")
    if size is not None and patch is not None and size % patch:
        below, above = size - size % patch, size - size % patch + patch
        raise ConfigError(
            f"data.image_size={size} is not a multiple of model.vision.patch_size={patch}; set "
            f"--config.data.image_size to a multiple of {patch} (e.g. {' or '.join(map(str, filter(None, (below, above))))})"
        )


def one_mesh_remainder(config) -> None:
    rest = [axis for axis in sharding.MESH_AXES if _get(config, f"mesh.{axis}") == -1]
    if len(rest) > 1:
        raise ConfigError(
            f"{' and '.join(f'mesh.{a}=-1' for a in rest)}: at most one mesh axis may be -1 (all remaining "
            f"devices); set the others to a size, e.g. --config.mesh.{rest[1]}=1"
        )


def objective_terms(config) -> None:
    """Each config.objective term: exactly {type, weight, options}, a known type, a decoder where
    it reads one, and its type's options; at most one term trains the logit scalars."""
    from mmjax.objectives import objective, registry

    model = _get(config, "model.name")
    for name, term in (_get(config, "objective") or {}).items():
        where = f"objective.{name}"
        fields = sorted(term.keys()) if hasattr(term, "items") else repr(term)
        if not hasattr(term, "items") or set(term.keys()) != set(objective.TERM_FIELDS):
            raise ConfigError(f"{where} has fields {fields}; a term has exactly {list(objective.TERM_FIELDS)}: "
                              "build it with mmjax.objectives.objective.term(TYPE, weight, **options)")
        one_of(registry.TYPES)(f"{where}.type", term.type)
        kind = registry.TYPES[term.type]
        if kind.needs_decoder and term.weight > 0 and model in models.MODEL_CLASSES \
                and not models.MODEL_CLASSES[model].has_decoder:
            captioners = [n for n, cls in models.MODEL_CLASSES.items() if cls.has_decoder]
            raise ConfigError(f"{where}.type={term.type!r} needs a caption decoder, but model.name={model!r} has none "
                              f"(models with one: {', '.join(captioners)}); set --config.{where}.weight=0")
        for option, value in (term.options if hasattr(term.options, "items") else {}).items():
            if option not in kind.options:
                raise ConfigError(f"unknown {where}.options.{option}={value!r}; a {term.type} term's options: "
                                  f"{', '.join(kind.options) or 'none'}; remove it or fix its name")
            kind.option_rules[option](f"{where}.options.{option}", value)
    trainers = [f"objective.{n}" for n, t in config.objective.items() if registry.TYPES[t.type].logits]
    if len(trainers) > 1:
        raise ConfigError(f"{' and '.join(trainers)} each train the model's logit scale and bias; keep one of them")


def some_loss(config) -> None:
    weights = {f"objective.{name}.weight": term.weight for name, term in (_get(config, "objective") or {}).items()}
    if not any(w > 0 for w in weights.values()):
        raise ConfigError(
            (" and ".join(f"{k}={w}" for k, w in weights.items()) or "an empty objective") + " leave no loss to "
            "train; set a term's weight above 0, e.g. --config." + (next(iter(weights), "objective.X.weight")) + "=1"
        )


def accumulation_fits(config) -> None:
    """Micro-batches split the batch evenly; summing their gradients ("grads") needs per-example terms."""
    from mmjax.objectives import registry

    steps, mode, batch = _get(config, "accumulate.steps", 1), _get(config, "accumulate.mode"), config.batch_size
    if steps > 1 and batch % steps:
        raise ConfigError(f"accumulate.steps={steps} does not divide batch_size={batch}; set --config.accumulate.steps "
                          f"to a divisor of {batch}")
    coupled = [f"objective.{n} ({t.type})" for n, t in config.objective.items()
               if t.weight > 0 and registry.TYPES[t.type].batch_coupled]
    if steps > 1 and mode == "grads" and coupled:
        raise ConfigError(f"accumulate.mode='grads' sums the gradients of accumulate.steps={steps} micro-batches, but "
                          f"{coupled[0]} couples the examples of the whole batch; set --config.accumulate.mode=gradcache")


def something_to_train(config) -> None:
    """Locking every lockable tower leaves only CoCa's decoder, which learns from the caption loss."""
    name = _get(config, "model.name")
    if name not in models.MODEL_CLASSES or not all(_get(config, f"model.lock_{t}") for t in towers.LOCKABLE):
        return
    from mmjax.objectives import registry

    captions = any(t.weight > 0 and registry.TYPES[t.type].needs_decoder for t in config.objective.values())
    if not (models.MODEL_CLASSES[name].has_decoder and captions):
        locks = " and ".join(f"model.lock_{t}=True" for t in towers.LOCKABLE)
        raise ConfigError(
            f"{locks} leave nothing to train in a {name} model"
            + (" without a captioning term" if models.MODEL_CLASSES[name].has_decoder else "")
            + f"; set --config.model.lock_{towers.LOCKABLE[-1]}=False (or lock_{towers.LOCKABLE[0]})"
        )


def bias_needs_sigmoid(config) -> None:
    """The model's own rule (mmjax.models.logit_inits), checked before any work."""
    from mmjax.objectives import objective

    models.logit_inits(config.model, objective.contrastive_type(config.objective))


def pinned_vocab_fits(config) -> None:
    """A trained tokenizer has exactly data.vocab_size pieces; a pinned table must hold them."""
    pinned, pieces = _get(config, "model.vocab_size"), _get(config, "data.vocab_size")
    if pinned is not None and pieces is not None and not _get(config, "data.tokenizer") and pinned < pieces:
        raise ConfigError(
            f"model.vocab_size={pinned} is smaller than data.vocab_size={pieces}, the trained tokenizer's pieces; "
            "raise --config.model.vocab_size or lower --config.data.vocab_size"
        )


def evaluator_entries(config) -> None:
    """Each config.evals entry: a known type, exactly the entry fields, and its type's options."""
    from mmjax import evals

    for name, entry in (_get(config, "evals") or {}).items():
        where = f"evals.{name}"
        if not hasattr(entry, "items"):
            raise ConfigError(f"{where} must be an entry (mmjax.evals.entry(TYPE, ...)), got {entry!r}")
        fields = set(entry.keys())
        if fields != set(evals.ENTRY_FIELDS):
            raise ConfigError(f"{where} has fields {sorted(fields)}; an entry has exactly {list(evals.ENTRY_FIELDS)}: "
                              "build it with mmjax.evals.entry(TYPE, ...)")
        one_of(evals.TYPES)(f"{where}.type", entry.type)
        model_class = models.MODEL_CLASSES.get(_get(config, "model.name"))
        if entry.type == "captioning" and model_class is not None and not model_class.has_decoder:
            raise ConfigError(f"{where}.type='captioning' needs a caption decoder but model.name={config.model.name!r} "
                              f"has no decoder; remove {where} from config.evals")
        module = evals.module(entry.type)
        options = entry.options if hasattr(entry.options, "items") else {}
        unknown = sorted(set(options) - set(module.OPTIONS))
        if unknown:
            raise ConfigError(f"{where}.options has no {', '.join(unknown)}; a {entry.type} evaluator's options: "
                              f"{', '.join(module.OPTIONS)}")
        for option, value in options.items():
            module.OPTION_RULES[option](f"{where}.options.{option}", value)


def embedded_sources_open(config) -> None:
    """shapes: specs are generated, not read: opening one is free and checks its split and image size."""
    for key in ("data.train", "data.eval"):
        value = _get(config, key)
        if value is None:
            continue
        for spec in _source_specs(value, mixture=key == "data.train"):
            if sources.split_spec(spec)[0] == "shapes":
                try:
                    sources.open_source(spec, config.data)
                except UserError as e:
                    raise ConfigError(f"{key}={value!r}: {e}") from None


COMBINATIONS: tuple[Callable[[Any], None], ...] = (
    heads_divide_width,
    patches_tile_image,
    one_mesh_remainder,
    objective_terms,
    some_loss,
    accumulation_fits,
    something_to_train,
    bias_needs_sigmoid,
    pinned_vocab_fits,
    evaluator_entries,
    embedded_sources_open,
)


def validate_section(section, prefix: str = "") -> None:
    """The per-key rules for the values under `section` (e.g. config.data with prefix "data.")."""
    for key, value in leaves(section, prefix):
        check = rule_for(key)
        if check is not None:
            check(key, value)


def validate(config) -> None:
    """Raises ConfigError for the first bad value or combination; pure, so safe to call twice."""
    validate_section(config)
    for combination in COMBINATIONS:
        combination(config)
