"""Train any ResNet-BK language model on a real byte-level corpus and report quality and speed.

    python -m resnet_bk.training.train --model plain|act|multiscale|hierarchical|... \
        [--data DIR] [--max-bytes 2000000] [--steps 300] [--batch-size 16] [--d-model 64] \
        [--n-layers 4] [--n-seq 128] [--lr 3e-3] [--backend cpp] [--threads 1] [--json out.json]

Corpus: by default the Python standard library's own *.py sources (``sysconfig.get_paths()['stdlib']``,
read in sorted path order, concatenated up to ``max_bytes``), or every regular file under ``--data``
(sorted). Bytes are tokens (vocab 256). The first (1 - val_fraction) of the bytes is the training
split, the rest the validation split (contiguous, so no window straddles both).

Models come from ``MODELS`` (defined in ``resnet_bk.training.registry``), a dict name ->
factory(vocab_size, d_model, n_layers, n_seq, backend, **kwargs) -> nn.Module. Add one with
``register_model(name, factory)``. The trainer uses ``model.training_loss(x, y) -> (loss, metrics)``
when the model defines it (metrics: tensors or floats, e.g. ce_loss, ponder_cost,
avg_layers_executed), else cross-entropy on ``model(x)`` (first element when it returns a tuple).
Validation always uses the plain cross-entropy of the logits, so perplexities are comparable
across models.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import MODELS, register_model

__all__ = ["MODELS", "register_model", "load_corpus", "train", "main"]


def _walk_sorted(root: Path, skip_site_packages: bool):
    """Regular files under root, depth-first in sorted name order (files of a folder before its
    subfolders), lazily, so reading stops as soon as enough bytes were collected."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return
    dirs = []
    for e in entries:
        if e.is_file():
            yield Path(e.path)
        elif e.is_dir(follow_symlinks=False):
            if skip_site_packages and e.name in ("site-packages", "dist-packages", "__pycache__"):
                continue
            dirs.append(e)
    for d in dirs:
        yield from _walk_sorted(Path(d.path), skip_site_packages)


def load_corpus(data_dir: Optional[str] = None, max_bytes: int = 2_000_000, pattern: str = "*.py") -> bytes:
    """Bytes of the files under ``data_dir`` (every regular file), or by default of the Python
    stdlib's ``*.py`` sources (site-packages excluded), in a deterministic sorted walk (files of a
    folder, then its subfolders, by name), each followed by a newline, capped at ``max_bytes``."""
    if not isinstance(max_bytes, int) or max_bytes < 1:
        raise ValueError(f"max_bytes: expected a positive int, got {max_bytes!r}")
    root = Path(data_dir) if data_dir is not None else Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise ValueError(f"data_dir: expected an existing directory, got {str(root)!r}")
    suffix = pattern.lstrip("*") if data_dir is None else ""
    chunks, total = [], 0
    for p in _walk_sorted(root, skip_site_packages=data_dir is None):
        if suffix and not p.name.endswith(suffix):
            continue
        try:
            b = p.read_bytes()
        except OSError:
            continue
        b = b + b"\n"
        chunks.append(b[: max_bytes - total])
        total += len(chunks[-1])
        if total >= max_bytes:
            break
    if total < 2:
        raise ValueError(f"data_dir: no readable bytes found under {str(root)!r}")
    return b"".join(chunks)


