"""Every fenced code block of README.md and docs/*.md runs as written (docs convention).

- ```bash: run in order with bash -e, starting in a copy of the demo workspace (made once per
  test session by `ledger demo`; `cd demo-workspace` there stays in it); a `cd` carries over to
  the file's next block.
- ```python: executed in the folder the bash blocks left, each in a namespace of its own,
  unless the sentence before it says it continues an earlier one: "continuing the first
  example" runs it after the file's first python block (in a copy of its names), any other
  "continuing" after the block before it.
- ```sql: run with `ledger sql` against the demo workspace's ledger.
- ```text and unnamed blocks: printed output, not run.
- `<!-- docs-test: skip (reason) -->` on the line before a block skips it.

A failure names the file and the line of the block's opening fence.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from ledger.cli import cli

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN = ("bash", "python", "sql")
SKIP = re.compile(r"^<!-- docs-test: skip \((.+)\) -->$")
FENCE = re.compile(r"^```(\S*)\s*$")


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    skip: str | None
    lead: str = ""  # the paragraph just before the block

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, with the skip reason written before each."""
    found, lines, i = [], path.read_text(encoding="utf-8").splitlines(), 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and lines[i].rstrip() != "```":
            body.append(lines[i])
            i += 1
        before = next((x.strip() for x in reversed(lines[:start]) if x.strip()), "")
        skipped = SKIP.match(before)
        lead: list[str] = []
        for x in reversed(lines[:start]):
            if not x.strip() or SKIP.match(x.strip()):
                if lead:
                    break
                continue
            lead.insert(0, x.strip())
        code = "\n".join(body) + "\n"
        reason = skipped[1] if skipped else None
        found.append(Block(path, start + 1, opening[1], code, reason, " ".join(lead)))
        i += 1
    return found


def test_skip_markers_give_a_reason_and_precede_a_block() -> None:
    for path in FILES:
        lines = path.read_text(encoding="utf-8").splitlines()
        for n, line in enumerate(lines, start=1):
            if "docs-test:" in line:
                assert SKIP.match(line.strip()), f"{path.name}:{n}: write `{SKIP.pattern}`"
                after = next((x for x in lines[n:] if x.strip()), "")
                assert FENCE.match(after), f"{path.name}:{n}: a skip marker goes before a block"


def test_the_parser_finds_blocks_lines_and_markers(tmp_path) -> None:
    doc = tmp_path / "d.md"
    doc.write_text(
        "Text\n\n```bash\nledger --help\n```\n\n<!-- docs-test: skip (needs a GPU) -->\n"
        "```python\nimport torch\n```\n```text\nout\n```\n"
    )
    found = [(b.line, b.lang, b.code, b.skip) for b in blocks(doc)]
    assert blocks(doc)[0].lead == "Text"
    assert found == [
        (3, "bash", "ledger --help\n", None),
        (8, "python", "import torch\n", "needs a GPU"),
        (11, "text", "out\n", None),
    ]


def run_bash(block: Block, cwd: Path, state: Path) -> Path:
    script = f"set -e\ncd {str(cwd)!r}\n{block.code}\npwd > {str(state)!r}\n"
    env = {k: v for k, v in os.environ.items() if k != "LEDGER_DATABASE_URL"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    done = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, env=env, timeout=600
    )
    if done.returncode != 0:
        pytest.fail(
            f"{block.where}: bash block failed (exit {done.returncode}):\n{block.code}\n"
            f"--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
        )
    return Path(state.read_text().strip())


def python_namespace(block: Block, earlier: list[dict]) -> dict:
    """Where a python block runs: a fresh namespace, or a copy of the one it continues."""
    lead = block.lead.lower()
    if "continuing the first example" in lead and earlier:
        return dict(earlier[0])
    if "continuing" in lead and earlier:
        return dict(earlier[-1])
    return {"__name__": "__docs__"}


def run_python(block: Block, namespace: dict, cwd: Path, monkeypatch) -> None:
    monkeypatch.chdir(cwd)
    try:
        exec(compile(block.code, block.where, "exec"), namespace)
    except Exception:  # noqa: BLE001 - reported with the block's place
        pytest.fail(f"{block.where}: python block failed:\n{traceback.format_exc(limit=-3)}")


def run_sql(block: Block, workspace: Path) -> None:
    url = f"sqlite:///{workspace / 'ledger.db'}"
    result = CliRunner().invoke(cli, ["--db", url, "sql", block.code])
    if result.exit_code != 0:
        pytest.fail(f"{block.where}: sql block failed:\n{block.code}\n{result.output}")


@pytest.mark.slow
@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_every_block_runs(path: Path, demo_workspace: Path, tmp_path, monkeypatch) -> None:
    workspace = tmp_path / "demo-workspace"
    shutil.copytree(demo_workspace, workspace)
    # Blocks start inside the workspace; one that first says `cd demo-workspace`, as a reader
    # fresh from `ledger demo` would, lands in the same place.
    (workspace / "demo-workspace").symlink_to(workspace)
    state, cwd, namespaces = tmp_path / ".cwd", workspace, []
    for block in blocks(path):
        if block.skip is not None or block.lang not in RUN:
            continue
        if block.lang == "bash":
            cwd = run_bash(block, cwd, state)
        elif block.lang == "python":
            namespaces.append(python_namespace(block, namespaces))
            run_python(block, namespaces[-1], cwd, monkeypatch)
        else:
            run_sql(block, workspace)
