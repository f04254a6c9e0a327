"""Module benchmarks: each adaptive model against the plain ResNet-BK language model.

For each module case: from a short training run on real text, the validation perplexity; then,
on the trained model (its learned halting / sparsity / lengths are what set its cost), the time per
training step (forward, backward, AdamW step) and per inference batch (eval mode, no_grad), each
timed interleaved with a plain model of the same size on the same batches.

Settings (the ones a user would train with, chosen so that the adaptive part really adapts):
ACT threshold 0.95, act_lambda 0.03, halting bias 0 (p = 0.5 at init; with the default -1 and
act_lambda 0.01 no token ever halted in 150 steps); early exit at learned confidence 0.6 (trained with
every exit supervised, timed with early exit on); learned sparsity target 0.5 with an l2 sparsity
loss of weight 1 (masked positions skip the MoE FFN); learned length with length_penalty 0.5 on
"mixed" inputs (half short, half long rows, right-padded), where the plain model is trained and
timed on the same padded data. Sizes: see ``MODULE_CONFIG`` (the full grid runs d_model 128 / N 128
and d_model 256 / N 256). A case whose module is not importable yet is SKIPPED with the reason.

The real data is the English text of CPython's own documentation topics (``pydoc_data.topics``,
shipped with every Python, about 460 KB), modelled byte by byte (vocabulary 256): no download.
"""
from __future__ import annotations

import importlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .timing import Policy, measure, sync

VOCAB = 256


def text_corpus() -> Tuple[Tensor, Tensor, str]:
    """(train bytes, validation bytes, description): the last 10% of the corpus is validation."""
    from pydoc_data.topics import topics
    text = "\n\n".join(topics[k] for k in sorted(topics))
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    cut = int(len(data) * 0.9)
    return data[:cut], data[cut:], f"pydoc_data.topics (CPython {len(data)} bytes, byte-level, last 10% validation)"


def batches(data: Tensor, B: int, N: int, gen: torch.Generator, device: torch.device) -> Tuple[Tensor, Tensor]:
    """A random batch of (B, N) inputs and their next-byte targets."""
    starts = torch.randint(0, len(data) - N - 1, (B,), generator=gen)
    idx = starts[:, None] + torch.arange(N + 1)
    seq = data[idx].to(device)
    return seq[:, :-1], seq[:, 1:]


def fixed_batches(data: Tensor, B: int, N: int, count: int, device: torch.device) -> List[Tuple[Tensor, Tensor]]:
    """Deterministic, non-overlapping validation batches."""
    out = []
    step = (len(data) - N - 1) // max(1, B * count)
    pos = 0
    for _ in range(count):
        starts = torch.arange(B) * step + pos
        pos += B * step
        idx = (starts[:, None] + torch.arange(N + 1)).clamp_max(len(data) - 1)
        seq = data[idx].to(device)
        out.append((seq[:, :-1], seq[:, 1:]))
    return out


