"""Presentation of a benchmark result: printed table, Markdown, PNG plots, run-to-run comparison,
and the issue's goals for the C++ backend stated as explicit ratios."""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Tuple

METHOD_NOTES = [
    "time: host wall clock around each call, the device synchronised before and after the timed segment; "
    "median with p10/p90 over the repeats after a warm-up; inputs rotated over a pool of 2-3 distinct tensor sets",
    "forward: inference (torch.no_grad); backward: the backward pass alone (the forward ran untimed just before); "
    "forward+backward: both in one timed segment. For the reference (split timing) forward and backward are the "
    "two halves of each forward+backward call",
    "correctness: every timed implementation's forward output and gradients on input set 0 are compared with the "
    "reference's in the same run (resnet_bk.ops.assert_close, float32 1e-5 / float64 1e-10 relative to "
    "|ref| + max|ref|); a FAILED row gets no speedup",
    "speedup x: median time of the named baseline / median time of this row (same size, dtype, mode, device)",
    "'<impl> alternating' speedup: the two timed alternately, call by call (a b b a ...), 1 / the median of the "
    "per-pair time ratios: robust to load that drifts between two separately timed rows",
    "GB/s: the minimum bytes the op must move (inputs read + outputs written, see cases.py) / median time; "
    "%bw: that over the copy_ bandwidth measured at the start of the run",
    "ns/el: median time per element (bk_core: per B*N; pooling: per B*N*D)",
    "faults/call (CPU): median minor page faults inside the timed region (getrusage); a fresh large output pays "
    "one per 4 KiB page (one per 2 MiB with huge pages), memory reused from the allocator's heap none, and which "
    "a call gets depends on what the process allocated before",
]

GOAL = {"op": "bk_core", "variant": "two-sided", "impl": "cpp", "B": 64, "N": 4096, "dtype": "float32", "device": "cpu"}


def _ms(t: Optional[float]) -> str:
    if t is None:
        return "-"
    if t >= 1:
        return f"{t:.2f} s"
    return f"{t * 1e3:.3g} ms" if t >= 1e-3 else f"{t * 1e6:.3g} us"


def _mib(b: Optional[int]) -> str:
    return "-" if b is None else f"{b / 2**20:.3g}"


def _speedups(r: dict) -> str:
    if not r.get("speedup"):
        return "-"
    return ", ".join(f"{k} {v:.3g}x" for k, v in sorted(r["speedup"].items()))


def _status(r: dict) -> str:
    if r["status"] == "ok":
        return "ok"
    return f"{r['status']}: {r.get('check') or r.get('reason')}"


def _row_cells(r: dict) -> List[str]:
    t = r.get("time_s")
    return [str(r["B"]), str(r["N"]) + (f" D={r['D']}" if "D" in r else ""), r["mode"], r["impl"],
            _ms(t["median"]) if t else "-",
            f"{_ms(t['p10'])}-{_ms(t['p90'])}" if t else "-",
            str(t["n"]) if t else "-",
            f"{r['ns_per_element']:.3g}" if r.get("ns_per_element") is not None else "-",
            f"{r['gbps']:.3g}" if r.get("gbps") is not None else "-",
            f"{100 * r['bw_fraction']:.2g}%" if r.get("bw_fraction") is not None else "-",
            _mib(r.get("peak_mem_bytes")),
            str(r["minor_faults_per_call"]) if r.get("minor_faults_per_call") is not None else "-",
            _speedups(r), _status(r)]


HEAD = ["B", "N", "mode", "impl", "median", "p10-p90", "n", "ns/el", "GB/s", "%bw", "peak MiB", "faults/call",
        "speedup vs baselines", "status"]


def _groups(rows: List[dict]) -> Dict[Tuple[str, str, str, str], List[dict]]:
    out: Dict[Tuple[str, str, str, str], List[dict]] = {}
    for r in rows:
        out.setdefault((r["op"], r["variant"], r["device"], r["dtype"]), []).append(r)
    return out


def _fmt_table(head: List[str], body: List[List[str]]) -> str:
    widths = [max(len(h), *(len(c[i]) for c in body)) if body else len(h) for i, h in enumerate(head)]
    widths = [min(w, 70) for w in widths]

    def line(cells):
        return "  ".join(c[:70].ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(c) for c in body])


