import os

# No GPU here: Triton kernels run in Triton's CPU interpreter (set before triton loads).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.register_profile(
    "dev", deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# Per-architecture files check each family's locator: where prompts and prefixes go.
# The kernels they call are the same splice and concat that the main suite runs on
# both paths, so in these files only the tests marked ``kernel_paths`` (each
# family's oracles) run again in the Triton pass; the rest count as ``workflow``.
FAMILY_FILES = ("test_family_", "test_torch_mha")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name.startswith(FAMILY_FILES) and not item.get_closest_marker("kernel_paths"):
            item.add_marker(pytest.mark.workflow)
        # Each family's oracles are its kernel-path tests: they also run on the
        # oldest supported transformers release (tests/test_releases.py).
        if item.get_closest_marker("kernel_paths"):
            item.add_marker(pytest.mark.oldest_release)
