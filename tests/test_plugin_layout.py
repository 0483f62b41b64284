"""Every first-party plugin is its own distribution, and what plugin-check installs from the
clone exists: a ``local-test-plugins`` line naming no plugin folder would make the fresh-venv
install fail (or, worse, reach for a registry)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = sorted(p for p in (ROOT / "plugins").iterdir() if p.is_dir())


def test_every_plugin_is_a_distribution_with_an_entry_point() -> None:
    assert {p.name for p in PLUGINS} >= {"vhost-user", "vdpa", "faulty", "nested"}
    for plugin in PLUGINS:
        project = tomllib.loads((plugin / "pyproject.toml").read_text())["project"]
        assert project["name"] == f"shadowvmm-{plugin.name}"
        assert "shadowvmm.backends" in project["entry-points"], plugin.name


def test_local_test_plugins_name_sibling_plugins() -> None:
    listed = {plugin.name: (plugin / "local-test-plugins").read_text().split()
              for plugin in PLUGINS if (plugin / "local-test-plugins").exists()}
    assert listed == {"nested": ["vhost-user"], "vdpa": ["nested"]}
    for name, deps in listed.items():
        for dep in deps:
            assert dep != name and (ROOT / "plugins" / dep / "pyproject.toml").is_file(), (name, dep)
