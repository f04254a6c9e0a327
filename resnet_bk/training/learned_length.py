"""``LearnedSequenceLengthTrainer``: the training / evaluation loop of
``resnet_bk.models.AdaptiveSequenceLengthWrapper`` (moved from ``resnet_bk.models.learned_length``,
where the name is still re-exported)."""
from __future__ import annotations

import math
import time
from typing import Dict

import torch
from torch import Tensor

from ..models.learned_length import AdaptiveSequenceLengthWrapper

__all__ = ["LearnedSequenceLengthTrainer"]


class LearnedSequenceLengthTrainer:
    """Training / evaluation loop for ``AdaptiveSequenceLengthWrapper``.

    train_step(x, y, use_adaptive_length=True) -> {total_loss, ce_loss, length_cost,
    avg_predicted_length, speedup_estimate (token ratio)}.
    evaluate(dataloader, use_adaptive_length=True, measure_time=False) -> {loss, ce_loss, length_cost,
    perplexity, avg_predicted_length, avg_speedup (token ratio), ...}; with ``measure_time`` also
    ``measured_time_speedup`` = wall time of full-length forwards / wall time of adaptive forwards
    on the same batches.
    """

    def __init__(self, model: AdaptiveSequenceLengthWrapper, optimizer: torch.optim.Optimizer, device=None):
        if not isinstance(model, AdaptiveSequenceLengthWrapper):
            raise TypeError(f"model: expected an AdaptiveSequenceLengthWrapper, got {type(model).__name__}")
        self.model = model
        self.optimizer = optimizer
        if device is None:
            p = next(model.parameters(), None)
            device = p.device if p is not None else "cpu"
        self.device = torch.device(device)
        self.reset_statistics()

    def reset_statistics(self) -> None:
        self._ce_sum = 0.0
        self._cost_sum = 0.0
        self._steps = 0

    def get_average_metrics(self) -> Dict[str, float]:
        n = max(1, self._steps)
        return {"avg_ce_loss": self._ce_sum / n, "avg_length_cost": self._cost_sum / n}

    def train_step(self, x: Tensor, y: Tensor, use_adaptive_length: bool = True) -> Dict[str, float]:
        self.model.train()
        x, y = x.to(self.device), y.to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        logits, info = self.model(x, use_adaptive_length=use_adaptive_length)
        total, ce, cost = self.model.compute_loss(logits, y, info)
        total.backward()
        self.optimizer.step()
        ce_v, cost_v = ce.item(), cost.item()
        self._ce_sum += ce_v
        self._cost_sum += cost_v
        self._steps += 1
        return {"total_loss": total.item(), "ce_loss": ce_v, "length_cost": cost_v,
                "avg_predicted_length": info["avg_predicted_length"], "speedup_estimate": info["speedup_estimate"]}

    @torch.no_grad()
    def evaluate(self, dataloader, use_adaptive_length: bool = True, measure_time: bool = False) -> Dict:
        was_training = self.model.training
        self.model.eval()
        self.model.reset_length_statistics()
        ce_sum, n_tok, cost_sum, n_batches = 0.0, 0, 0.0, 0
        t_adapt = t_full = 0.0
        try:
            for batch in dataloader:
                x, y = batch[0].to(self.device), batch[1].to(self.device)
                t0 = time.perf_counter()
                logits, info = self.model(x, use_adaptive_length=use_adaptive_length)
                t_adapt += time.perf_counter() - t0
                if measure_time:
                    t0 = time.perf_counter()
                    self.model(x, use_adaptive_length=False)
                    t_full += time.perf_counter() - t0
                _, ce, cost = self.model.compute_loss(logits, y, info)
                valid = int((y != self.model.ignore_index).sum())
                ce_sum += ce.item() * valid
                n_tok += valid
                cost_sum += float(cost)
                n_batches += 1
        finally:
            self.model.train(was_training)
        ce_mean = ce_sum / max(1, n_tok)
        cost_mean = cost_sum / max(1, n_batches)
        out = {"loss": ce_mean + cost_mean, "ce_loss": ce_mean, "length_cost": cost_mean,
               "perplexity": math.exp(ce_mean), "eval_tokens": n_tok}
        out.update(self.model.get_length_statistics())
        if measure_time:
            out["measured_time_speedup"] = t_full / t_adapt if t_adapt > 0 else float("nan")
            out["time_full_s"] = t_full
            out["time_adaptive_s"] = t_adapt
        return out
