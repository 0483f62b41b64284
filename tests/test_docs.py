"""Every code block in docs/ runs, in order, as a reader would type it (tests/docblocks.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from docblocks import blocks, run_guide, runnable

ROOT = Path(__file__).resolve().parent.parent
GUIDES = sorted((ROOT / "docs").glob("*.md"))


@pytest.mark.peer
@pytest.mark.parametrize("guide", GUIDES, ids=[g.stem for g in GUIDES])
def test_every_code_block_of_the_guide_runs(guide: Path, tmp_path: Path) -> None:
    run_guide(guide, tmp_path, ROOT)


def test_every_block_is_code_or_plain_text() -> None:
    for guide in GUIDES:
        for block in blocks(guide):
            runnable(block)


def test_state_carries_over_and_files_are_written(tmp_path: Path) -> None:
    guide = tmp_path / "g.md"
    guide.write_text("```sh\nexport GREETING=hi\nmkdir sub && cd sub\n```\n\n"
                     "```python\n# file: hello.py\nimport os\nprint(os.environ['GREETING'], os.getcwd())\n```\n\n"
                     "```text\nnot run\n```\n\n```sh\npython hello.py\n```\n")
    work = tmp_path / "work"
    work.mkdir()
    outputs = run_guide(guide, work, ROOT)
    assert outputs[-1] == f"hi {work / 'sub'}\n"


def test_a_failing_block_names_its_line(tmp_path: Path) -> None:
    guide = tmp_path / "g.md"
    guide.write_text("intro\n\n```sh\ntrue\n```\n\n```python\nraise SystemExit(3)\n```\n")
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(AssertionError, match=r"g.md:7: exit 3"):
        run_guide(guide, work, ROOT)


def test_unknown_language_and_unclosed_fence_are_errors(tmp_path: Path) -> None:
    guide = tmp_path / "g.md"
    guide.write_text("```rust\nfn main() {}\n```\n")
    with pytest.raises(ValueError, match="rust"):
        runnable(blocks(guide)[0])
    guide.write_text("```sh\ntrue\n")
    with pytest.raises(ValueError, match="unclosed"):
        blocks(guide)


def test_the_plugin_guide_names_every_capability() -> None:
    from shadowvmm.backends.base import MANDATORY, Capability

    text = (ROOT / "docs" / "guide-plugin.md").read_text()
    missing = [c.name for c in Capability if c.name and c.name != "NONE" and f"`{c.name}`" not in text]
    assert not missing, f"docs/guide-plugin.md does not describe {missing}"
    undocumented = [op for op in MANDATORY if f"`{op}" not in text]
    assert not undocumented, f"docs/guide-plugin.md does not describe {undocumented}"
