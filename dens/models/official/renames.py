"""Parameter-name renames between official checkpoints and dens, written once and derived both ways.

A rename is a pair of templates ``(official, dens)``: literal text in which ``{n}`` stands for a block
index and a trailing ``$`` for the end of the key. :func:`prefix_rules` turns a list of them into the
regular-expression rules of one direction, so the import and the export can never disagree.
:func:`load_mapped_state_dict` loads the renamed state dict strictly, naming every key that does not fit.

Examples
--------
>>> pairs = [("layer_blocks.{n}.message_block.", "layers.{n}.message."), ("sphharm_weights.0$", "sphharm_weights$")]
>>> rules = prefix_rules(pairs)
>>> apply_rules("layer_blocks.3.message_block.fc.weight", rules)
'layers.3.message.fc.weight'
>>> apply_rules(apply_rules("sphharm_weights.0", rules), prefix_rules(pairs, inverse=True))
'sphharm_weights.0'
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from torch import Tensor, nn

__all__ = ["apply_rules", "load_mapped_state_dict", "prefix_rules"]


def _pattern(template: str, suffix: str) -> str:
    exact = template.endswith("$")
    text = re.escape(template.removesuffix("$")).replace(r"\{n\}", r"(\d+)")
    return text + ("$" if exact else suffix)


def _replacement(template: str) -> str:
    return template.removesuffix("$").replace("{n}", r"\1")


def prefix_rules(
    pairs: Sequence[tuple[str, str]], inverse: bool = False, suffix: str = ""
) -> list[tuple[str, str]]:
    """``(pattern, replacement)`` rules official -> dens (or dens -> official with ``inverse``).

    ``suffix`` is appended to every pattern without a ``$`` (e.g. ``(?=\\.|$)`` to match whole module
    names). Patterns are anchored at the start by :func:`apply_rules`.
    """
    rules = []
    for official, dens in pairs:
        source, target = (dens, official) if inverse else (official, dens)
        if source.count("{n}") > 1 or source.count("{n}") != target.count("{n}"):
            raise ValueError(f"rename {official!r} <-> {dens!r}: one {{n}} on each side or none")
        rules.append((_pattern(source, suffix), _replacement(target)))
    return rules


def apply_rules(key: str, rules: Sequence[tuple[str, str]]) -> str:
    """The key renamed by the first rule whose pattern matches at its start (unchanged if none)."""
    for pattern, replacement in rules:
        new, count = re.subn("^" + pattern, replacement, key)
        if count:
            return new
    return key


def load_mapped_state_dict(
    model: nn.Module, mapped: Mapping[str, Tensor], source: str, unknown: list[str] | None = None
) -> None:
    """Load a state dict already renamed to ``model``'s names, strictly, with errors that list the keys.

    ``source`` names where it came from (``official``, ``fairchem``); ``unknown``: keys the renaming could
    not place, reported with the rest.
    """
    expected = model.state_dict()
    unknown = list(unknown or []) + sorted(set(mapped) - set(expected))
    missing = sorted(set(expected) - set(mapped))
    if unknown or missing:
        raise ValueError(
            f"{source} state_dict does not match the dens model: unknown keys {unknown[:20]}"
            f"{' ...' if len(unknown) > 20 else ''}, missing keys {missing[:20]}{' ...' if len(missing) > 20 else ''}"
        )
    for key, value in mapped.items():
        if value.shape != expected[key].shape:
            raise ValueError(
                f"{source} {key} has shape {tuple(value.shape)}, dens expects {tuple(expected[key].shape)}"
            )
    model.load_state_dict(mapped, strict=True)
