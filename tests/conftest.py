import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=25, derandomize=True, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=100, deadline=None)
# a one-off check: `pytest tests/test_fuzz.py --hypothesis-profile=deep` (hours; TENSORATTN_FUZZ_STATS=path.json
# writes the counts of the run; TENSORATTN_FUZZ_EXAMPLES sets the examples per test, default 10,000)
settings.register_profile(
    "deep", max_examples=int(os.environ.get("TENSORATTN_FUZZ_EXAMPLES", "10000")), deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def restore_registry():
    """Snapshot the spec and backend registries; restore them even if the test fails."""
    from tensorattn.registry import registered
    from tensorattn.spec.registry import _registry

    BACKENDS = registered()
    specs, backends = dict(_registry()), dict(BACKENDS)
    yield
    _registry().clear()
    _registry().update(specs)
    BACKENDS.clear()
    BACKENDS.update(backends)
