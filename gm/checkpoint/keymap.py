"""Declarative key maps: which source tensors make each of our parameters, and how.

A map is a list of ``KeyRule``; it is derived per model from the model's own parameter names
(see ``diffusers_*.py``), never kept by hand. The same rules convert real arrays (loading) and
shapes only (checking full-size models without memory).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, Mapping, Sequence, Tuple

import numpy as np

from gm.checkpoint.errors import CheckpointError, summarize_keys

# op name -> (forward on arrays, forward on shapes)
#   copy:          ours = src
#   cat0:          ours = concat(srcs, axis 0)          (e.g. OpenCLIP in_proj = q;k;v)
#   transpose:     ours = src.T                         (e.g. OpenCLIP text_projection = HF Linear weight.T)
#   linear_to_conv: ours (O, I, 1, 1) = src (O, I)      (VAE attention: SGM 1x1 conv, diffusers Linear)
_OPS: Dict[str, Tuple[Callable, Callable]] = {
    "copy": (lambda a: a[0], lambda s: tuple(s[0])),
    "cat0": (lambda a: np.concatenate(a, axis=0), lambda s: (sum(x[0] for x in s),) + tuple(s[0][1:])),
    "transpose": (lambda a: np.ascontiguousarray(a[0].T), lambda s: tuple(reversed(s[0]))),
    "linear_to_conv": (lambda a: a[0].reshape(a[0].shape + (1, 1)), lambda s: tuple(s[0]) + (1, 1)),
}


@dataclass(frozen=True)
class KeyRule:
    """Our parameter ``target`` is made from source keys ``sources`` by ``op``."""

    target: str
    sources: Tuple[str, ...]
    op: str = "copy"

    def __post_init__(self):
        if self.op not in _OPS:
            raise ValueError(f"unknown key-map op '{self.op}'; known: {sorted(_OPS)}")


def rename(target: str, source: str) -> KeyRule:
    """A one-to-one rule."""
    return KeyRule(target, (source,), "copy")


def check_rules(
    rules: Sequence[KeyRule],
    source_keys: Iterable[str],
    *,
    what: str,
    ignore_unused: Iterable[str] = (),
    optional_targets: Iterable[str] = (),
) -> None:
    """Raise CheckpointError, counting and listing missing and unexpected source keys, unless
    the source holds exactly what the rules need.

    ``ignore_unused`` names source keys that may be present and unused (buffers such as
    ``position_ids``); ``optional_targets`` may be absent from the source (their parameter keeps
    its initial value).
    """
    source = set(source_keys)
    optional = set(optional_targets)
    needed = {s for r in rules for s in r.sources}
    missing = {s for r in rules if r.target not in optional for s in r.sources if s not in source}
    unexpected = set(source) - needed - set(ignore_unused)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {summarize_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {summarize_keys(unexpected)}")
        raise CheckpointError(f"{what}: {'; '.join(parts)} -- is this a checkpoint of this model/config?")


def iter_rules(rules: Sequence[KeyRule], source: Mapping[str, np.ndarray]) -> Iterator[Tuple[str, np.ndarray]]:
    """Yield ``(target, array)`` one at a time (so a large checkpoint is never held twice)."""
    for rule in rules:
        if all(s in source for s in rule.sources):
            yield rule.target, _OPS[rule.op][0]([np.asarray(source[s]) for s in rule.sources])


def apply_rules(
    rules: Sequence[KeyRule],
    source: Mapping[str, np.ndarray],
    *,
    what: str,
    ignore_unused: Iterable[str] = (),
    optional_targets: Iterable[str] = (),
) -> Dict[str, np.ndarray]:
    """Check (see ``check_rules``) and build ``{target: array}`` from ``source`` arrays."""
    check_rules(rules, source.keys(), what=what, ignore_unused=ignore_unused, optional_targets=optional_targets)
    return dict(iter_rules(rules, source))


def rule_shapes(rules: Sequence[KeyRule], source_shapes: Mapping[str, Sequence[int]]) -> Dict[str, Tuple[int, ...]]:
    """Shapes the rules produce from ``source_shapes`` (no data touched)."""
    return {r.target: _OPS[r.op][1]([tuple(source_shapes[s]) for s in r.sources]) for r in rules
            if all(s in source_shapes for s in r.sources)}