def pad_mixed(x: Tensor, y: Tensor, gen: torch.Generator) -> Tuple[Tensor, Tensor]:
    """The learned-length design's "mixed inputs": each row keeps a real length drawn half from
    [N/16, N/4] and half from [3N/4, N] (8-32 and 96-128 at N=128); the rest is right padding
    (input 0, target -100, which cross-entropy ignores)."""
    B, N = x.shape
    short = torch.rand(B, generator=gen) < 0.5
    L = torch.where(short, torch.randint(max(1, N // 16), N // 4 + 1, (B,), generator=gen),
                    torch.randint(3 * N // 4, N + 1, (B,), generator=gen)).to(x.device)
    pad = torch.arange(N, device=x.device)[None, :] >= L[:, None]
    return x.masked_fill(pad, 0), y.masked_fill(pad, -100)


@dataclass
class ModuleCase:
    name: str
    module: str                           # import path of the module
    attr: str                             # class or function that must exist in it
    build: Callable[[dict], nn.Module]    # config -> language model (B, N) -> logits
    label: str
    claim: str = ""                       # the original design's claim, quoted
    metrics: Callable[[nn.Module], Dict[str, float]] = field(default=lambda m: {})
    data: str = "text"                    # "text": unpadded windows; "mixed": pad_mixed windows
    cumulative_metrics: bool = False      # metrics() already accumulates over the validation batches

    def unavailable(self) -> Optional[str]:
        mod = importlib.import_module(self.module)
        if not hasattr(mod, self.attr):
            return f"{self.module} has no {self.attr}"
        return None


def _cls(module: str, attr: str):
    return getattr(importlib.import_module(module), attr)


def _plain(cfg):
    return _cls("resnet_bk.models.base", "LanguageModel")(VOCAB, cfg["d_model"], cfg["n_layers"], cfg["n_seq"])


def _act(cfg):
    return _cls("resnet_bk.models.act", "ACTLanguageModel")(VOCAB, cfg["d_model"], cfg["n_layers"], cfg["n_seq"],
                                                          act_threshold=0.95, act_lambda=0.03, halt_bias_init=0.0)


def _early_exit(cfg):
    # Trained with every exit supervised; timed and evaluated with early exit on (the design's use),
    # deciding with the learned confidence head (the softmax rule costs d_model * vocab per token
    # and block: measured 0.68x at d128 N128, threshold 0.8).
    return _cls("resnet_bk.models.early_exit", "EarlyExitLanguageModel")(
        VOCAB, cfg["d_model"], cfg["n_layers"], cfg["n_seq"], confidence_threshold=0.6, use_early_exit=True,
        confidence="head")


def _multi_scale(hierarchical: bool):
    def build(cfg):
        block = _cls("resnet_bk.models.multi_scale", "MultiScaleResNetBKBlock")
        lm = _cls("resnet_bk.models.base", "LanguageModel")
        d, n = cfg["d_model"], cfg["n_seq"]
        return lm(VOCAB, d, cfg["n_layers"], n, block_factory=lambda i: block(d, n, hierarchical=hierarchical))
    return build


def _sparse(cfg):
    return _cls("resnet_bk.models.sparse", "SparseLanguageModel")(VOCAB, cfg["d_model"], cfg["n_layers"],
                                                                cfg["n_seq"], target_sparsity=0.5,
                                                                sparsity_loss_weight=1.0, sparsity_loss_type="l2")


def _learned_length(cfg):
    wrapper = _cls("resnet_bk.models.learned_length", "AdaptiveSequenceLengthWrapper")
    return wrapper(_plain(cfg), max_seq_len=cfg["n_seq"], length_penalty=0.5)


def _sparse_metrics(m) -> Dict[str, float]:
    return {"sparsity": sum(l.get_sparsity_stats()["sparsity_ratio"] for l in m.sparse_layers()) / len(m.sparse_layers())}


def _length_metrics(m) -> Dict[str, float]:
    st = m.get_length_statistics()
    return {"avg_predicted_length": st["avg_predicted_length"], "token_ratio": st["avg_speedup"]}


def _bucketing(cfg):
    mod = importlib.import_module("resnet_bk.models.bucketing")
    model = _plain(cfg)
    mod.attach_bucket_landmark(model.layer_norm_final,
                               mod.LearnableBucketLandmark(cfg["d_model"], max_positions=cfg["n_seq"]))
    return model


def _bucketing_fixed(cfg):
    # The design's baseline: HyLoRADAConfig(landmark_bucketing="fixed") (hard logarithmic buckets).
    mod = importlib.import_module("resnet_bk.models.bucketing")
    model = _plain(cfg)
    mod.HyLoRADAConfig(max_positions=cfg["n_seq"]).attach(model.layer_norm_final, cfg["d_model"])
    return model


def module_cases() -> List[ModuleCase]:
    return [
        ModuleCase("plain", "resnet_bk.models.base", "LanguageModel", _plain, "plain ResNet-BK LM (the baseline)"),
        ModuleCase("act", "resnet_bk.models.act", "ACTLanguageModel", _act, "ACT, threshold 0.95",
                   claim="1.3-1.6x at threshold 0.95 (seeds/001)",
                   metrics=lambda m: {"avg_layers_executed": float(m.get_avg_layers_executed())}),
        ModuleCase("early_exit", "resnet_bk.models.early_exit", "EarlyExitLanguageModel", _early_exit,
                   "early exit, learned confidence >= 0.6 (exits supervised in training)",
                   claim="2-4x, <10% loss (seeds/000 comparison table)",
                   metrics=lambda m: {"avg_layers_executed": float(m.get_avg_layers_executed())}),
        ModuleCase("multi_scale", "resnet_bk.models.multi_scale", "MultiScaleResNetBKBlock", _multi_scale(False),
                   "multi-scale (N/2 + N) blocks", claim="1.23x (seeds/002 'expected output')"),
        ModuleCase("multi_scale_hier", "resnet_bk.models.multi_scale", "MultiScaleResNetBKBlock", _multi_scale(True),
                   "hierarchical multi-scale (U-Net) blocks", claim="1.44x (seeds/002 'expected output')"),
        ModuleCase("sparse", "resnet_bk.models.sparse", "SparseLanguageModel", _sparse,
                   "learned sparsity, target 50%", claim="1.8x at 50% sparsity (seeds/003)", metrics=_sparse_metrics),
        ModuleCase("learned_length", "resnet_bk.models.learned_length", "AdaptiveSequenceLengthWrapper",
                   _learned_length, "learned sequence length, mixed short/long padded inputs",
                   claim="2-3x on mixed inputs (seeds/000)", metrics=_length_metrics, data="mixed",
                   cumulative_metrics=True),
        ModuleCase("bucketing", "resnet_bk.models.bucketing", "attach_bucket_landmark", _bucketing,
                   "plain LM + learnable bucket landmarks", claim="+1-3% PPL (seeds/004, quality only)"),
        ModuleCase("bucketing_fixed", "resnet_bk.models.bucketing", "HyLoRADAConfig", _bucketing_fixed,
                   "plain LM + fixed (log) bucket landmarks, the bucketing baseline",
                   claim="the baseline of the +1-3% PPL claim (seeds/004, quality only)"),
    ]


# Each grid's module sizes, run in turn (every module row, and its plain model, at each size). The
# full grid runs two: at d_model 128, N 128 a model call's fixed cost (about 60 small ops per layer,
# ~1.7 ms per call here at any batch) is a large share of an inference batch and eats most of what
# the adaptive models save; at d_model 256, N 256 the per-token work dominates, as it does in models
# people train. Both are reported.
MODULE_CONFIG = {
    "full": [{"d_model": 128, "n_layers": 4, "n_seq": 128, "B": 16, "train_steps": 150, "val_batches": 8},
             {"d_model": 256, "n_layers": 4, "n_seq": 256, "B": 16, "train_steps": 150, "val_batches": 8}],
    "quick": [{"d_model": 64, "n_layers": 2, "n_seq": 128, "B": 8, "train_steps": 0, "val_batches": 0}],
    "smoke": [{"d_model": 16, "n_layers": 1, "n_seq": 32, "B": 2, "train_steps": 0, "val_batches": 0}],
}



def _logits(out) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


def _loss(model: nn.Module, x: Tensor, y: Tensor) -> Tuple[Tensor, Dict[str, float]]:
    """The model's own training objective when it has one (CE + its regularisers), else CE."""
    if hasattr(model, "training_loss"):
        loss, metrics = model.training_loss(x, y)
        return loss, {k: float(v) for k, v in metrics.items()}
    logits = _logits(model(x))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)), {}


def _train(model: nn.Module, case: ModuleCase, cfg: dict, train: Tensor, val: Tensor, device: torch.device,
           metrics_fn=None) -> dict:
    """``cfg['train_steps']`` AdamW steps on random windows of ``train`` (padded as ``case.data``
    says), then the validation cross-entropy over every real target of fixed windows of ``val``."""
    B, N, steps = cfg["B"], cfg["n_seq"], cfg["train_steps"]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(2)
    t0 = time.perf_counter()
    metrics: Dict[str, float] = {}
    model.train()
    for _ in range(steps):
        x, y = batches(train, B, N, gen, device)
        if case.data == "mixed":
            x, y = pad_mixed(x, y, gen)
        loss, metrics = _loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    train_s = time.perf_counter() - t0
    model.eval()
    if hasattr(model, "reset_length_statistics"):
        model.reset_length_statistics()
    total, count, per_batch = 0.0, 0, []
    vgen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for x, y in fixed_batches(val, B, N, cfg["val_batches"], device):
            if case.data == "mixed":
                x, y = pad_mixed(x, y, vgen)
            logits = _logits(model(x))
            total += float(F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1), reduction="sum"))
            count += int((y != -100).sum())
            if metrics_fn is not None:
                per_batch.append(metrics_fn(model))
    out = {"steps": steps, "batch": [B, N], "data": case.data, "optimizer": "AdamW lr 3e-3", "seconds": train_s,
           "val_tokens": count, "val_ce": total / count, "val_ppl": math.exp(total / count),
           "final_train_metrics": metrics}
    if per_batch:
        if case.cumulative_metrics:
            out["eval_metrics"] = per_batch[-1]
        else:
            out["eval_metrics"] = {k: sum(d[k] for d in per_batch) / len(per_batch) for k in per_batch[0]}
    return out


