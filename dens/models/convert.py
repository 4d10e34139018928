"""Import and export of official checkpoints: the public names of :mod:`dens.models.official`.

The code lives in :mod:`dens.models.official`, one module per model family; this module keeps the
import path ``dens.models.convert`` working.

Examples
--------
>>> from dens.models.convert import load_official_checkpoint  # doctest: +SKIP
>>> model = load_official_checkpoint("eq2_83M_dens.pt")  # doctest: +SKIP
"""

from __future__ import annotations

from .official import (
    EQUIFORMER_CLASSES,
    EQV2_CLASSES,
    ESCN_CLASSES,
    build_official_model,
    equiformer_v2_from_official_config,
    export_official_state_dict,
    import_official_state_dict,
    load_mapped_state_dict,
    load_official_checkpoint,
    run_fixture,
)

__all__ = [
    "EQUIFORMER_CLASSES",
    "EQV2_CLASSES",
    "ESCN_CLASSES",
    "build_official_model",
    "equiformer_v2_from_official_config",
    "export_official_state_dict",
    "import_official_state_dict",
    "load_mapped_state_dict",
    "load_official_checkpoint",
    "run_fixture",
]
