# Root conftest: the README and docs/*.md doctests run with numpy and tensorattn imported.
import importlib.util

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
    import tensorattn as ta

    doctest_namespace["np"] = np
    doctest_namespace["ta"] = ta


# tensorattn/hf.py needs the optional extra ``hf`` (transformers); its doctests run where it is installed
collect_ignore = [] if importlib.util.find_spec("transformers") else ["tensorattn/hf.py"]
