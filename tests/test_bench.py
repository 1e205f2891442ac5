"""The benchmark suite's machinery (no timings asserted): reference workers stay free of
torch, ratios are medians of per-repeat ratios, the README block is rewritten in place."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import report
from bench.timing import median_ratio

ROOT = Path(__file__).resolve().parents[1]


def _modules_after_import(module: str) -> set[str]:
    code = f"import sys, json, {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("module, library", [("bench.workers.ct2", "ctranslate2"),
                                             ("bench.workers.llamacpp", "llama_cpp"),
                                             ("bench.__main__", None), ("bench.report", None)])
def test_reference_workers_and_the_orchestrator_import_no_torch(module, library):
    if library:
        pytest.importorskip(library)
    loaded = _modules_after_import(module)
    assert "torch" not in loaded and "transformers" not in loaded, module
    if library:
        assert library in loaded


def test_median_of_per_repeat_ratios():
    # repeat 2 ran during a burst of load on the reference: the median ignores it, a ratio
    # of medians or of totals would not be the same figure
    assert median_ratio([10.0, 10.0, 10.0], [5.0, 1.0, 4.0]) == pytest.approx(2.5)
    assert median_ratio([2.0, 4.0], [1.0, 1.0]) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="equal"):
        median_ratio([1.0], [1.0, 2.0])


RESULTS = {
    "date": "2026-01-01 00:00 UTC", "command": "python -m bench --quick",
    "machine": {"cpu": "Test CPU 9000", "cores": 2, "loadavg_start": [0.5, 0.4, 0.3]},
    "versions": {"torch": "2.13.0", "ctranslate2": "4.8.5", "llama-cpp": None},
    "settings": {"threads": 2, "repeats": 2, "warmup": 1, "pause": 1.0, "quick": True, "smoke": False},
    "ceilings": {"fp32_gflops": 200.0, "bf16_gflops": 600.0, "read_gbs": 38.0},
    "measurements": [{
        "group": "decode", "model": "GPT-2-like 6x384", "case": "greedy b1 fp32", "unit": "tok/s",
        "subjects": ["lmforge"], "limit": "weights read", "missing": {"CT2": "ctranslate2 is not installed"},
        "ratios": {"lmforge / HF": 1.5},
        "contenders": {"lmforge": {"rate": 450.0, "limit_pct": 61.2, "peak_rss_mb": 300.0},
                       "HF": {"rate": 300.0, "limit_pct": 40.8, "peak_rss_mb": 500.0}}}],
}


def test_table_and_readme_block_come_from_the_json():
    table = report.format_table(RESULTS)
    assert "Test CPU 9000" in table and "1.50x HF" in table and "--quick" in table
    assert "ctranslate2 4.8.5" in table and "not measured" in table
    block = report.readme_block(RESULTS)
    assert block.startswith(report.BEGIN) and block.endswith(report.END)
    assert "| decode | GPT-2-like 6x384 | greedy b1 fp32 | lmforge | 450.0 tok/s | 1.50x HF | 61.2 | 300 |" in block


def test_readme_rewrite_touches_only_the_block(tmp_path):
    before = "# lmforge\n\n## Speed\n\n" + report.BEGIN + "\nold figures\n" + report.END + "\n\n## Layout\nfiles\n"
    readme, results = tmp_path / "README.md", tmp_path / "results.json"
    readme.write_text(before)
    results.write_text(json.dumps(RESULTS))
    report.main([str(results), "--readme", str(readme)])
    after = readme.read_text()
    assert "old figures" not in after and "Test CPU 9000" in after
    assert after.startswith("# lmforge\n\n## Speed\n\n") and after.endswith("\n\n## Layout\nfiles\n")
    with pytest.raises(ValueError, match="exactly one"):
        report.rewrite_readme("no markers here", "x")
