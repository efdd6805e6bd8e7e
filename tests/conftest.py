"""Shared fixtures: the codec implementations every behavioural test runs over."""

from __future__ import annotations

import importlib

import pytest

IMPLEMENTATIONS = ("python", "cython")


def load_codec(name: str):
    """The module providing Deframer/Framer for one implementation.

    The Cython one is imported directly, never through the selector, so a broken
    build fails the suite instead of quietly testing the fallback twice.
    """
    if name == "python":
        return importlib.import_module("eembridge.core.codec")
    try:
        return importlib.import_module("eembridge._fast.eem")
    except ImportError as exc:  # a missing facility is a failure, not a skip
        pytest.fail(f"Cython codec eembridge._fast.eem is not built ({exc}); run pip install .")


@pytest.fixture(params=IMPLEMENTATIONS)
def codec(request):
    return load_codec(request.param)


from netfixtures import netns, tap_pair_factory  # noqa: E402, F401  (shared network fixtures)
