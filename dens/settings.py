"""Validation of a resolved training configuration before any data are read.

:func:`validate_config` checks the Hydra ``optim``, ``trainer`` and ``dens`` groups against the fields and
types of :class:`~dens.trainer.OptimSettings`, :class:`~dens.trainer.TrainerSettings` and
:class:`~dens.losses.DeNSSettings` (unknown keys, wrong types), then the values
(:func:`check_settings`: devices, AMP modes, positive intervals, resume files), ``data.normalizer`` and the
``materials`` group.
Every message names the key, so ``optim.lr=abc`` fails in a second instead of after the data load.

Examples
--------
>>> from dens.trainer import OptimSettings
>>> typed_settings(OptimSettings, {"lr": "abc"}, "optim")
Traceback (most recent call last):
...
dens.settings.ConfigError: optim.lr='abc': expected a float
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["ConfigError", "check_settings", "typed_settings", "validate_config"]


class ConfigError(ValueError):
    """A configuration value that cannot work (names the key)."""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return f"a {origin.__name__}"
    if tp is type(None):
        return "null"
    return (
        f"a {getattr(tp, '__name__', tp)}"
        if tp not in (int, float)
        else {int: "an int", float: "a float"}[tp]
    )


def _convert(value: Any, tp: Any, key: str) -> Any:
    """``value`` as type ``tp`` (ints accepted as floats, lists as tuples); raises naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}={value!r}: expected {_type_name(tp)}")
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}={value!r}: expected a list")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis and len(args) != len(value):
            raise ConfigError(f"{key}={value!r}: expected {len(args)} values")
        item_types = (
            args
            if origin is tuple and args and args[-1] is not Ellipsis
            else [args[0] if args else Any] * len(value)
        )
        return origin(
            _convert(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, item_types, strict=True))
        )
    if origin is dict or tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected an int")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}={value!r}: expected a float")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}={value!r}: expected a string")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}={value!r}: expected null")
    return value


