"""The examples in the docstrings of every dens module run and give what they show (the CI form of
``pytest --doctest-modules dens``).

Examples that need data or checkpoints a clone does not have (a trained ``best.pt``, an official
checkpoint, an IS2RE LMDB, a GPU) are marked ``# doctest: +SKIP`` where they stand.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import dens

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(dens.__path__, prefix="dens.")
    if not info.name.endswith("__main__")  # running it would start the command line
)


def test_every_module_is_collected():
    assert {"dens.data.batch", "dens.models.escn", "dens.testing", "dens.relax"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