def goal_lines(result: dict) -> List[str]:
    """The issue's goals for the C++ backend at B=64, N=4096, float32, as measured ratios: through
    the public op (``ops.bk_core``) and through the compiled op called directly (``cpp-op``)."""
    out = _goal_lines(result, "cpp", "public ops.bk_core")
    if any(r.get("impl") == "cpp-op" for r in result["rows"]):
        out += _goal_lines(result, "cpp-op", "torch.ops.resnet_bk.bk_core_fwd called directly")
    return out


def _goal_lines(result: dict, impl: str, how: str) -> List[str]:
    want = dict(GOAL, impl=impl)
    rows = {r["mode"]: r for r in result["rows"] if all(r.get(k) == v for k, v in want.items())}
    if not rows:
        return [f"goals ({impl}, bk_core two-sided, B=64 N=4096 float32, CPU): not in this grid/selection"]
    f, fb = rows.get("forward"), rows.get("forward+backward")
    out = [f"goals ({impl}: {how}; bk_core two-sided, B=64 N=4096 float32, CPU):"]
    if f is None or f["status"] != "ok":
        out.append(f"  forward row {'missing' if f is None else _status(f)}: goals not assessed")
        return out
    ns = f["ns_per_element"]
    out.append(f"  forward ns/element       {ns:.3g}  (goal <= 0.8: {'met' if ns <= 0.8 else 'NOT met'}, "
               f"{ns / 0.8:.3g}x the goal)")
    sp = f["speedup"].get("reference")
    if sp is None:
        out.append("  forward speedup vs reference: reference not timed")
    else:
        out.append(f"  forward speedup vs ref   {sp:.3g}x  (goal >= 150x: {'met' if sp >= 150 else 'NOT met'})")
    if fb is not None and fb["status"] == "ok":
        ratio = fb["time_s"]["median"] / f["time_s"]["median"]
        out.append(f"  (forward+backward)/forward {ratio:.3g}  (goal <= 3: {'met' if ratio <= 3 else 'NOT met'})")
    return out


def size_label(row_or_cfg: dict) -> str:
    """'d128 N128': the model size of a module row or config."""
    n = row_or_cfg.get("N", row_or_cfg.get("n_seq"))
    return f"d{row_or_cfg.get('d_model')} N{n}"


def _size_key(r: dict) -> tuple:
    """(device, d_model, N, B): module rows compare with the plain model of the same size."""
    return r.get("device"), r.get("d_model"), r.get("N"), r.get("B")


def module_speedups(module_rows: List[dict]) -> None:
    """Speedup of each module over the plain model, train step and inference: over the plain model
    timed interleaved with it in the same row (``baseline``) when there is one, else over the plain
    row of the same device. Perplexity ratio over the plain model trained on the same data."""
    plain = {_size_key(r): r for r in module_rows if r["module"] == "plain" and r["status"] == "ok"}
    for r in module_rows:
        p = r.get("baseline") or plain.get(_size_key(r))
        if r["status"] != "ok" or p is None:
            continue
        r["speedup_vs_plain"] = {k: p[k]["median"] / r[k]["median"] for k in ("train_step", "inference")}
        pt = r.get("baseline_training") or (plain.get(_size_key(r)) or {}).get("training")
        if "training" in r and pt:
            r["val_ppl_vs_plain"] = r["training"]["val_ppl"] / pt["val_ppl"]


def _module_table(result: dict) -> Tuple[List[str], List[List[str]]]:
    head = ["module", "size", "device", "params", "train step (p10-p90)", "x plain", "inference (p10-p90)", "x plain",
            "val ppl", "design claim", "notes"]
    body = []
    for r in result.get("module_rows", []):
        size = size_label(r)
        if r["status"] != "ok":
            body.append([r["module"], size, r.get("device", "-"), "-", "-", "-", "-", "-", "-", r.get("claim", ""),
                         f"{r['status']}: {r.get('reason')}"])
            continue
        ts, inf = r["train_step"], r["inference"]
        sp = r.get("speedup_vs_plain", {})
        tr = r.get("training")
        extra = dict(r.get("module_metrics") or {})
        if tr:
            extra.update({k: v for k, v in tr.get("final_train_metrics", {}).items()
                          if k != "ce_loss" and k not in extra})
        if r.get("baseline_training"):
            extra["plain_val_ppl_same_data"] = r["baseline_training"]["val_ppl"]
        notes = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items())
        body.append([r["module"], size, r["device"], f"{r['params'] / 1e3:.0f}k",
                     f"{_ms(ts['median'])} ({_ms(ts['p10'])}-{_ms(ts['p90'])})",
                     f"{sp['train_step']:.3g}x" if sp else "-",
                     f"{_ms(inf['median'])} ({_ms(inf['p10'])}-{_ms(inf['p90'])})",
                     f"{sp['inference']:.3g}x" if sp else "-",
                     f"{tr['val_ppl']:.3g}" if tr else "-", r.get("claim", ""), notes])
    return head, body