def typed_settings(cls: type, values: Mapping[str, Any], group: str) -> Any:
    """An instance of the settings dataclass ``cls`` from ``values``, every field's type checked.

    Raises
    ------
    ConfigError
        For an unknown key, a value of the wrong type, or a value the dataclass refuses.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        close = [m for k in unknown for m in difflib.get_close_matches(k, sorted(fields), n=1)]
        hint = f"; did you mean {', '.join(f'{group}.{m}' for m in close)}?" if close else ""
        raise ConfigError(
            f"{', '.join(f'{group}.{k}' for k in unknown)}: not a setting{hint}; known: {sorted(fields)}"
        )
    converted = {k: _convert(v, hints[k], f"{group}.{k}") for k, v in values.items()}
    try:
        return cls(**converted)
    except (TypeError, ValueError) as err:
        message = str(err)
        raise ConfigError(message if message.startswith(f"{group}.") else f"{group}: {message}") from err


def check_settings(optim: Any, dens: Any, settings: Any) -> None:
    """Value checks of the settings dataclasses (each message names its key).

    Parameters
    ----------
    optim, dens, settings : OptimSettings, DeNSSettings, TrainerSettings
        The ``optim``, ``dens`` and ``trainer`` settings.
    """
    device = str(settings.device)
    if device != "auto" and not device.startswith(("cpu", "cuda", "mps")):
        raise ConfigError(f"trainer.device={device!r}: expected auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        why = "this PyTorch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise ConfigError(f"trainer.device={device!r}: {why}; use trainer.device=cpu (or auto)")
    if settings.amp not in (None, "bf16", "fp16"):
        raise ConfigError(f"trainer.amp={settings.amp!r}: expected null (full precision), bf16 or fp16")
    for key in ("eval_every", "checkpoint_every", "log_every", "grad_accumulation"):
        if getattr(settings, key) < 1:
            raise ConfigError(f"trainer.{key}={getattr(settings, key)}: must be at least 1")
    if settings.max_steps is not None and settings.max_steps < 0:
        raise ConfigError(f"trainer.max_steps={settings.max_steps}: must be >= 0 (or null)")
    if settings.num_workers < 0:
        raise ConfigError(f"trainer.num_workers={settings.num_workers}: must be >= 0")
    if settings.threads is not None and settings.threads < 1:
        raise ConfigError(f"trainer.threads={settings.threads}: must be >= 1 (or null: automatic)")
    if settings.nonfinite not in ("stop", "skip"):
        raise ConfigError(f"trainer.nonfinite={settings.nonfinite!r}: expected stop or skip")
    if settings.primary_metric not in ("forces_mae_meV_A", "energy_mae_meV"):
        raise ConfigError(
            f"trainer.primary_metric={settings.primary_metric!r}: expected forces_mae_meV_A or energy_mae_meV"
        )
    resume = settings.resume
    if resume not in (None, "auto", "force", "null", "none"):
        path = Path(str(resume))
        if not path.is_file():
            raise ConfigError(f"trainer.resume={resume}: no checkpoint file there (or use auto, force, null)")
        if path.stat().st_size == 0:
            raise ConfigError(f"trainer.resume={resume}: the file is empty (0 bytes)")
    if optim.batch_size < 1:
        raise ConfigError(f"optim.batch_size={optim.batch_size}: must be at least 1")
    for key in ("lr", "max_epochs"):
        value = getattr(optim, key)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"optim.{key}={value}: must be a positive number")
    if optim.scheduler not in ("cosine", "multistep"):
        raise ConfigError(f"optim.scheduler={optim.scheduler!r}: expected cosine or multistep")
    if optim.ema_decay is not None and not 0.0 <= optim.ema_decay < 1.0:
        raise ConfigError(f"optim.ema_decay={optim.ema_decay}: must be in [0, 1) or null")
    if not math.isfinite(dens.sigma) or not math.isfinite(dens.coefficient):
        raise ConfigError(f"dens.sigma={dens.sigma}, dens.coefficient={dens.coefficient}: must be finite")


def _check_normalizer(norm: Any) -> None:
    if isinstance(norm, str):
        if norm not in ("auto", "auto_unbiased", "auto_rms", "forces_rms"):
            raise ConfigError(
                f"data.normalizer={norm!r}: expected auto, auto_unbiased, auto_rms, forces_rms or "
                f"{{energy_mean, energy_std, force_std}}"
            )
        return
    if not isinstance(norm, Mapping):
        raise ConfigError(
            f"data.normalizer={norm!r}: expected auto, auto_unbiased, auto_rms, forces_rms or "
            f"{{energy_mean, energy_std, force_std}}"
        )
    for key in ("energy_mean", "energy_std", "force_std"):
        if key not in norm:
            raise ConfigError(f"data.normalizer.{key}: missing")
        value = _convert(norm[key], float, f"data.normalizer.{key}")
        if not math.isfinite(value) or (key != "energy_mean" and value <= 0):
            raise ConfigError(
                f"data.normalizer.{key}={value}: must be finite{'' if key == 'energy_mean' else ' and > 0'}"
            )


def validate_config(config: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    """Check a resolved training configuration (a dict) before anything is built or read.

    Returns
    -------
    (OptimSettings, DeNSSettings, TrainerSettings)

    Raises
    ------
    ConfigError
        Naming the first bad key.
    """
    from .losses import DeNSSettings
    from .trainer import OptimSettings, TrainerSettings

    for group in ("optim", "trainer", "dens", "model", "data"):
        if not isinstance(config.get(group), Mapping):
            raise ConfigError(f"{group}: missing or not a group of settings")
    optim = typed_settings(OptimSettings, config["optim"], "optim")
    settings = typed_settings(TrainerSettings, config["trainer"], "trainer")
    dens = typed_settings(DeNSSettings, config["dens"], "dens")
    check_settings(optim, dens, settings)
    if "normalizer" in config["data"]:
        _check_normalizer(config["data"]["normalizer"])
    if config.get("materials") is not None:
        _check_materials(config["materials"])
    return optim, dens, settings


def _check_materials(materials: Any) -> None:
    """The ``materials`` group (:func:`dens.losses.stress.materials_settings` reads it)."""
    from .losses.stress import MATERIALS_KEYS

    if not isinstance(materials, Mapping):
        raise ConfigError(f"materials={materials!r}: expected a group of settings")
    unknown = sorted(set(materials) - MATERIALS_KEYS)
    if unknown:
        raise ConfigError(
            f"{', '.join(f'materials.{k}' for k in unknown)}: not a setting; known: {sorted(MATERIALS_KEYS)}"
        )
    if "stress_coefficient" in materials:
        value = _convert(materials["stress_coefficient"], float, "materials.stress_coefficient")
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"materials.stress_coefficient={value}: must be a finite number >= 0")
    if materials.get("stress_on_corrupted", "skip") not in ("skip", "clean_target"):
        raise ConfigError(
            f"materials.stress_on_corrupted={materials['stress_on_corrupted']!r}: expected skip or clean_target"
        )
    if materials.get("stress_anisotropic_error", "norm") not in ("norm", "mae"):
        raise ConfigError(
            f"materials.stress_anisotropic_error={materials['stress_anisotropic_error']!r}: expected norm or mae"
        )
    if "energy_per_atom" in materials:
        _convert(materials["energy_per_atom"], bool, "materials.energy_per_atom")
    if materials.get("element_references") not in (None, "fit"):
        raise ConfigError(
            f"materials.element_references={materials['element_references']!r}: expected fit or null"
        )
    if "normalizer_structures" in materials:
        count = _convert(materials["normalizer_structures"], int, "materials.normalizer_structures")
        if count < 1:
            raise ConfigError(f"materials.normalizer_structures={count}: must be at least 1")
