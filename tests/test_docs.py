"""The documentation cannot drift from the code: the MkDocs site builds with ``--strict`` (no broken link,
reference or API entry), and every code block marked runnable in README.md and docs/**/*.md runs.

A runnable block has a line ``<!-- runnable -->`` directly above its opening fence (```bash or ```python).
Blocks are collected when the tests are collected, one test per block named ``FILE:LINE``. Each runs in a
fresh temporary folder holding ``shared`` (a link to ../shared) and ``repo`` (a link to the repository), with
RES2DET_CACHE inside that folder: bash blocks with ``bash -euo pipefail``, Python blocks with this interpreter,
each under BLOCK_TIMEOUT_S. They start processes that import torch and run models, so they are slow tests."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MARKER = "<!-- runnable -->"
FENCE = re.compile(r"^```(bash|python)\s*$")
BLOCK_TIMEOUT_S = 300  # per block; a block should take well under a minute on 2 cores


@dataclass(frozen=True)
class Block:
    file: str  # relative to the repository
    line: int  # 1-based line of the opening fence
    language: str
    code: str


def runnable_blocks(path: Path) -> list[Block]:
    """The blocks of ``path`` marked runnable. A marker not followed by a bash / python fence, or a fence that is
    never closed, is an error: a mistyped marker must not silently drop its example from the suite."""
    lines = path.read_text(encoding="utf-8").splitlines()
    rel = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name
    blocks = []
    for i, line in enumerate(lines):
        if line.strip() != MARKER:
            continue
        fence = FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
        if fence is None:
            raise ValueError(f"{rel}:{i + 1}: {MARKER} must be directly above a ```bash or ```python fence")
        end = next((j for j in range(i + 2, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise ValueError(f"{rel}:{i + 2}: the runnable block is never closed")
        blocks.append(Block(rel, i + 2, fence.group(1), "\n".join(lines[i + 2:end]) + "\n"))
    return blocks


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


BLOCKS = [block for path in doc_files() for block in runnable_blocks(path)]


def test_runnable_blocks_are_found(tmp_path):
    """The collector itself: a marked block is found with its line and language, an unmarked one is not, and a
    marker without a fence below it is an error."""
    page = tmp_path / "page.md"
    page.write_text("# t\n\n```bash\necho no\n```\n\n" + MARKER + "\n```python\nprint(1)\n```\n", encoding="utf-8")
    assert runnable_blocks(page) == [Block("page.md", 8, "python", "print(1)\n")]
    page.write_text(MARKER + "\n\n```bash\necho\n```\n", encoding="utf-8")
    with pytest.raises(ValueError, match="directly above"):
        runnable_blocks(page)
    page.write_text(MARKER + "\n```bash\necho\n", encoding="utf-8")
    with pytest.raises(ValueError, match="never closed"):
        runnable_blocks(page)
    assert BLOCKS, "no runnable block in README.md or docs/"


def test_mkdocs_build_strict(tmp_path):
    """The site builds with every warning an error (broken links and anchors, API entries that do not resolve,
    pages missing from the nav)."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site"),
                           "--config-file", str(ROOT / "mkdocs.yml")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    site = tmp_path / "site"
    assert (site / "index.html").is_file()
    for page in ("getting-started", "model-zoo", "training", "inference", "fidelity", "reliability", "architecture",
                 "api"):
        assert (site / page / "index.html").is_file(), page
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    assert "create_model" in api and "optimize_for_inference" in api  # rendered from the docstrings


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=[f"{b.file}:{b.line}" for b in BLOCKS])
def test_runnable_block(block: Block, tmp_path):
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} (the shared data beside the repository) is not there")
    (tmp_path / "shared").symlink_to(SHARED)
    (tmp_path / "repo").symlink_to(ROOT)
    bin_dir = str(Path(sys.executable).parent)  # the venv's `res2det` and `python`
    env = dict(os.environ, RES2DET_CACHE=str(tmp_path / "cache"), PATH=bin_dir + os.pathsep + os.environ["PATH"],
               MPLBACKEND="Agg")
    if block.language == "bash":
        command = ["bash", "-euo", "pipefail", "-c", block.code]
    else:
        command = [sys.executable, "-c", block.code]
    try:
        proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{block.file}:{block.line}: the example ran longer than {BLOCK_TIMEOUT_S} s")
    assert proc.returncode == 0, (f"{block.file}:{block.line}: the example failed (exit code {proc.returncode})\n"
                                  f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}")
