"""Class names and prompt templates for zero-shot classification.

A spec is either the name of a set shipped in mmjax/evals/data/ or a path to a text file in
the same format: one entry per line, lines starting with `#` and blank lines ignored,
surrounding whitespace stripped.

Templates use `{}` as the placeholder for the class name ("a photo of a {}.", the
convention of CLIP's notebook and data/prompts.md); `fill` substitutes every `{}` with
plain string replacement (not str.format, so other braces in a template are kept as they
are). A template without `{}` is refused: it would give every class the same prompt.
"""
from __future__ import annotations

import os

from mmjax.errors import UserError

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
PLACEHOLDER = "{}"

NAMED_CLASS_NAMES = {
    "imagenet1k": "imagenet1k_classes.txt",  # 1000, OpenAI CLIP's curated names
    "cifar10": "cifar10_classes.txt",  # 10, label index order
    "cifar100": "cifar100_classes.txt",  # 100, label index order
}
NAMED_TEMPLATES = {
    "imagenet80": "imagenet80_templates.txt",  # CLIP's 80 ImageNet templates
    "cifar": "cifar_templates.txt",  # CLIP's 18 CIFAR-10/100 templates
    "photo": "photo_templates.txt",  # "a photo of a {}."
}


def read_lines(path: str) -> list[str]:
    """The entries of a list file: stripped lines, without `#` comments and blank lines."""
    with open(path, encoding="utf-8") as f:
        lines = (line.strip() for line in f)
        return [line for line in lines if line and not line.startswith("#")]


def _load(spec: str, named: dict[str, str], what: str) -> list[str]:
    if spec in named:
        return read_lines(os.path.join(DATA_DIR, named[spec]))
    if os.path.isfile(spec):
        entries = read_lines(spec)
        if not entries:
            raise UserError(f"{what} file {spec!r} has no entries (one per line; # comments and blank lines are skipped)")
        return entries
    raise UserError(
        f"unknown {what} {spec!r}: use one of {', '.join(sorted(named))}, "
        f"or the path of a text file with one entry per line (# comments and blank lines are skipped)"
    )


def class_names(spec: str) -> list[str]:
    """Class names in label order: a named set (NAMED_CLASS_NAMES) or a file path."""
    return _load(spec, NAMED_CLASS_NAMES, "class-name set")


def templates(spec: str) -> list[str]:
    """Prompt templates with `{}` for the class name: a named set (NAMED_TEMPLATES) or a file path."""
    entries = _load(spec, NAMED_TEMPLATES, "template set")
    missing = [t for t in entries if PLACEHOLDER not in t]
    if missing:
        raise UserError(
            f"template set {spec!r}: {len(missing)} template(s) lack the {PLACEHOLDER} placeholder for the "
            f"class name, e.g. {missing[0]!r}; write it as 'a photo of a {PLACEHOLDER}.'"
        )
    return entries


def fill(template: str, name: str) -> str:
    """The prompt for one class: every `{}` in the template replaced by the name."""
    return template.replace(PLACEHOLDER, name)