def _module_sizes(result: dict) -> str:
    cfgs = result.get("module_config") or []
    if isinstance(cfgs, dict):  # results written before the module grid had several sizes
        cfgs = [cfgs]
    return "; ".join(f"d_model={c.get('d_model')}, n_layers={c.get('n_layers')}, B={c.get('B')}, N={c.get('n_seq')}, "
                     f"{c.get('train_steps')} training steps" for c in cfgs)


def render_text(result: dict) -> str:
    parts = []
    for (op, variant, dev, dt), rows in _groups(result["rows"]).items():
        parts.append(f"\n== {op} [{variant}] on {dev}, {dt}")
        parts.append(_fmt_table(HEAD, [_row_cells(r) for r in rows]))
    if result.get("module_rows"):
        parts.append(f"\n== modules vs the plain model of the same size ({_module_sizes(result)}; on "
                     f"{result.get('corpus')})")
        parts.append(_fmt_table(*_module_table(result)))
    if result.get("decode_rows"):
        from .bench_decode import render as render_decode
        parts.append("\n" + render_decode(result["decode_rows"]))
    if result.get("peer_rows"):
        from .peers import render_lines
        parts += ["\n== peers: ResNet-BK vs a Transformer and Mamba of the same size"] + render_lines(result, _fmt_table)
    if result.get("skipped_cases"):
        parts.append("\nskipped cases:")
        parts += [f"  {s['case']}: {s['reason']}" for s in result["skipped_cases"]]
    parts.append("")
    parts += goal_lines(result)
    bad = [r for r in result["rows"] + result.get("module_rows", []) + result.get("decode_rows", [])
           + result.get("peer_rows", []) if r["status"] in ("FAILED", "ERROR")]
    parts.append(f"\n{len(bad)} FAILED/ERROR rows" if bad else "\nall correctness checks passed")
    return "\n".join(parts)


def _md_table(head: List[str], body: List[List[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in row] for row in body]
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |"
                                                                               for r in esc])


def render_markdown(result: dict) -> str:
    m = result["machine"]
    out = [f"# resnet_bk benchmarks: {result['machine_kind']} ({result['grid']} grid)", "",
           f"- CPU: {m['cpu_model']}, {m['cpu_cores']} cores ({m['torch_threads']} torch threads), "
           f"kernel ISA {m['cpu_isa_used_by_kernels']}",
           f"- GPU: {m['gpu'] or 'none'}; torch {m['torch']} (CUDA {m['torch_cuda']}), triton {m['triton']}, "
           f"Python {m['python']}",
           f"- git commit {m['git_commit']}; total run time {result['elapsed_s']:.0f} s",
           "- copy bandwidth: " + ", ".join(f"{k} {v['gbps']:.1f} GB/s" for k, v in result["copy_bandwidth"].items()),
           "", "## Goals", "", "```", *goal_lines(result), "```", "", "## Method", ""]
    out += [f"- {n}" for n in result["notes"]]
    out += [f"- peak memory ({k}): {v}" for k, v in result["memory_method"].items()]
    for (op, variant, dev, dt), rows in _groups(result["rows"]).items():
        out += ["", f"## {op} [{variant}] on {dev}, {dt}", ""]
        labels = {r["impl"]: r["impl_label"] for r in rows}
        out += [f"- `{k}`: {v}" for k, v in labels.items()]
        notes = sorted({n for r in rows for n in r.get("notes", [])})
        out += [f"- note: {n}" for n in notes]
        out += ["", _md_table(HEAD, [_row_cells(r) for r in rows])]
    if result.get("module_rows"):
        out += ["", "## Modules vs the plain model", "",
                f"Sizes: {_module_sizes(result)}; data: {result.get('corpus')}. 'x plain' = plain model time of "
                f"the same size / module time; "
                f"the design claim column quotes the original design documents (claims, not measurements).", "",
                _md_table(*_module_table(result))]
    if result.get("decode_rows"):
        from .bench_decode import render as render_decode
        out += ["", "## Decode: cached steps vs recomputing the prefix", "", "```",
                render_decode(result["decode_rows"]), "```"]
    if result.get("peer_rows"):
        from .peers import render_lines
        out += ["", "## Peers: ResNet-BK vs a Transformer and Mamba of the same size", "",
                f"- peak memory: {result.get('peer_memory_method')}"]
        out += render_lines(result, _md_table, md=True)
    if result.get("skipped_cases"):
        out += ["", "## Skipped cases", ""] + [f"- {s['case']}: {s['reason']}" for s in result["skipped_cases"]]
    return "\n".join(out) + "\n"


