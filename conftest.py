# Root conftest: the README and docs/*.md doctests run with numpy and tensorattn imported.
import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
    import tensorattn as ta

    doctest_namespace["np"] = np
    doctest_namespace["ta"] = ta
