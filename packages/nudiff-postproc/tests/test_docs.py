"""The examples in the docstrings run and give what they show."""

from __future__ import annotations

import doctest
import importlib

import numpy as np
import pytest

MODULES = ["_structure", "_watershed", "_metrics", "_patches"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(f"nudiff_postproc.{name}")
    result = doctest.testmod(module, extraglobs={"np": np}, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_public_api_is_documented():
    import nudiff_postproc as npp

    for name in npp.__all__:
        obj = getattr(npp, name)
        if callable(obj):
            assert obj.__doc__ and len(obj.__doc__) > 40, name
