"""The prepared GPU check (benchmarks/gpu_check.py) in its CPU dry-run mode: the whole pipeline
runs, writes the expected rows with passing checks, and a perturbed backend is reported as failed
checks with a non-zero exit code."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import resnet_bk.ops as ops

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.skipif("cpp" not in ops.available_backends(), reason="needs the C++ backend")


def _run(tmp_path, *extra):
    p = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", str(tmp_path), "--dry-run",
                        "--warmup", "1", "--repeats", "3", *extra],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    with open(tmp_path / "gpu-cpu-dry-run.json") as f:
        res = json.load(f)
    return p, res, (tmp_path / "gpu-cpu-dry-run.md").read_text()


def test_dry_run_rows_and_checks(tmp_path):
    p, res, md = _run(tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert res["verdict"] == "ok" and res["tests"]["status"] == "skipped"
    assert res["copy_bandwidth"]["gbps"] > 0
    for k in ("gpu", "torch", "torch_cuda", "triton", "git_commit"):
        assert k in res["machine"]
    got = {(r["variant"], r["B"], r["N"], r["backend"], r["mode"]) for r in res["rows"]}
    want = {(v, B, 4096 // B, "cpp", m) for v in ("two-sided", "causal", "causal-deterministic") for B in (1, 4, 64)
            for m in ("forward", "backward", "forward+backward")}
    assert got == want and len(res["rows"]) == len(want)
    for r in res["rows"]:
        assert r["status"] == "ok" and r["check"] == "ok", r
        assert r["time_s"]["n"] == 3 and r["time_s"]["median"] > 0
        assert r["ns_per_element"] == pytest.approx(r["time_s"]["median"] / 4096 * 1e9)
        assert r["gbps"] == pytest.approx(r["bytes"] / r["time_s"]["median"] / 1e9)
        assert r["copy_fraction"] == pytest.approx(r["gbps"] / res["copy_bandwidth"]["gbps"])
        assert r["goal_fraction"] == {"forward": 0.7, "backward": 0.5}.get(r["mode"])
        # the largest B is also checked against the reference on its first rows
        assert ("vs_reference_4_rows" in r["check_detail"]) == (r["B"] == 64)
        assert all(c["err_over_tol"] < 1 for c in r["check_detail"].values())
    # forward reads diag and writes complex64: 12 bytes/element; backward reads grad (8) and diag, writes grad_diag
    fwd = next(r for r in res["rows"] if r["mode"] == "forward")
    bwd = next(r for r in res["rows"] if r["mode"] == "backward")
    assert fwd["bytes"] == 12 * 4096 and bwd["bytes"] == 16 * 4096
    assert md.count("| cpp |") == len(want) and "result: ok" in md
    assert "result: ok" in p.stdout


def test_perturbed_backend_fails(tmp_path):
    p, res, md = _run(tmp_path, "--perturb")
    assert p.returncode == 1, p.stdout + p.stderr
    assert res["verdict"].startswith("FAILED") and res["perturbed"]
    assert len(res["rows"]) == 27
    for r in res["rows"]:
        assert r["check"] == "FAILED", r
        assert r["check_failures"] and "vs_cpp: FAILED" in r["check_failures"][0]
        assert r["check_detail"]["vs_cpp"]["err_over_tol"] > 3
    assert "| FAILED |" in md
