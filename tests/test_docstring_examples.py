"""Every worked example (``>>>``) in the library's docstrings runs and gives what it says; the
evaluation modules' own test (``tests/evaluation/test_docstrings.py``) covers those."""
import doctest
import importlib
from pathlib import Path

import pytest

import deepmetric

SRC = Path(deepmetric.__file__).parent
MODULES = sorted(
    ".".join(p.relative_to(SRC.parent).with_suffix("").parts)
    for p in SRC.rglob("*.py")
    if ">>>" in p.read_text(encoding="utf-8") and "evaluation" not in p.relative_to(SRC).parts
)


def test_the_examples_are_found():
    assert "deepmetric.engine.folds" in MODULES and "deepmetric.engine.auto" in MODULES


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.filterwarnings("ignore")
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS, raise_on_error=False)
    assert result.attempted > 0
    assert result.failed == 0
