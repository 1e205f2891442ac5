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
                                             ("bench.workers.load_client", "httpx"), ("bench.serving", None),
                                             ("bench.__main__", None), ("bench.report", None)])
def test_reference_workers_and_the_orchestrator_import_no_torch(module, library):
    if library:
        pytest.importorskip(library)
    loaded = _modules_after_import(module)
    assert "torch" not in loaded and "transformers" not in loaded, module
    assert library == "llama_cpp" or "llama_cpp" not in loaded, module
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
    other = {**RESULTS, "date": "2026-01-02 03:04 UTC", "command": "python -m bench chat"}
    two = report.readme_block(RESULTS, other)  # runs of single groups: one table each, with its header
    assert two.count("| group | model |") == 2 and "2026-01-02 03:04 UTC" in two and "`python -m bench chat`" in two


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


def _fake_openai_server(usage: bool, delay: float = 0.05):
    """A stdlib HTTP server streaming OpenAI chat chunks: a role chunk, `: ping` comments, three text
    chunks after `delay` seconds, a finish chunk, then (usage=True) a usage chunk. Records each body."""
    import http.server
    import threading
    import time
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((body, self.headers.get("Authorization")))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            events = [{"choices": [{"index": 0, "delta": {"role": "assistant"}}]}, ": ping"]
            events += [{"choices": [{"index": 0, "delta": {"content": w}}]} for w in ("a", " b", " c")]
            events += [{"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}]
            events += [{"choices": [], "usage": {"completion_tokens": 4}}] if usage else []
            time.sleep(delay)
            for e in events:
                line = e if isinstance(e, str) else "data: " + json.dumps(e)
                self.wfile.write((line + "\r\n\r\n").encode())
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\r\n\r\n")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}", seen


@pytest.mark.parametrize("usage", [False, True])
def test_load_client_on_a_fake_server(usage):
    pytest.importorskip("httpx")
    import asyncio

    from bench.workers.load_client import run_load
    server, url, seen = _fake_openai_server(usage)
    try:
        prompts = ["p0", "p1", "p2", "p3"]
        out = asyncio.run(run_load(url, concurrency=3, requests=5, max_tokens=7, prompts=prompts, api_key="k"))
    finally:
        server.shutdown()
    # 3 clients share 5 requests: 2 each, one after another
    assert len(out["requests"]) == len(seen) == 6
    want = 4 if usage else 3  # the server's usage, else the chunks that carried text
    assert [r["tokens"] for r in out["requests"]] == [want] * 6 and out["units"] == 6 * want
    assert {r["counted"] for r in out["requests"]} == {"usage" if usage else "chunks"}
    assert {r["finish"] for r in out["requests"]} == {"length"}
    assert all(0.05 <= r["ttft"] <= r["seconds"] <= out["wall"] for r in out["requests"])
    assert sorted(b["messages"][0]["content"] for b, _ in seen) == sorted(prompts[i % 4] for i in range(6))
    body, auth = seen[0]
    assert auth == "Bearer k" and body["stream"] and body["temperature"] == 0 and body["max_tokens"] == 7
    assert body["stream_options"] == {"include_usage": True}


def test_sse_lines_and_chunk_text():
    from bench.workers.load_client import DONE, chunk_text, sse_data
    assert sse_data(": ping - 2026") is None and sse_data("") is None and sse_data("event: x") is None
    assert sse_data("data: [DONE]") == DONE
    assert chunk_text(sse_data('data: {"choices": [{"delta": {"content": "hi"}}]}')) == "hi"
    assert chunk_text(sse_data('data:{"choices": [{"text": " there"}]}')) == " there"  # completions
    assert chunk_text({"choices": [], "usage": {"completion_tokens": 3}}) == ""


def test_serve_statistics():
    import statistics

    from bench.serving import level_ratios, percentile, summarize
    xs = [0.3, 0.1, 0.2, 0.5, 0.4]
    assert percentile(xs, 50) == statistics.median(xs)
    assert percentile(xs, 99) == pytest.approx(0.4 + 0.96 * 0.1)  # rank 3.96 of the sorted list
    assert percentile([2.0], 99) == 2.0
    runs = [{"units": 100.0, "wall": 2.0, "requests": [{"ttft": t, "counted": "usage", "finish": "length"}
                                                         for t in (0.1, 0.2, 0.3)]},
            {"units": 100.0, "wall": 4.0, "requests": [{"ttft": t, "counted": "usage", "finish": f}
                                                         for t, f in ((0.2, "stop"), (0.4, "length"), (0.6, "length"))]},
            {"units": 90.0, "wall": 1.0, "requests": [{"ttft": 0.1, "counted": "usage", "finish": "length"}]}]
    s = summarize(runs)
    assert s["rates"] == [50.0, 25.0, 90.0] and s["rate"] == 50.0
    assert s["ttft_p50s_ms"] == pytest.approx([200.0, 400.0, 100.0]) and s["ttft_p50_ms"] == pytest.approx(200.0)
    assert s["ttft_p99s_ms"] == pytest.approx([298.0, 596.0, 100.0]) and s["ttft_p99_ms"] == pytest.approx(298.0)
    assert s["finish"] == {"length": 6, "stop": 1} and s["tokens_from"] == ["usage"]
    rates = {"lmforge": {1: [10.0, 12.0, 11.0], 16: [80.0, 60.0, 99.0]},
             "llama.cpp": {1: [20.0, 20.0, 22.0], 16: [20.0, 30.0, 22.0]}}
    r = level_ratios(rates, 16)
    assert r["lmforge / llama.cpp"] == pytest.approx(4.0)  # median of 4, 2, 4.5
    assert r["lmforge / lmforge at 1 stream"] == pytest.approx(8.0)  # median of 8, 5, 9
    assert r["llama.cpp / llama.cpp at 1 stream"] == pytest.approx(1.0)  # median of 1, 1.5, 1
    assert level_ratios(rates, 1) == {"lmforge / llama.cpp": pytest.approx(0.5)}


def test_serve_rows_show_time_to_first_token():
    results = json.loads(json.dumps(RESULTS))
    results["measurements"] = [{
        "group": "serve", "model": "SmolLM2-135M-Instruct", "case": "16 streams, 64 new tokens", "unit": "tok/s",
        "subjects": ["lmforge"], "limit": "", "missing": {}, "note": "serve: streaming chat",
        "ratios": {"lmforge / llama.cpp": 2.0, "lmforge / lmforge at 1 stream": 5.0},
        "contenders": {"lmforge": {"rate": 400.0, "ttft_p50_ms": 120.0, "ttft_p99_ms": 480.4, "peak_rss_mb": 900.0},
                       "llama.cpp": {"rate": 200.0, "ttft_p50_ms": 2000.0, "ttft_p99_ms": 5000.0, "peak_rss_mb": 250.0}}}]
    block = report.readme_block(results)
    assert ("| serve | SmolLM2-135M-Instruct | 16 streams, 64 new tokens | lmforge | 400.0 tok/s, first token p50 120 ms, "
            "p99 480 ms | 2.00x llama.cpp, 5.00x lmforge at 1 stream | — | 900 |") in block
    assert "first token p50 2,000 ms, p99 5,000 ms" in block and "serve: streaming chat" in report.format_table(results)


def test_fp32_ceiling_takes_the_faster_gemm_library():
    """The fp32 matmul ceiling runs whichever of MKL and oneDNN was faster at setup, names it,
    and its product is the square product (so its FLOPs are 2 n^3)."""
    torch = pytest.importorskip("torch")
    from bench.workers import ceilings
    run, info = ceilings.matmul("fp32", max_n=256)
    assert info["shape"] == [256, 256, 256]
    assert info["library"] in ({"MKL", "oneDNN"} if hasattr(torch.ops.mkldnn, "_linear_pointwise") else {"MKL"})
    assert run() == 2.0 * 256 ** 3
    _, info16 = ceilings.matmul("bf16", max_n=256)
    assert info16["library"] == "torch.mm"  # bf16: torch.mm only (oneDNN inside)


def test_readme_commands_hold_no_absolute_paths():
    """A run's command is shown as a reader can rerun it: no path of the machine that ran it."""
    from bench.report import shown_command
    assert shown_command("python -m bench train --out /home/me/lmforge/runs/bench/t.json") == \
        "python -m bench train --out runs/bench/t.json"
    assert shown_command("python -m bench --quick --out /tmp/x.json") == "python -m bench --quick --out x.json"
    assert shown_command("python -m bench embed --out runs/e.json") == "python -m bench embed --out runs/e.json"