def _batch(data: torch.Tensor, batch_size: int, n_seq: int, gen: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(0, data.numel() - n_seq - 1, (batch_size,), generator=gen)
    idx = starts[:, None] + torch.arange(n_seq + 1)
    w = data[idx]
    return w[:, :-1], w[:, 1:]


def _loss(model: nn.Module, x, y) -> Tuple[torch.Tensor, dict]:
    if hasattr(model, "training_loss"):
        return model.training_loss(x, y)
    out = model(x)
    logits = out[0] if isinstance(out, tuple) else out
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    return ce, {"ce_loss": ce.detach()}


def _logits(model: nn.Module, x):
    if "return_ponder_cost" in inspect.signature(model.forward).parameters:
        return model(x, return_ponder_cost=False)
    out = model(x)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def evaluate(model: nn.Module, val: torch.Tensor, n_seq: int, batch_size: int, max_batches: int) -> dict:
    """Mean next-token CE over non-overlapping validation windows (deterministic), and the median
    wall time of one inference batch."""
    model.eval()
    n_win = (val.numel() - 1) // n_seq
    n_win = min(n_win, batch_size * max_batches)
    if n_win < 1:
        raise ValueError(f"validation split of {val.numel()} bytes is shorter than n_seq+1={n_seq + 1}")
    total, count, times, extra = 0.0, 0, [], []
    for s in range(0, n_win, batch_size):
        w = torch.stack([val[i * n_seq: i * n_seq + n_seq + 1] for i in range(s, min(s + batch_size, n_win))])
        x, y = w[:, :-1].long(), w[:, 1:].long()
        t0 = time.perf_counter()
        logits = _logits(model, x)
        times.append(time.perf_counter() - t0)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
        count += y.numel()
        if hasattr(model, "get_avg_layers_executed"):
            extra.append(model.get_avg_layers_executed())
    model.train()
    times.sort()
    res = {"val_loss": total / count, "val_ppl": math.exp(total / count), "val_tokens": count,
           "ms_per_infer_batch": 1e3 * times[len(times) // 2]}
    if extra:
        res["val_avg_layers_executed"] = sum(extra) / len(extra)
    return res


def train(model_name: str, *, data_dir: Optional[str] = None, max_bytes: int = 2_000_000,
          val_fraction: float = 0.1, d_model: int = 64, n_layers: int = 4, n_seq: int = 128,
          batch_size: int = 16, steps: int = 300, lr: float = 3e-3, grad_clip: Optional[float] = 1.0,
          backend: Optional[str] = None, seed: int = 0, eval_batches: int = 8, progress: bool = True,
          model_kwargs: Optional[dict] = None, threads: Optional[int] = None) -> dict:
    """Train ``MODELS[model_name]`` for ``steps`` AdamW steps on random windows of the training split,
    then evaluate on the validation split. Returns a dict with the losses, validation perplexity,
    median ms per training step (forward+backward+update) and per inference batch, parameter count,
    and the model itself under "model"."""
    if model_name not in MODELS:
        raise ValueError(f"model_name: expected one of {sorted(MODELS)}, got {model_name!r}")
    if not (0.0 < val_fraction < 1.0):
        raise ValueError(f"val_fraction: expected a value in (0, 1), got {val_fraction!r}")
    prev_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _train(model_name, data_dir, max_bytes, val_fraction, d_model, n_layers, n_seq, batch_size, steps,
                      lr, grad_clip, backend, seed, eval_batches, progress, model_kwargs)
    finally:
        torch.set_num_threads(prev_threads)


def _train(model_name, data_dir, max_bytes, val_fraction, d_model, n_layers, n_seq, batch_size, steps, lr,
           grad_clip, backend, seed, eval_batches, progress, model_kwargs) -> dict:
    torch.manual_seed(seed)
    data = torch.frombuffer(bytearray(load_corpus(data_dir, max_bytes)), dtype=torch.uint8).long()
    n_val = max(int(data.numel() * val_fraction), n_seq + 1)
    if data.numel() - n_val < n_seq + 2:
        raise ValueError(f"max_bytes / data_dir: corpus of {data.numel()} bytes is too small for n_seq={n_seq}")
    tr, val = data[:-n_val], data[-n_val:]
    model = MODELS[model_name](256, d_model, n_layers, n_seq, backend=backend, **(model_kwargs or {}))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10)) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(seed)
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=steps, desc=f"train {model_name}", file=sys.stderr)
        except ImportError:
            bar = None
    step_times, losses, last_metrics = [], [], {}
    model.train()
    for step in range(steps):
        x, y = _batch(tr, batch_size, n_seq, gen)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss, metrics = _loss(model, x, y)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        sched.step()
        step_times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        last_metrics = {k: (v.item() if torch.is_tensor(v) else float(v)) for k, v in metrics.items()}
        if bar is not None:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
            bar.update(1)
        elif progress and (step % max(1, steps // 10) == 0 or step == steps - 1):
            print(f"step {step + 1}/{steps} loss {losses[-1]:.4f}", file=sys.stderr)
    if bar is not None:
        bar.close()
    ev = evaluate(model, val, n_seq, batch_size, eval_batches)
    k = max(1, len(losses) // 10)
    st = sorted(step_times[min(5, len(step_times) - 1):])  # skip warm-up steps
    return {"model_name": model_name, "steps": steps, "batch_size": batch_size, "d_model": d_model,
            "n_layers": n_layers, "n_seq": n_seq, "corpus_bytes": int(data.numel()),
            "first_loss": sum(losses[:k]) / k, "final_train_loss": sum(losses[-k:]) / k,
            "ms_per_train_step": 1e3 * st[len(st) // 2], "train_seconds": sum(step_times),
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "torch_threads": torch.get_num_threads(), "backend": backend or "auto", "last_metrics": last_metrics, **ev, "model": model}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m resnet_bk.training.train", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, choices=sorted(MODELS))
    p.add_argument("--data", default=None, help="folder of text files (default: the Python stdlib sources)")
    p.add_argument("--max-bytes", type=int, default=2_000_000)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--backend", default=None, help="BK-Core backend (cpp, reference, ...; default automatic)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--act-threshold", type=float, default=None)
    p.add_argument("--act-lambda", type=float, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    a = p.parse_args(argv)
    kw = {}
    if a.act_threshold is not None:
        kw["act_threshold"] = a.act_threshold
    if a.act_lambda is not None:
        kw["act_lambda"] = a.act_lambda
    res = train(a.model, data_dir=a.data, max_bytes=a.max_bytes, val_fraction=a.val_fraction, d_model=a.d_model,
                n_layers=a.n_layers, n_seq=a.n_seq, batch_size=a.batch_size, steps=a.steps, lr=a.lr,
                backend=a.backend, seed=a.seed, progress=not a.no_progress, model_kwargs=kw, threads=a.threads)
    res.pop("model")
    res["command"] = "python -m resnet_bk.training.train " + " ".join(sys.argv[1:] if argv is None else argv)
    print(json.dumps(res, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
