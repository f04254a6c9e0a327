"""``AdaptiveSparsityScheduler``: the sparsity schedule of ``resnet_bk.models.SparseMoEResNetBKLayer``
(moved from ``resnet_bk.models.sparse``, where the name is still re-exported)."""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch.nn as nn

from ..models.sparse import SparseMoEResNetBKLayer

__all__ = ["AdaptiveSparsityScheduler"]


class AdaptiveSparsityScheduler:
    """Ramp the target sparsity and the sparsity-loss weight over ``warmup_steps``.

    ``step(current_accuracy=None)`` advances one step and returns {sparsity_target, loss_weight,
    progress, step}. With ``accuracy_threshold`` set, a step whose ``current_accuracy`` is below
    the threshold does not advance the ramp (sparsity is not raised while accuracy suffers).
    ``apply_to(model)`` writes the current values into every ``SparseMoEResNetBKLayer``.
    """

    SCHEDULES = ("cosine", "linear", "step")

    def __init__(self, initial_sparsity: float = 0.2, final_sparsity: float = 0.5, initial_weight: float = 0.001,
                 final_weight: float = 0.01, warmup_steps: int = 1000, schedule_type: str = "cosine",
                 accuracy_threshold: Optional[float] = None):
        if schedule_type not in self.SCHEDULES:
            raise ValueError(f"schedule_type: expected one of {self.SCHEDULES}, got {schedule_type!r}")
        if not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"warmup_steps: expected an int >= 1, got {warmup_steps!r}")
        for name, val in (("initial_sparsity", initial_sparsity), ("final_sparsity", final_sparsity)):
            if not 0.0 <= float(val) < 1.0:
                raise ValueError(f"{name}: expected a fraction in [0, 1), got {val!r}")
        self.initial_sparsity = float(initial_sparsity)
        self.final_sparsity = float(final_sparsity)
        self.initial_weight = float(initial_weight)
        self.final_weight = float(final_weight)
        self.warmup_steps = warmup_steps
        self.schedule_type = schedule_type
        self.accuracy_threshold = accuracy_threshold
        self.reset()

    def reset(self) -> None:
        self.current_step = 0      # calls to step()
        self.ramp_step = 0         # steps that advanced the ramp
        self.current = self._values()

    def _shape(self, p: float) -> float:
        if self.schedule_type == "linear":
            return p
        if self.schedule_type == "cosine":
            return 0.5 * (1.0 - math.cos(math.pi * p))
        return math.floor(p * 4.0) / 4.0  # 'step': four equal stages

    def _values(self) -> Dict[str, float]:
        p = min(1.0, self.ramp_step / self.warmup_steps)
        s = self._shape(p)
        return {"sparsity_target": self.initial_sparsity + s * (self.final_sparsity - self.initial_sparsity),
                "loss_weight": self.initial_weight + s * (self.final_weight - self.initial_weight),
                "progress": p, "step": self.current_step}

    def step(self, current_accuracy: Optional[float] = None) -> Dict[str, float]:
        self.current_step += 1
        hold = (self.accuracy_threshold is not None and current_accuracy is not None
                and float(current_accuracy) < self.accuracy_threshold)
        if not hold:
            self.ramp_step += 1
        self.current = self._values()
        return dict(self.current)

    def apply_to(self, model: nn.Module) -> int:
        """Set target sparsity and loss weight on every SparseMoEResNetBKLayer; returns how many."""
        n = 0
        for m in model.modules():
            if isinstance(m, SparseMoEResNetBKLayer):
                m.target_sparsity = self.current["sparsity_target"]
                m.sparsity_loss_weight = self.current["loss_weight"]
                n += 1
        return n
