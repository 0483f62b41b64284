"""Run the code blocks of a Markdown guide in order, as a reader would type them.

Conventions (docs/README.md):

* a fenced block whose first line is ``# file: NAME`` (python, toml, ...) is written to
  ``NAME`` (directories created) under the current directory, not run by itself;
* ``sh`` blocks run in bash (``set -eo pipefail``); ``python`` blocks run as ``python -``
  under the same shell state; exported variables, the current directory and an activated
  venv carry over from one block to the next, as in one terminal;
* blocks in ``text`` (or without a language) are output or diagrams, not code.

Each guide gets a fresh work directory holding ``shadowvmm`` (a link to this clone, as a
reader's ``git clone`` would leave it) and ``configs`` (the clone's, so commands read as they
would from the clone's top); the running interpreter's venv is first on ``PATH``.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

RUN = frozenset({"sh", "python"})
SILENT = frozenset({"", "text"})
FENCE = re.compile(r"^```([\w+-]*)\s*$")
FILE = re.compile(r"^#\s*file:\s*(\S+)\s*$")
STATE = ".docstate"
EOF = "SHADOWVMM_DOC_EOF"


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    lang: str
    text: str

    @property
    def file(self) -> str | None:
        first = self.text.split("\n", 1)[0]
        match = FILE.match(first)
        return match.group(1) if match else None

    @property
    def where(self) -> str:
        return f"{self.path.name}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """Every fenced block of *path*, in order (an unclosed fence is an error)."""
    found: list[Block] = []
    lang: str | None = None
    start, body = 0, []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        match = FENCE.match(line)
        if lang is None and match:
            lang, start, body = match.group(1), number, []
        elif lang is not None and line.strip() == "```":
            found.append(Block(path, start, lang, "\n".join(body) + "\n"))
            lang = None
        elif lang is not None:
            body.append(line)
    if lang is not None:
        raise ValueError(f"{path.name}:{start}: unclosed code block")
    return found


def runnable(block: Block) -> bool:
    """Whether *block* is code (runs or is written); a language we do not know is an error."""
    if block.file is not None or block.lang in RUN:
        return True
    if block.lang in SILENT:
        return False
    raise ValueError(f"{block.where}: code block in {block.lang!r}: use sh, python, '# file:' or text")


def script(block: Block) -> str:
    """The bash text that does what a reader does with *block*."""
    if block.file is not None:
        name = shlex.quote(block.file)
        return f"mkdir -p \"$(dirname {name})\"\ncat > {name} <<'{EOF}'\n{block.text}{EOF}\n"
    if block.lang == "python":
        return f"python - <<'{EOF}'\n{block.text}{EOF}\n"
    return block.text


def run_guide(path: Path, work: Path, clone: Path, *, timeout: float = 300.0) -> list[str]:
    """Run every block of *path* in *work*; the outputs, one per block (raises on the first failure)."""
    (work / "shadowvmm").symlink_to(clone)
    (work / "configs").symlink_to(clone / "configs")
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("VIRTUAL_ENV", None)
    outputs = []
    for block in blocks(path):
        if not runnable(block):
            continue
        state = shlex.quote(str(work / STATE))
        body = (f"set -eo pipefail\nif [ -f {state} ]; then source {state}; fi\n{script(block)}\n"
                f"_doc_pwd=$PWD\nexport -p > {state}\necho \"cd $(printf %q \"$_doc_pwd\")\" >> {state}\n")
        proc = subprocess.run(["bash", "-c", body], cwd=work, env=env, capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(f"{block.where}: exit {proc.returncode}\n--- block\n{block.text}"
                                 f"--- stdout\n{proc.stdout[-4000:]}--- stderr\n{proc.stderr[-4000:]}")
        outputs.append(proc.stdout)
    return outputs
