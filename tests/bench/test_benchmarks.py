"""The benchmark suite itself (benchmarks/): a tiny run produces well-formed JSON and Markdown,
checks every timed backend against the reference, and marks a wrong backend FAILED with no
speedup claimed from it."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

import resnet_bk.ops as ops

# benchmarks/ is a top-level folder of the checkout, not part of the installed package
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks import report  # noqa: E402
from benchmarks.run import main  # noqa: E402

pytestmark = pytest.mark.skipif("cpp" not in ops.available_backends(), reason="needs the C++ backend")

ROW_KEYS = {"suite", "op", "variant", "mode", "impl", "impl_kind", "device", "dtype", "B", "N", "status", "time_s",
            "ns_per_element", "gbps", "bw_fraction", "peak_mem_bytes", "check", "speedup", "notes"}


def _run(tmp_path, *extra):
    rc = main(["--smoke", "--ops", "bk_core", "--backends", "cpp", "--out", str(tmp_path), "--name", "t",
               "--no-progress", *extra])
    with open(os.path.join(tmp_path, "t.json")) as f:
        result = json.load(f)
    with open(os.path.join(tmp_path, "t.md")) as f:
        md = f.read()
    return rc, result, md


def test_smoke_run_structure(tmp_path, capsys):
    rc, result, md = _run(tmp_path)
    assert rc == 0
    m = result["machine"]
    for k in ("cpu_model", "cpu_cores", "torch", "triton", "git_commit", "cpu_isa_used_by_kernels", "gpu"):
        assert k in m
    assert "hostname" not in json.dumps(m).lower()
    assert m["cpu_isa_used_by_kernels"] == ops.cpu_isa()
    assert result["copy_bandwidth"]["cpu"]["gbps"] > 0
    rows = result["rows"]
    assert rows and all(ROW_KEYS <= set(r) for r in rows)
    # two-sided and causal, three modes, reference + cpp each
    got = {(r["variant"], r["mode"], r["impl"]) for r in rows}
    for variant in ("two-sided", "causal"):
        for mode in ("forward", "backward", "forward+backward"):
            assert (variant, mode, "reference") in got and (variant, mode, "cpp") in got
    for r in rows:
        assert r["status"] == "ok", r
        t = r["time_s"]
        assert t["p10"] <= t["median"] <= t["p90"] and t["n"] >= 1
        assert r["ns_per_element"] == pytest.approx(t["median"] / (r["B"] * r["N"]) * 1e9)
        assert isinstance(r["minor_faults_per_call"], int) and r["minor_faults_per_call"] >= 0
        if r["impl"] == "cpp":
            assert r["check"].startswith("ok")
            assert r["speedup"]["reference"] == pytest.approx(
                next(x for x in rows if x["impl"] == "reference" and x["mode"] == r["mode"]
                     and x["variant"] == r["variant"])["time_s"]["median"] / t["median"])
    assert "## bk_core [two-sided] on cpu, float32" in md and "| B | N | mode | impl |" in md
    assert "faults/call" in md
    out = capsys.readouterr().out
    assert "all correctness checks passed" in out
    # comparing a run with itself matches every ok row
    cmp = report.render_compare(result, result)
    assert f"{len(rows)} matching rows" in cmp and "geometric mean speedup 1x" in cmp


def test_broken_backend_is_marked_failed(tmp_path, monkeypatch, capsys):
    registry = ops._registry._registry["cpp"].impls
    good, check = registry["bk_core"]

    def broken(a, k, zri, mask, causal):
        return good(a, k, zri, mask, causal) * 1.001  # a 1e-3 relative error: far beyond float32's 1e-5

    monkeypatch.setitem(registry, "bk_core", (broken, check))
    rc, result, md = _run(tmp_path)
    assert rc == 1
    cpp = [r for r in result["rows"] if r["impl"] == "cpp"]
    assert cpp and all(r["status"] == "FAILED" for r in cpp)
    assert all(r["speedup"] == {} for r in cpp)
    assert all("differs from the reference" in r["check"] for r in cpp)
    assert all(r["status"] == "ok" for r in result["rows"] if r["impl"] == "reference")
    assert "FAILED" in md
    assert "FAILED/ERROR rows" in capsys.readouterr().out


def test_unavailable_case_is_skipped_with_reason(tmp_path, monkeypatch):
    from benchmarks import cases
    orig = cases.op_cases

    def with_missing():
        out = orig()
        out[0].unavailable = lambda: "resnet_bk.ops.example does not exist yet"
        return out

    monkeypatch.setattr("benchmarks.run.op_cases", with_missing)
    rc, result, _ = _run(tmp_path)
    assert rc == 0
    assert {"case": "bk_core[two-sided]", "reason": "resnet_bk.ops.example does not exist yet"} in result["skipped_cases"]
    assert all(r["variant"] != "two-sided" for r in result["rows"])


def test_row_subset_check_where_reference_is_not_timed(tmp_path, monkeypatch):
    # Above REF_LARGE_N the masked reference is not timed (tens of seconds per call at N = 65536):
    # the backends are then checked against the reference on the first rows only.
    monkeypatch.setattr("benchmarks.cases.REF_LARGE_N", 32)
    rc = main(["--smoke", "--ops", "bk_core_masked", "--backends", "cpp", "--out", str(tmp_path), "--name", "s",
               "--no-progress", "--no-plots"])
    with open(os.path.join(tmp_path, "s.json")) as f:
        rows = json.load(f)["rows"]
    assert rc == 0
    ref = [r for r in rows if r["impl"] == "reference"]
    assert ref and all(r["status"] == "skipped" and "first 2 rows" in r["reason"] for r in ref)
    cpp = [r for r in rows if r["impl"] == "cpp"]
    assert cpp and all(r["status"] == "ok" and r["check"] == "ok (first 2 rows vs reference)" for r in cpp)
    assert all(r["speedup"] == {} for r in cpp)  # nothing to compare against: no speedup claimed


def test_module_suite_smoke(tmp_path):
    rc = main(["--smoke", "--ops", "modules", "--out", str(tmp_path), "--name", "m", "--no-progress"])
    assert rc == 0
    with open(os.path.join(tmp_path, "m.json")) as f:
        result = json.load(f)
    rows = result["module_rows"]
    names = {r["module"] for r in rows}
    assert {"plain", "act", "early_exit", "multi_scale", "sparse", "learned_length", "layer:multi_scale"} <= names
    for r in rows:
        assert r["status"] == "ok", r
        assert {"d_model", "N", "B"} <= set(r)
        if r["module"] != "plain":
            assert r["speedup_vs_plain"]["inference"] > 0
    assert isinstance(result["module_config"], list) and result["module_config"]


def _mrow(module, d, n, train, infer, ppl=None):
    r = {"module": module, "device": "cpu", "d_model": d, "N": n, "B": 4, "status": "ok",
         "train_step": {"median": train}, "inference": {"median": infer}}
    if ppl is not None:
        r["training"] = {"val_ppl": ppl}
    return r


def test_module_speedups_pair_rows_with_the_plain_model_of_their_size():
    rows = [_mrow("plain", 128, 128, 2.0, 1.0, 10.0), _mrow("act", 128, 128, 1.0, 0.5, 11.0),
            _mrow("plain", 256, 256, 8.0, 4.0, 9.0), _mrow("act", 256, 256, 2.0, 1.0, 9.9)]
    report.module_speedups(rows)
    assert rows[1]["speedup_vs_plain"] == {"train_step": 2.0, "inference": 2.0}
    assert rows[3]["speedup_vs_plain"] == {"train_step": 4.0, "inference": 4.0}
    assert rows[1]["val_ppl_vs_plain"] == pytest.approx(1.1) and rows[3]["val_ppl_vs_plain"] == pytest.approx(1.1)


@pytest.mark.parametrize("vendor,family,model,gen", [
    ("AuthenticAMD", 0x19, 0x11, "zen4"),   # EPYC Genoa
    ("AuthenticAMD", 0x19, 0x01, "zen3"),   # EPYC Milan
    ("AuthenticAMD", 0x1A, 0x02, "zen5"),   # EPYC Turin
    ("AuthenticAMD", 0x17, 0x31, "zen2"),   # EPYC Rome
    ("GenuineIntel", 6, 143, None),
])
def test_machine_kind_tells_amd_generations_apart(vendor, family, model, gen):
    """A VM often reports its CPU only as "AMD EPYC": Zen 4 and Zen 5 results must not share a file."""
    from benchmarks.timing import machine_kind
    name = "AMD EPYC" if vendor == "AuthenticAMD" else "Intel(R) Xeon(R) Platinum 8480+"
    info = {"cpu_model": name, "cpu_vendor": vendor, "cpu_family": family, "cpu_model_number": model,
            "cpu_cores": 2, "cpu_isa_used_by_kernels": "avx512"}
    expected = f"cpu-2core-epyc-{gen}-avx512" if gen else "cpu-2core-xeon-avx512"
    assert machine_kind(info) == expected


def _step_run(tmp_path):
    rc = main(["--smoke", "--ops", "step", "--backends", "cpp", "step-reference", "--out", str(tmp_path),
               "--name", "s", "--no-progress", "--no-plots"])
    with open(os.path.join(tmp_path, "s.json")) as f:
        return rc, json.load(f)["rows"]


def test_step_decode_rows_are_checked_against_bk_core(tmp_path):
    """The decode-step case (``--ops step``): the cpp decode loop, every mode, checked against
    bk_core(causal=True) of the same tokens."""
    rc, rows = _step_run(tmp_path)
    assert rc == 0
    got = {(r["op"], r["mode"], r["impl"]) for r in rows}
    for mode in ("forward", "backward", "forward+backward"):
        for impl in ("reference", "cpp", "step-reference"):
            assert ("bk_core_step", mode, impl) in got
    for r in rows:
        assert r["status"] == "ok", r
        if r["impl"] != "reference":
            assert r["check"].startswith("ok"), r


def test_step_decode_wrong_step_is_failed(tmp_path, monkeypatch):
    """A decode step that is off by 0.1 % fails the check against bk_core of the whole sequence."""
    from resnet_bk.ops.bk_core import step as step_mod
    real = step_mod._fast_cpu  # the cpp decode call's path

    def wrong(diag_t, super_t, sub_t, z, state, out, inplace, backend):
        res = real(diag_t, super_t, sub_t, z, state, out, inplace, backend)
        if res is None or backend != "cpp":
            return res
        y, d = res
        if out is not None:
            y.mul_(1.001)  # the no_grad loop reads the out= buffer
        else:
            y = y * 1.001  # (y itself is saved for the backward)
        return y, d

    monkeypatch.setattr(step_mod, "_fast_cpu", wrong)
    rc, rows = _step_run(tmp_path)
    assert rc == 1
    assert {r["status"] for r in rows if r["impl"] == "cpp"} == {"FAILED"}
    assert {r["status"] for r in rows if r["impl"] == "step-reference"} == {"ok"}


def test_bench_compile_smoke(tmp_path):
    """benchmarks.bench_compile at a tiny size: one graph, no recompile, the same first-step logits."""
    from benchmarks.bench_compile import main as compile_main
    res = compile_main(["--d-model", "8", "--n-layers", "1", "--n-seq", "8", "--batch", "2", "--experts", "2",
                        "--reps", "2", "--json", str(tmp_path / "c.json")])["compile"]
    assert res["graphs_first_call"] == 1 and res["recompiles"] == 0 and res["graph_breaks"] == 0
    assert res["max_logit_diff_first_step"] <= 1e-4
    assert res["ms_eager"] > 0 and res["ms_compiled"] > 0
    with open(tmp_path / "c.json") as f:
        assert json.load(f)["compile"]["recompiles"] == 0
