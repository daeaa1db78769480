"""Smoke test of the benchmark (``bench/run.py --quick``) so it never rots.

Runs the bench as a subprocess on the embedded SQLite broker (with every scaling series at its
quick sizes, and their plots when matplotlib is importable), and on Redis when the server is
reachable (skipped otherwise unless ``CELERIAC_REQUIRE_BROKERS=1``). Celery's and Dramatiq's sides
are checked only when their packages are importable. Only that it runs and reports sane figures is
asserted: never how fast anything is.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[3]
RUN = ROOT / "bench" / "run.py"
REDIS_URL = os.environ.get("CELERIAC_BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
WORKLOADS = ("drain", "enqueue", "roundtrip", "chord", "start")
HAS_CELERY = importlib.util.find_spec("celery") is not None
HAS_DRAMATIQ = importlib.util.find_spec("dramatiq") is not None
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
SERIES = ("backlog", "chord", "payload", "memory")

pytestmark = pytest.mark.skipif(not RUN.exists(), reason="bench/ is not in this checkout")


def _redis_up() -> bool:
    parts = urlsplit(REDIS_URL)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), 2):
            return True
    except OSError:
        return False


def _run_bench(tmp_path: Path, brokers: str, *extra: str) -> dict[str, Any]:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(RUN), "--quick", "--brokers", brokers, "--pools", "threads",
           "--redis-url", REDIS_URL, "--output", str(out), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, f"bench exited with {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "| Celeriac " in proc.stdout
    return dict(json.loads(out.read_text()))


def _figures(data: dict[str, Any], broker: str, system: str) -> dict[str, list[float]]:
    found: dict[str, list[float]] = {}
    for rec in data["records"]:
        if rec["broker"] == broker and rec["system"] == system:
            assert rec["error"] is None, rec
            found.setdefault(rec["workload"], []).append(rec["value"])
    return found


def test_bench_quick_sqlite(tmp_path: Path) -> None:
    """Every Celeriac workload and every scaling series on the embedded broker report positive figures."""
    data = _run_bench(tmp_path, "sqlite", "--series", "all", "--backlog-sizes", "100,300", "--chord-sizes", "10,50",
                      "--group-size", "50", "--payload-mb", "1", "--memory-tasks", "500")
    figures = _figures(data, "sqlite", "celeriac")
    for workload in WORKLOADS:
        assert figures.get(workload), f"{workload} missing: {figures}"
        assert all(v > 0 for v in figures[workload]), (workload, figures[workload])
    assert data["meta"]["nproc"] >= 1
    rows = {(r["workload"], r["metric"]) for r in data["summary"] if r["broker"] == "sqlite"}
    assert ("roundtrip", "p50") in rows and ("drain", "tasks/s from start") in rows
    series = data["series"]
    assert sorted(series) == sorted(SERIES)
    for name in SERIES:
        points = series[name]["points"]
        assert points and all(not p.get("error") for p in points), (name, points)
    assert [p["x"] for p in series["backlog"]["points"]] == [100, 300]
    assert all(p["from_start"] > 0 for p in series["backlog"]["points"])
    chord = series["chord"]["points"]
    assert [(p["kind"], p["x"]) for p in chord] == [("chord", 10), ("chord", 50), ("group", 50)]
    assert all(p["seconds"] > 0 for p in chord)
    payload = series["payload"]["points"]
    assert [p["x"] for p in payload] == [100, 10240, 1048576] and all(p["drain_MBps"] > 0 for p in payload)
    memory = series["memory"]["points"][0]
    assert memory["idle_MiB"] > 0 and memory["final_MiB"] > 0 and len(memory["trace"]) >= 2
    if HAS_MATPLOTLIB:
        for name in SERIES:
            png = tmp_path / f"bench-{name}.png"
            assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def test_bench_quick_redis(tmp_path: Path) -> None:
    """On Redis: both systems (Celery when importable), ratios, and the raw-client ceiling."""
    if not _redis_up():
        if os.environ.get("CELERIAC_REQUIRE_BROKERS") == "1":
            pytest.fail(f"Redis at {REDIS_URL} is unreachable and CELERIAC_REQUIRE_BROKERS=1")
        pytest.skip(f"Redis at {REDIS_URL} is unreachable")
    if importlib.util.find_spec("celeriac_redis") is None:
        pytest.skip("celeriac-redis is not installed")
    data = _run_bench(tmp_path, "redis")
    systems = ["celeriac"] + (["celery"] if HAS_CELERY else []) + (["dramatiq"] if HAS_DRAMATIQ else [])
    for system in systems:
        figures = _figures(data, "redis", system)
        for workload in WORKLOADS:
            if system == "dramatiq" and workload == "chord":
                assert "chord" not in figures  # Dramatiq has no chord: the table says n/a
                continue
            assert figures.get(workload), f"{system} {workload} missing: {figures}"
            assert all(v > 0 for v in figures[workload]), (system, workload, figures[workload])
    raw = _figures(data, "redis", "raw")["raw"]
    assert len(raw) == 4 and all(v > 0 for v in raw)
    assert data["series"] == {}  # the series are off in quick mode unless asked for
    for peer, present in (("celery", HAS_CELERY), ("dramatiq", HAS_DRAMATIQ)):
        if not present:
            continue
        rows = [r for r in data["summary"] if r["broker"] == "redis" and r["workload"] != "raw"
                and not (peer == "dramatiq" and r["workload"] == "chord")]
        assert rows
        for row in rows:
            stats = row["ratios"][peer]
            assert stats is not None and stats["median"] > 0 and stats["min"] <= stats["median"] <= stats["max"], row
        if peer == "celery":
            assert all(r["ratio"] is not None and r["ratio"] > 0 for r in rows)
