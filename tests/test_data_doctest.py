"""The examples in the docstrings of dens.data run and give what they show."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "batch",
    "graph",
    "dataset",
    "lmdb",
    "pyg_pickle",
    "ase_io",
    "md17",
    "normalize",
    "sampler",
    "open",
    "convert",
    "download",
    "demo",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(f"dens.data.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
