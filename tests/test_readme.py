"""The README runs as written: every Python block, and every shell block not marked as
costly, is executed in a scratch folder that holds a copy of configs/ (as a clone would).

A shell block is left out only when the line before its fence says so, with the reason:
`<!-- readme-test: skip (reason) -->`. Python blocks cannot be left out.
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"(?:^<!-- readme-test: skip \((?P<why>[^)]*)\) -->\n)?^```(?P<lang>\w*)\n(?P<body>.*?)^```$",
                   re.M | re.S)


def readme_blocks() -> list[tuple[str, str, str | None, int]]:
    """(language, code, skip reason or None, line number) for each fenced block of the README."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return [(m["lang"], m["body"], m["why"], text.count("\n", 0, m.start("body")) + 1) for m in FENCE.finditer(text)]


BLOCKS = [b for b in readme_blocks() if b[0] in ("python", "bash")]


def test_the_readme_has_runnable_blocks():
    assert sum(lang == "python" for lang, *_ in BLOCKS) >= 3
    assert not [line for lang, _, why, line in BLOCKS if lang == "python" and why], "Python blocks always run"


@pytest.mark.parametrize("lang,code,why,line", BLOCKS, ids=[f"{b[0]}-line{b[3]}" for b in BLOCKS])
def test_readme_block_runs(lang, code, why, line, tmp_path):
    if why:
        pytest.skip(f"README line {line}: {why}")
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    cmd = [sys.executable, "-c", code] if lang == "python" else ["bash", "-euo", "pipefail", "-c", code]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"README block at line {line} failed:\n{code}\n--- stderr ---\n{r.stderr[-3000:]}"
