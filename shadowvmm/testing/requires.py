"""What a test needs from the host: a peer executable, a backend plugin, a Python module.

A missing one skips the test, except when ``CI=true``: in CI a missing requirement is a
failure, never a silent skip.
"""

from __future__ import annotations

import importlib.util
import os
from typing import NoReturn

import pytest

from ..backends.base import available_backends
from .peers import PeerMissing, find_peer


def in_ci() -> bool:
    """Whether the ``CI`` environment variable says we run in CI."""
    return os.environ.get("CI", "").strip().lower() == "true"


def missing(reason: str) -> NoReturn:
    """Skip the test for *reason*, or fail it under ``CI=true``."""
    if in_ci():
        pytest.fail(f"CI=true and a requirement is missing: {reason}", pytrace=False)
    pytest.skip(reason)


def require_peer(name: str) -> str:
    """Return the path of peer *name*; skip the test if missing (fail if ``CI=true``)."""
    try:
        return find_peer(name)
    except PeerMissing as exc:
        if in_ci():
            pytest.fail(f"CI=true and a real peer is missing: {exc}", pytrace=False)
        pytest.skip(str(exc))


def require_backend(name: str, distribution: str) -> None:
    """Skip (fail under ``CI=true``) unless backend plugin *name* is registered."""
    if name not in available_backends():
        missing(f"backend plugin {name!r} is not installed (pip install {distribution})")


def require_module(module: str, distribution: str) -> None:
    """Skip (fail under ``CI=true``) unless *module* can be imported."""
    if importlib.util.find_spec(module) is None:
        missing(f"{module} is not installed (pip install {distribution})")
