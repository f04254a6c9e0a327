"""``ACTTrainer``: the training loop of ``resnet_bk.models.ACTLanguageModel`` (moved from
``resnet_bk.models.act``, where the name is still re-exported)."""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor

from ..models.act import ACTLanguageModel

__all__ = ["ACTTrainer"]


class ACTTrainer:
    """train_step(x, y) -> {total_loss, ce_loss, ponder_cost, avg_layers_executed} (floats).

    Clips the gradient norm to ``grad_clip`` (None disables). ``get_average_metrics()`` averages
    over the steps since the last ``reset_statistics()``.
    """

    def __init__(self, model: ACTLanguageModel, optimizer: torch.optim.Optimizer,
                 device: Optional[torch.device] = None, grad_clip: Optional[float] = 0.5):
        if not isinstance(model, ACTLanguageModel):
            raise TypeError(f"model: expected an ACTLanguageModel, got {type(model).__name__}")
        self.model = model
        self.optimizer = optimizer
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.grad_clip = grad_clip
        self.reset_statistics()

    def reset_statistics(self) -> None:
        self._sums = {"total_loss": 0.0, "ce_loss": 0.0, "ponder_cost": 0.0, "avg_layers_executed": 0.0}
        self._steps = 0

    def train_step(self, x: Tensor, y: Tensor) -> Dict[str, float]:
        self.model.train()
        x, y = x.to(self.device), y.to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        logits, ponder = self.model(x, return_ponder_cost=True)
        total, ce, ponder = self.model.compute_loss(logits, y, ponder)
        total.backward()
        total = total.detach()
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        m = {"total_loss": total.item(), "ce_loss": ce.detach().item(), "ponder_cost": ponder.detach().item(),
             "avg_layers_executed": self.model.get_avg_layers_executed()}
        for k, v in m.items():
            self._sums[k] += v
        self._steps += 1
        return m

    def get_average_metrics(self) -> Dict[str, float]:
        n = max(self._steps, 1)
        return {"avg_ponder_cost": self._sums["ponder_cost"] / n, "avg_ce_loss": self._sums["ce_loss"] / n,
                "avg_total_loss": self._sums["total_loss"] / n,
                "avg_layers_executed": self._sums["avg_layers_executed"] / n, "steps": self._steps}
