"""Every worked example in the evaluation docstrings runs and gives what it says."""
import doctest
import importlib

import pytest

MODULES = ["neighbors", "retrieval", "reid", "rerank", "verification", "centroids", "query_expansion", "results"]


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.filterwarnings("ignore:retrieval_metrics")  # an example shows a skipped singleton query
def test_docstring_examples(name):
    module = importlib.import_module(f"deepmetric.evaluation.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, raise_on_error=False)
    assert result.attempted > 0
    assert result.failed == 0