def plots(result: dict, out_dir: str, stem: str) -> List[str]:
    """One PNG per op variant / device / dtype: time vs N (left) and speedup over the reference vs
    N (right), one line per implementation and batch size, one row of panels per mode."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots")
        return []
    written = []
    if result.get("peer_rows"):
        from .peers import plots as peer_plots
        written += peer_plots(result, out_dir, stem)
    for (op, variant, dev, dt), rows in _groups(result["rows"]).items():
        ok = [r for r in rows if r["status"] == "ok"]
        if len({r["N"] for r in ok}) < 2:
            continue
        fig, axes = plt.subplots(3, 2, figsize=(11, 11), squeeze=False)
        for i, mode in enumerate(("forward", "backward", "forward+backward")):
            lines: Dict[Tuple[str, int], List[dict]] = {}
            for r in ok:
                if r["mode"] == mode:
                    lines.setdefault((r["impl"], r["B"]), []).append(r)
            for (impl, B), rs in sorted(lines.items()):
                rs.sort(key=lambda r: r["N"])
                axes[i][0].plot([r["N"] for r in rs], [r["time_s"]["median"] for r in rs], marker="o",
                                label=f"{impl} B={B}")
                sp = [(r["N"], r["speedup"]["reference"]) for r in rs if "reference" in r["speedup"]]
                if sp:
                    axes[i][1].plot(*zip(*sp), marker="o", label=f"{impl} B={B}")
            for j, ylabel in ((0, "median time (s)"), (1, "speedup over reference (x)")):
                ax = axes[i][j]
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("N")
                ax.set_ylabel(ylabel)
                ax.set_title(f"{mode}")
                ax.grid(True, which="both", alpha=0.3)
                if ax.lines:
                    ax.legend(fontsize=7)
        fig.suptitle(f"{op} [{variant}] {dev} {dt} ({result['machine_kind']})")
        fig.tight_layout()
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in f"{op}-{variant}-{dev}-{dt}")
        path = os.path.join(out_dir, f"{stem}-{safe}.png")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written


def _key(r: dict) -> tuple:
    return (r["op"], r["variant"], r["mode"], r["impl"], r["device"], r["dtype"], r.get("B"), r.get("N"), r.get("D"))


def render_compare(old: dict, new: dict) -> str:
    """Speedup of this run over an earlier one (old median / new median) for each matching row."""
    old_rows = {_key(r): r for r in old.get("rows", []) if r.get("status") == "ok"}
    body = []
    for r in new["rows"]:
        o = old_rows.get(_key(r))
        if o is None or r["status"] != "ok":
            continue
        ratio = o["time_s"]["median"] / r["time_s"]["median"]
        body.append([r["op"], r["variant"], r["device"], r["dtype"], str(r["B"]), str(r["N"]), r["mode"], r["impl"],
                     _ms(o["time_s"]["median"]), _ms(r["time_s"]["median"]), f"{ratio:.3g}x"])
    om = {(r["module"], _size_key(r)): r for r in old.get("module_rows", []) if r.get("status") == "ok"}
    for r in new.get("module_rows", []):
        o = om.get((r["module"], _size_key(r)))
        if o is None or r["status"] != "ok":
            continue
        for k in ("train_step", "inference"):
            body.append(["module", r["module"], r["device"], "-", str(r["B"]), str(r["N"]), k, "-",
                         _ms(o[k]["median"]), _ms(r[k]["median"]), f"{o[k]['median'] / r[k]['median']:.3g}x"])
    head = ["op", "variant", "device", "dtype", "B", "N", "mode", "impl", "old", "new", "new speedup"]
    om_commit = old.get("machine", {}).get("git_commit")
    title = (f"\n== this run vs {om_commit or 'an earlier run'} ({old.get('machine_kind')}, {old.get('grid')} grid): "
             f"{len(body)} matching rows")
    if old.get("machine_kind") != new.get("machine_kind"):
        title += " -- NOTE: different machine kinds, the ratios compare machines too"
    if not body:
        return title
    ratios = [float(b[-1][:-1]) for b in body]
    geo = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
    return "\n".join([title, _fmt_table(head, body), f"geometric mean speedup {geo:.3g}x"])
