"""The README's commands are the ones CI runs, and the benchmark script still runs (tiny shape)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, re.S)]


def test_ci_runs_the_readme_install_and_test_commands() -> None:
    blocks = readme_commands()
    install = next(b for b in blocks if "pip install" in b)
    test = next(b for b in blocks if "pytest" in b)
    ci = (ROOT / ".ci" / "run").read_text()
    assert install in ci.splitlines()
    assert test in ci.splitlines()


def test_engine_benchmark_runs_and_reports_ratios(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = importlib.util.spec_from_file_location("bench_engine", ROOT / "bench" / "engine.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_engine", bench)  # its dataclasses look themselves up there
    spec.loader.exec_module(bench)
    out = tmp_path / "r.json"
    argv = [
        "--preset",
        "tiny",
        "--streams",
        "1,3",
        "--prompt-len",
        "12",
        "--response-len",
        "10",
        "--peak-n",
        "256",
        "--attention",
        "reference,batched",
        "--json",
        str(out),
    ]
    assert bench.main(argv) == 0
    text = capsys.readouterr().out
    assert "engine, batched" in text and "x R1" in text
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows][:2] == ["R0 helper (prefix re-run)", "R1 per token, KV cache"]
    assert [(r["name"], r["streams"]) for r in rows[2:]] == [
        ("engine, reference", 1),
        ("engine, batched", 1),
        ("engine, reference", 3),
        ("engine, batched", 3),
    ]
    assert all(
        r["response_tokens"] == (10 * r["streams"] if r["name"].startswith("engine") else 10) for r in rows
    )
    assert rows[1]["x_r1"] == pytest.approx(1.0)


def test_step_benchmark_writes_a_row_per_configuration(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_step", ROOT / "bench" / "step.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "rows.json"
    argv = ["--streams", "1,4", "--k", "1,3", "--min-len", "8", "--max-len", "40", "--steps", "2"]
    argv += ["--rounds", "1", "--quantize", "none,int8", "--threads", "1", "--json", str(out)]
    assert bench.main(argv) == 0
    rows = json.loads(out.read_text())
    keys = [(r["streams"], r["k"], r["attention"], r["quantize"]) for r in rows]
    assert keys == [
        (n, k, a, q)
        for n in (1, 4)
        for k in (1, 3)
        for a in ("reference", "batched")
        for q in ("none", "int8")
    ]
    for r in rows:
        assert set(r) == {
            "preset",
            "streams",
            "k",
            "attention",
            "quantize",
            "threads",
            "step_ms",
            "judged_tokens_per_s",
        }
        assert r["judged_tokens_per_s"] == pytest.approx(r["streams"] * r["k"] / r["step_ms"] * 1e3, rel=0.01)


def test_moderator_benchmark_runs_and_reports_ratios(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("bench_moderator", ROOT / "bench" / "moderator.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--words", "50", "--backlogs", "0,20", "--rounds", "1"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [r[0] for r in rows] == ["0", "20"] and rows[0][2] == "1.00"
    assert float(rows[1][2]) == pytest.approx(float(rows[1][1]) / float(rows[0][1]), rel=0.03, abs=0.01)


def test_quantize_benchmark_reports_both_weight_sets(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("bench_quantize", ROOT / "bench" / "quantize.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--preset", "tiny", "--streams", "1", "--length", "24", "--threads", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("random", "trigger"))]
    assert [r.split(",")[0].split(" (")[0] for r in rows] == ["random", "trigger checkpoint"]
    assert rows[0].split()[3] == "24" and rows[1].endswith("100.00%")  # the trigger tiers never move
