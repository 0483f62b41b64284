"""The conformance kit in a plugin's pytest suite: one test per step.

::

    from shadowvmm.testing.conformance import conformance_suite

    @pytest.fixture
    def blk_factory(tmp_path):
        return lambda: MyBackend({"device": "blk", "image": str(tmp_path / "disk.img")})

    test_conformance_blk = conformance_suite("blk_factory", "blk")

The fixture returns the factory (a plain fixture, or an async one); a peer that
serves one front-end at a time gives the device-state step a second one through
``destination_fixture``. A step the
backend does not offer is skipped with the reason, a failed step fails with what
went wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from .report import Outcome
from .runner import STEP_NAMES, run_conformance

if TYPE_CHECKING:
    import pytest

__all__ = ["conformance_suite"]


def conformance_suite(factory_fixture: str, device_type: str | Any, *, destination_fixture: str | None = None,
                      **options: Any) -> Callable[..., Coroutine[Any, Any, None]]:
    """A pytest test function parametrized over the kit's steps, each run on its own against
    the factory fixture *factory_fixture* (and *destination_fixture*, the device-state step's
    ``destination_factory``); *options* go to :func:`run_conformance`."""
    import pytest  # here, not at import: the ``check`` command runs the kit without pytest

    fixtures = [factory_fixture, *([destination_fixture] if destination_fixture else [])]

    @pytest.mark.usefixtures(*fixtures)
    @pytest.mark.parametrize("conformance_step", STEP_NAMES)
    async def test_conformance(conformance_step: str, request: pytest.FixtureRequest) -> None:
        factory = request.getfixturevalue(factory_fixture)
        extra = {"destination_factory": request.getfixturevalue(destination_fixture)} if destination_fixture else {}
        report = await run_conformance(factory, device_type, steps=(conformance_step,), **options, **extra)
        result = report[conformance_step]
        if result.outcome is Outcome.SKIP:
            pytest.skip(result.detail)
        if result.outcome is Outcome.FAIL:
            pytest.fail(f"{report.implementation}: step {conformance_step} failed: {result.detail}", pytrace=False)

    return test_conformance
