"""Issue 20 item 8: the design's example scripts (seeds/001 ``examples/act_demo.py``, seeds/002
``examples/multi_scale_demo.py``) run as scripts, tiny, on the CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import resnet_bk

ROOT = Path(resnet_bk.__file__).resolve().parents[1]


def _run(script: str, *args: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    r = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args, "--json"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stdout


def test_act_demo_runs():
    res, out = _run("act_demo.py", "--steps", "4", "--d-model", "16", "--n-layers", "3", "--n-seq", "16",
                    "--batch-size", "4")
    for section in ("1. Threshold", "2. act_lambda", "3. Training dynamics", "4. Against the standard model"):
        assert section in out
    blocks = [v["blocks_per_token"] for v in res["thresholds"].values()]
    assert all(1.0 <= b <= 3.0 for b in blocks) and blocks[0] <= blocks[-1]   # threshold 0.5 halts sooner than 0.99
    assert len(res["curve"]) == 4 and set(res["lambdas"]) == {"0.001", "0.01", "0.1"}


def test_multi_scale_demo_runs():
    res, out = _run("multi_scale_demo.py", "--d-model", "16", "--lengths", "16", "30", "--batch-size", "2",
                    "--steps", "3")
    assert {(r["N"], r["layer"]) for r in res["layers"]} == {
        (n, k) for n in (16, 30) for k in ("standard", "multi-scale", "hierarchical")}
    for name, st in res["stability"].items():
        assert st["rel_err_f32_vs_f64"] < 1e-4 and st["finite_at_10x"], name
    assert set(res["training"]) == {"standard", "multi-scale", "hierarchical"}