def run_module_case(case: ModuleCase, cfg: dict, grid: str, policy: Policy, device: torch.device,
                    corpus) -> dict:
    """One row: training-run perplexity (when the grid trains), then, on the trained model, the
    time per train step and per inference batch, each timed interleaved with a plain model of the
    same size on the same batches (``baseline``), so that load drift hits both alike."""
    train, val, _ = corpus
    torch.manual_seed(0)
    model = case.build(cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    B, N = cfg["B"], cfg["n_seq"]
    row: Dict[str, object] = {"suite": "module", "module": case.name, "label": case.label, "device": device.type,
                              "B": B, "N": N, "d_model": cfg["d_model"], "n_layers": cfg["n_layers"],
                              "params": n_params, "claim": case.claim, "data": case.data, "notes": []}
    steps = cfg["train_steps"]
    if steps:
        row["training"] = _train(model, case, cfg, train, val, device, case.metrics)
        row["module_metrics"] = row["training"].pop("eval_metrics", {})
    else:
        row["notes"].append(f"no training run in the {grid} grid (perplexity not measured)")
    with_base = case.name != "plain"
    if with_base:
        torch.manual_seed(0)
        base = _plain(cfg).to(device)
        if steps and case.data != "text":
            # The plain model's perplexity on the same (padded) data, same steps.
            row["baseline_training"] = _train(base, case, cfg, train, val, device)
    gen = torch.Generator().manual_seed(1)
    pool = []
    for _ in range(4):
        x, y = batches(train, B, N, gen, device)
        pool.append(pad_mixed(x, y, gen) if case.data == "mixed" else (x, y))
    runs = [("", model, torch.optim.AdamW(model.parameters(), lr=3e-3))]
    if with_base:
        runs.append(("baseline_", base, torch.optim.AdamW(base.parameters(), lr=3e-3)))

    def train_step(i):
        x, y = pool[i % len(pool)]
        res = {}
        for prefix, m, opt in runs:
            m.train()
            sync(device)
            t0 = time.perf_counter()
            loss, _ = _loss(m, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sync(device)
            res[prefix + "train_step"] = time.perf_counter() - t0
        return res

    def infer(i):
        x, _ = pool[i % len(pool)]
        return _time_inference([(prefix, m) for prefix, m, _ in runs], x, device, _logits)

    st, notes = measure(train_step, policy)
    st2, notes2 = measure(infer, policy)
    st.update(st2)
    row["train_step"] = st["train_step"].to_dict()
    row["inference"] = st["inference"].to_dict()
    if with_base:
        row["baseline"] = {"train_step": st["baseline_train_step"].to_dict(),
                           "inference": st["baseline_inference"].to_dict()}
    row["notes"] += notes + notes2
    row["status"] = "ok"
    return row


def _time_inference(runs, x, device, out) -> Dict[str, float]:
    """``{prefix + "inference": seconds}`` of one eval-mode, no-grad call of each (prefix, model)
    on x, in order (interleaved timing: the models see the same batch back to back)."""
    res = {}
    for prefix, m in runs:
        m.eval()
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out(m(x))
        sync(device)
        res[prefix + "inference"] = time.perf_counter() - t0
    return res


def run_layer_rows(cfg: dict, policy: Policy, device: torch.device) -> List[dict]:
    """Per-layer rows for the multi-scale designs, whose claims (1.23x, 1.44x) are per layer: one
    ``MultiScaleResNetBKLayer`` (and one hierarchical ``HierarchicalMultiScaleLayer``) against one
    ``MoEResNetBKLayer`` of the same d_model / n_seq on the same (B, N, D) input, timed interleaved.
    "train_step" here is forward + backward of ``out.sum()`` (train mode, no optimizer step);
    "inference" is a forward in eval mode under no_grad. Untrained layers: the cost of these layers
    does not depend on their weights (top-1 routing balance aside)."""
    from resnet_bk.models.base import MoEResNetBKLayer
    from resnet_bk.models.multi_scale import HierarchicalMultiScaleLayer, MultiScaleResNetBKLayer
    B, N, D = cfg["B"], cfg["n_seq"], cfg["d_model"]
    gen = torch.Generator().manual_seed(4)
    pool = [torch.randn(B, N, D, generator=gen).to(device) for _ in range(4)]
    rows = []
    for name, cls, claim in (("layer:multi_scale", MultiScaleResNetBKLayer, "1.23x (seeds/002, per layer)"),
                             ("layer:multi_scale_hier", HierarchicalMultiScaleLayer, "1.44x (seeds/002, per layer)")):
        torch.manual_seed(0)
        layer = cls(D, N).to(device)
        base = MoEResNetBKLayer(D, N).to(device)
        runs = [("", layer), ("baseline_", base)]

        def fwd_bwd(i):
            x = pool[i % len(pool)].detach().requires_grad_()
            res = {}
            for prefix, m in runs:
                m.train()
                m.zero_grad(set_to_none=True)
                sync(device)
                t0 = time.perf_counter()
                m(x).sum().backward()
                sync(device)
                res[prefix + "train_step"] = time.perf_counter() - t0
            return res

        def infer(i):
            x = pool[i % len(pool)]
            return _time_inference(runs, x, device, lambda y: y)

        st, notes = measure(fwd_bwd, policy)
        st2, notes2 = measure(infer, policy)
        st.update(st2)
        rows.append({"suite": "layer", "module": name, "label": f"one {cls.__name__} vs one MoEResNetBKLayer",
                     "device": device.type, "B": B, "N": N, "d_model": D, "n_layers": 1,
                     "params": sum(p.numel() for p in layer.parameters()), "claim": claim, "data": "random",
                     "notes": ["train_step = forward + backward (no optimizer step)"] + notes + notes2,
                     "train_step": st["train_step"].to_dict(), "inference": st["inference"].to_dict(),
                     "baseline": {"train_step": st["baseline_train_step"].to_dict(),
                                  "inference": st["baseline_inference"].to_dict()},
                     "status": "ok"})
    return rows
