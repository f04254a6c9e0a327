"""Train any ResNet-BK language model on a real byte-level corpus and report quality and speed.

    python -m resnet_bk.training.train --model plain|act|multiscale|hierarchical|... \
        [--data DIR] [--max-bytes 2000000] [--steps 300] [--batch-size 16] [--d-model 64] \
        [--n-layers 4] [--n-seq 128] [--lr 3e-3] [--backend cpp] [--threads 1] [--json out.json] \
        [--save model.pt] [--resume model.pt]

``--save PATH`` writes a checkpoint at the end (``resnet_bk.training.checkpoint``: the weights, the
model's registry name and constructor arguments, the optimizer and LR-schedule state, the step and
the RNG states); ``resnet_bk.training.checkpoint.load_model(PATH)`` rebuilds the model from it
alone. ``--resume PATH`` continues such a run: the model (name and architecture from the
checkpoint; an architecture option given that differs is an error), optimizer, schedule, step and
random streams are restored and training goes on to ``--steps`` (the TOTAL step count, the same
as the first run's for an identical schedule). ``--save-every K`` also saves every K steps; a
``{step}`` in PATH (``--save ckpt-{step}.pt``) keeps one file per save. Resuming the step-2
checkpoint of a 4-step run to ``--steps 4`` gives the same weights as the uninterrupted run.

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

from .checkpoint import load_checkpoint, save_checkpoint
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


ARCH_DEFAULTS = {"d_model": 64, "n_layers": 4, "n_seq": 128}


def train(model_name: Optional[str] = None, *, data_dir: Optional[str] = None, max_bytes: int = 2_000_000,
          val_fraction: float = 0.1, d_model: Optional[int] = None, n_layers: Optional[int] = None,
          n_seq: Optional[int] = None, batch_size: int = 16, steps: int = 300, lr: float = 3e-3,
          grad_clip: Optional[float] = 1.0, backend: Optional[str] = None, seed: int = 0, eval_batches: int = 8,
          progress: bool = True, model_kwargs: Optional[dict] = None, threads: Optional[int] = None,
          save: Optional[str] = None, resume: Optional[str] = None, save_every: Optional[int] = None) -> dict:
    """Train ``MODELS[model_name]`` for ``steps`` AdamW steps on random windows of the training split,
    then evaluate on the validation split. Returns a dict with the losses, validation perplexity,
    median ms per training step (forward+backward+update) and per inference batch, parameter count,
    and the model itself under "model".

    d_model / n_layers / n_seq default to 64 / 4 / 128. ``save``: write a checkpoint there at the
    end (see ``resnet_bk.training.checkpoint``) and, with ``save_every=K``, every K steps (a
    ``{step}`` in the path is replaced by the step). ``resume``: continue the run saved there (model
    name, architecture, backend and model_kwargs from the checkpoint; any of them given here must
    equal the saved one) up to ``steps`` total steps."""
    ckpt = None
    if resume is not None:
        ckpt = load_checkpoint(resume)
        saved = ckpt["model_args"]
        given = {"d_model": d_model, "n_layers": n_layers, "n_seq": n_seq, **(model_kwargs or {})}
        if model_name is not None and model_name != ckpt["model_name"]:
            raise ValueError(f"model_name: the checkpoint {resume!r} holds model {ckpt['model_name']!r}, got {model_name!r}")
        for k, v in given.items():
            if v is not None and saved.get(k) != v:
                raise ValueError(f"{k}: the checkpoint {resume!r} was trained with {k}={saved.get(k)!r}, got {v!r} "
                                 "(leave it out to use the checkpoint's)")
        if backend is not None and backend != saved.get("backend"):
            raise ValueError(f"backend: the checkpoint {resume!r} was trained with backend={saved.get('backend')!r}, "
                             f"got {backend!r}")
        model_name = ckpt["model_name"]
    elif model_name is None:
        raise ValueError("model_name: expected a model name (or resume=PATH), got None")
    if model_name not in MODELS:
        raise ValueError(f"model_name: expected one of {sorted(MODELS)}, got {model_name!r}")
    if ckpt is not None:
        d_model, n_layers, n_seq = (ckpt["model_args"][k] for k in ("d_model", "n_layers", "n_seq"))
    else:
        d_model = ARCH_DEFAULTS["d_model"] if d_model is None else d_model
        n_layers = ARCH_DEFAULTS["n_layers"] if n_layers is None else n_layers
        n_seq = ARCH_DEFAULTS["n_seq"] if n_seq is None else n_seq
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected a positive int, got {steps!r}")
    if save_every is not None and (not isinstance(save_every, int) or save_every < 1 or save is None):
        raise ValueError(f"save_every: expected a positive int together with save=PATH, got {save_every!r} "
                         f"(save={save!r})")
    if ckpt is not None and ckpt["step"] > steps:
        raise ValueError(f"steps: the checkpoint {resume!r} is at step {ckpt['step']}, got steps={steps} "
                         "(steps is the total, not the number of further steps)")
    if not (0.0 < val_fraction < 1.0):
        raise ValueError(f"val_fraction: expected a value in (0, 1), got {val_fraction!r}")
    prev_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _train(model_name, data_dir, max_bytes, val_fraction, d_model, n_layers, n_seq, batch_size, steps,
                      lr, grad_clip, backend, seed, eval_batches, progress, model_kwargs, save, ckpt, save_every)
    finally:
        torch.set_num_threads(prev_threads)


def _train(model_name, data_dir, max_bytes, val_fraction, d_model, n_layers, n_seq, batch_size, steps, lr,
           grad_clip, backend, seed, eval_batches, progress, model_kwargs, save, ckpt, save_every) -> dict:
    torch.manual_seed(seed)
    data = torch.frombuffer(bytearray(load_corpus(data_dir, max_bytes)), dtype=torch.uint8).long()
    n_val = max(int(data.numel() * val_fraction), n_seq + 1)
    if data.numel() - n_val < n_seq + 2:
        raise ValueError(f"max_bytes / data_dir: corpus of {data.numel()} bytes is too small for n_seq={n_seq}")
    tr, val = data[:-n_val], data[-n_val:]
    if ckpt is not None:
        model_args = dict(ckpt["model_args"])
    else:
        model_args = {"vocab_size": 256, "d_model": d_model, "n_layers": n_layers, "n_seq": n_seq,
                      "backend": backend, **(model_kwargs or {})}
    model = MODELS[model_name](**model_args)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10)) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(seed)
    start = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["state_dict"], strict=True)
        if ckpt.get("optimizer") is not None:
            opt.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scheduler") is not None:
            sched.load_state_dict(ckpt["scheduler"])
        rng = ckpt.get("rng") or {}
        if "data" in rng:
            gen.set_state(rng["data"])
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        start = int(ckpt["step"])
    saved = []

    def save_now(step_done: int) -> None:
        path = save.replace("{step}", str(step_done))
        save_checkpoint(path, model, model_name=model_name, model_args=model_args, optimizer=opt, scheduler=sched,
                        step=step_done, rng={"torch": torch.get_rng_state(), "data": gen.get_state()},
                        train_args={"data_dir": data_dir, "max_bytes": max_bytes, "val_fraction": val_fraction,
                                    "batch_size": batch_size, "steps": steps, "lr": lr, "grad_clip": grad_clip,
                                    "seed": seed})
        saved.append(path)
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=steps, initial=start, desc=f"train {model_name}", file=sys.stderr)
        except ImportError:
            bar = None
    step_times, losses, last_metrics = [], [], {}
    model.train()
    for step in range(start, steps):
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
        if save_every is not None and (step + 1) % save_every == 0:
            save_now(step + 1)
    if bar is not None:
        bar.close()
    if save is not None and (save_every is None or steps % save_every != 0 or start == steps):
        save_now(steps)  # before the evaluation (not part of the run)
    ev = evaluate(model, val, n_seq, batch_size, eval_batches)
    k = max(1, len(losses) // 10)
    st = sorted(step_times[min(5, len(step_times) - 1):]) or [float("nan")]  # skip warm-up steps
    out = {"model_name": model_name, "steps": steps, "batch_size": batch_size, "d_model": d_model,
            "n_layers": n_layers, "n_seq": n_seq, "corpus_bytes": int(data.numel()),
            "first_loss": sum(losses[:k]) / k if losses else float("nan"),
            "final_train_loss": sum(losses[-k:]) / k if losses else float("nan"),
            "ms_per_train_step": 1e3 * st[len(st) // 2], "train_seconds": sum(step_times),
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "torch_threads": torch.get_num_threads(), "backend": model_args.get("backend") or "auto",
            "last_metrics": last_metrics, **ev, "model": model}
    if ckpt is not None:
        out["resumed_from_step"] = start
    if saved:
        out["saved"] = saved
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m resnet_bk.training.train", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, choices=sorted(MODELS), help="required unless --resume")
    p.add_argument("--data", default=None, help="folder of text files (default: the Python stdlib sources)")
    p.add_argument("--max-bytes", type=int, default=2_000_000)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--d-model", type=int, default=None, help="default 64 (or the checkpoint's with --resume)")
    p.add_argument("--n-layers", type=int, default=None, help="default 4 (or the checkpoint's)")
    p.add_argument("--n-seq", type=int, default=None, help="default 128 (or the checkpoint's)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--backend", default=None, help="BK-Core backend (cpp, reference, ...; default automatic)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--act-threshold", type=float, default=None)
    p.add_argument("--act-lambda", type=float, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--save", default=None, metavar="PATH",
                   help="write a checkpoint (weights, constructor arguments, optimizer, step) at the end")
    p.add_argument("--save-every", type=int, default=None, metavar="K", help="with --save: also save every K steps")
    p.add_argument("--resume", default=None, metavar="PATH", help="continue the run saved in this checkpoint")
    a = p.parse_args(argv)
    if a.model is None and a.resume is None:
        p.error("--model is required (unless --resume PATH)")
    kw = {}
    if a.act_threshold is not None:
        kw["act_threshold"] = a.act_threshold
    if a.act_lambda is not None:
        kw["act_lambda"] = a.act_lambda
    res = train(a.model, data_dir=a.data, max_bytes=a.max_bytes, val_fraction=a.val_fraction, d_model=a.d_model,
                n_layers=a.n_layers, n_seq=a.n_seq, batch_size=a.batch_size, steps=a.steps, lr=a.lr,
                backend=a.backend, seed=a.seed, progress=not a.no_progress, model_kwargs=kw, threads=a.threads,
                save=a.save, resume=a.resume, save_every=a.save_every)
    res.pop("model")
    res["command"] = "python -m resnet_bk.training.train " + " ".join(sys.argv[1:] if argv is None else argv)
    print(json.dumps(res, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
