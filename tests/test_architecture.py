"""The import graph and code shape (scripts/archcheck.py, the rule in docs/architecture.md)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def archcheck():
    spec = importlib.util.spec_from_file_location("archcheck", ROOT / "scripts" / "archcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["archcheck"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("archcheck", None)


def test_every_module_is_in_a_layer(archcheck) -> None:
    unplaced = [m for m in archcheck.source_files() if archcheck.layer_of(m) is None]
    assert unplaced == []


def test_the_plugins_are_read(archcheck) -> None:
    modules = archcheck.source_files()
    for package in ("shadowvmm_vhost_user", "shadowvmm_vdpa", "shadowvmm_faulty"):
        assert package in modules, f"{package} not found under plugins/*/src"


def test_no_import_cycle(archcheck) -> None:
    assert archcheck.cycles(archcheck.graph()) == []


def test_no_upward_import(archcheck) -> None:
    assert archcheck.upward(archcheck.graph()) == []


def test_the_core_never_imports_a_plugin(archcheck) -> None:
    edges = archcheck.graph()
    wrong = [(src, dst) for src, dsts in edges.items() if src.startswith("shadowvmm.") or src == "shadowvmm"
             for dst in dsts if not dst.startswith("shadowvmm.") and dst != "shadowvmm"]
    assert wrong == []


def test_modules_and_functions_are_small(archcheck) -> None:
    assert archcheck.shape() == []


def test_the_checker_sees_a_cycle_and_an_upward_import(archcheck) -> None:
    edges = {"shadowvmm.errors": {"shadowvmm.device"}, "shadowvmm.device": {"shadowvmm.errors"}}
    assert archcheck.cycles(edges) == [["shadowvmm.device", "shadowvmm.errors"]]
    assert archcheck.upward(edges) == ["shadowvmm.errors (layer 0) imports shadowvmm.device "
                                       f"(layer {archcheck.layer_of('shadowvmm.device')})"]


def test_type_checking_imports_do_not_count(archcheck, tmp_path: Path) -> None:
    path = tmp_path / "mod.py"
    path.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from shadowvmm import device\n"
                    "from shadowvmm import errors\n")
    found = archcheck.imports_of("shadowvmm.memory", path, {"shadowvmm.device", "shadowvmm.errors"})
    assert found == {"shadowvmm.errors"}
