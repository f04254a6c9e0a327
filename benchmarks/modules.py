"""Module benchmarks: each adaptive model against the plain ResNet-BK language model.

For each module case: time per training step (forward, backward, AdamW step) and per inference
batch (eval mode, no_grad), the speedup over the plain model, and, from a short training run on
real text, the validation perplexity. A case whose module is not importable yet is SKIPPED with
the reason.

The real data is the English text of CPython's own documentation topics (``pydoc_data.topics``,
shipped with every Python, about 460 KB), modelled byte by byte (vocabulary 256): no download.
"""
from __future__ import annotations

import importlib
import importlib.util
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


@dataclass
class ModuleCase:
    name: str
    module: str                           # import path checked with importlib.util.find_spec
    attr: str                             # class or function that must exist in it
    build: Callable[[dict], nn.Module]    # config -> language model (B, N) -> logits
    label: str
    claim: str = ""                       # the original design's claim, quoted
    metrics: Callable[[nn.Module], Dict[str, float]] = field(default=lambda m: {})

    def unavailable(self) -> Optional[str]:
        try:
            spec = importlib.util.find_spec(self.module)
        except ModuleNotFoundError:
            spec = None
        if spec is None:
            return f"{self.module} is not importable yet (module not merged)"
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
                                                          act_threshold=0.95, halt_bias_init=0.0)


def _multi_scale(hierarchical: bool):
    def build(cfg):
        block = _cls("resnet_bk.models.multi_scale", "MultiScaleResNetBKBlock")
        lm = _cls("resnet_bk.models.base", "LanguageModel")
        d, n = cfg["d_model"], cfg["n_seq"]
        return lm(VOCAB, d, cfg["n_layers"], n, block_factory=lambda i: block(d, n, hierarchical=hierarchical))
    return build


def _sparse(cfg):
    return _cls("resnet_bk.models.sparse", "SparseLanguageModel")(VOCAB, cfg["d_model"], cfg["n_layers"],
                                                                cfg["n_seq"], target_sparsity=0.5)


def _learned_length(cfg):
    wrapper = _cls("resnet_bk.models.learned_length", "AdaptiveSequenceLengthWrapper")
    return wrapper(_plain(cfg), max_seq_len=cfg["n_seq"])


def _bucketing(cfg):
    mod = importlib.import_module("resnet_bk.models.bucketing")
    model = _plain(cfg)
    mod.attach_bucket_landmark(model.layer_norm_final,
                               mod.LearnableBucketLandmark(cfg["d_model"], max_positions=cfg["n_seq"]))
    return model


def module_cases() -> List[ModuleCase]:
    return [
        ModuleCase("plain", "resnet_bk.models.base", "LanguageModel", _plain, "plain ResNet-BK LM (the baseline)"),
        ModuleCase("act", "resnet_bk.models.act", "ACTLanguageModel", _act, "ACT, threshold 0.95",
                   claim="1.3-1.6x at threshold 0.95 (seeds/001)",
                   metrics=lambda m: {"avg_layers_executed": float(m.get_avg_layers_executed())}),
        ModuleCase("multi_scale", "resnet_bk.models.multi_scale", "MultiScaleResNetBKBlock", _multi_scale(False),
                   "multi-scale (N/2 + N) blocks", claim="1.23x (seeds/002 'expected output')"),
        ModuleCase("multi_scale_hier", "resnet_bk.models.multi_scale", "MultiScaleResNetBKBlock", _multi_scale(True),
                   "hierarchical multi-scale (U-Net) blocks", claim="1.44x (seeds/002 'expected output')"),
        ModuleCase("sparse", "resnet_bk.models.sparse", "SparseLanguageModel", _sparse,
                   "learned sparsity, target 50%", claim="1.8x at 50% sparsity (seeds/003)"),
        ModuleCase("learned_length", "resnet_bk.models.learned_length", "AdaptiveSequenceLengthWrapper",
                   _learned_length, "learned sequence length", claim="2-3x (seeds/000)"),
        ModuleCase("bucketing", "resnet_bk.models.bucketing", "attach_bucket_landmark", _bucketing,
                   "plain LM + learnable bucket landmarks", claim="+1-3% PPL (seeds/004, quality only)"),
    ]


MODULE_CONFIG = {
    "full": {"d_model": 64, "n_layers": 4, "n_seq": 128, "B": 16, "train_steps": 150, "val_batches": 8},
    "quick": {"d_model": 64, "n_layers": 2, "n_seq": 128, "B": 8, "train_steps": 0, "val_batches": 0},
    "smoke": {"d_model": 16, "n_layers": 1, "n_seq": 32, "B": 2, "train_steps": 0, "val_batches": 0},
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


def run_module_case(case: ModuleCase, cfg: dict, grid: str, policy: Policy, device: torch.device,
                    corpus) -> dict:
    """One row: timings (train step, inference batch), training-run perplexity, module metrics."""
    train, val, _ = corpus
    torch.manual_seed(0)
    model = case.build(cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    B, N = cfg["B"], cfg["n_seq"]
    pool = [batches(train, B, N, gen, device) for _ in range(4)]
    row: Dict[str, object] = {"suite": "module", "module": case.name, "label": case.label, "device": device.type,
                              "B": B, "N": N, "d_model": cfg["d_model"], "n_layers": cfg["n_layers"],
                              "params": n_params, "claim": case.claim, "notes": []}

    def train_step(i):
        model.train()
        x, y = pool[i % len(pool)]
        sync(device)
        t0 = time.perf_counter()
        loss, _ = _loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)
        return {"train_step": time.perf_counter() - t0}

    def infer(i):
        model.eval()
        x, _ = pool[i % len(pool)]
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            _logits(model(x))
        sync(device)
        return {"inference": time.perf_counter() - t0}

    st, notes = measure(train_step, policy)
    row["train_step"] = st["train_step"].to_dict()
    st, notes2 = measure(infer, policy)
    row["inference"] = st["inference"].to_dict()
    row["notes"] += notes + notes2
    steps = cfg["train_steps"]
    if steps:
        torch.manual_seed(0)
        model = case.build(cfg).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(2)
        t0 = time.perf_counter()
        metrics: Dict[str, float] = {}
        model.train()
        for _ in range(steps):
            x, y = batches(train, B, N, gen, device)
            loss, metrics = _loss(model, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        train_s = time.perf_counter() - t0
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for x, y in fixed_batches(val, B, N, cfg["val_batches"], device):
                logits = _logits(model(x))
                total += float(F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1), reduction="sum"))
                count += y.numel()
        row["training"] = {"steps": steps, "batch": [B, N], "optimizer": "AdamW lr 3e-3", "seconds": train_s,
                           "val_tokens": count, "val_ce": total / count, "val_ppl": math.exp(total / count),
                           "final_train_metrics": metrics}
        row["module_metrics"] = case.metrics(model)
    else:
        row["notes"].append(f"no training run in the {grid} grid (perplexity not measured)")
    row["status"] = "ok"
    return row
