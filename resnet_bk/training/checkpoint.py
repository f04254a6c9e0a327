"""Checkpoints that rebuild their model: weights plus the constructor arguments, tensors and plain
values only (loaded with ``torch.load(..., weights_only=True)``).

Format (version 1): a dict saved with ``torch.save``::

    {
      "format": "resnet_bk.checkpoint",   # marker
      "version": 1,
      "model_name": str,                   # key of resnet_bk.training.registry.MODELS
      "model_args": dict,                  # MODELS[model_name](**model_args) rebuilds the model:
                                           #   vocab_size, d_model, n_layers, n_seq, backend, and
                                           #   every extra keyword (act_threshold, ...); plain values
      "model_class": str,                  # "module.QualName" of the model (informational)
      "state_dict": dict,                  # model.state_dict() (tensors)
      "optimizer": dict | None,            # optimizer.state_dict() (for resuming)
      "scheduler": dict | None,            # LR scheduler state_dict() (for resuming)
      "step": int,                         # optimizer steps taken
      "rng": dict,                         # {"torch": CPU RNG state, "data": batch-sampler Generator
                                           #  state} (uint8 tensors; either may be absent)
      "train_args": dict,                  # the training settings (lr, steps, batch_size, seed, ...)
      "torch_version": str,
    }

Plain values are None, bool, int, float, str, and lists / tuples / dicts (str keys) of them.
``load_model(path)`` rebuilds the model from the registry factory and loads the weights strictly
(every parameter and persistent buffer must match), so a checkpoint alone gives back the model; a
model added with ``register_model`` must be registered again (same name, same factory) in the
process that loads it. Models whose extra state is in their ``state_dict`` (e.g. customised
learned-length bins, which the predictor adopts on load) come back with it.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from .registry import MODELS

__all__ = ["FORMAT", "VERSION", "save_checkpoint", "load_checkpoint", "load_model", "check_plain"]

FORMAT = "resnet_bk.checkpoint"
VERSION = 1
_REQUIRED = ("format", "version", "model_name", "model_args", "state_dict", "step")


def check_plain(name: str, value: Any) -> None:
    """Raise a TypeError naming the first entry of ``value`` (under ``name``) that is not a plain
    value (None, bool, int, float, str, or a list / tuple / str-keyed dict of plain values)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_plain(f"{name}[{i}]", v)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{name}: expected str keys, got {k!r}")
            check_plain(f"{name}[{k!r}]", v)
        return
    raise TypeError(f"{name}: expected a plain value (None, bool, int, float, str, list, tuple, dict) so that "
                    f"the checkpoint loads with weights_only=True, got {type(value).__name__}")


def save_checkpoint(path: str, model: nn.Module, *, model_name: str, model_args: Dict[str, Any],
                    optimizer: Optional[torch.optim.Optimizer] = None, scheduler=None, step: int = 0,
                    rng: Optional[Dict[str, torch.Tensor]] = None, train_args: Optional[Dict[str, Any]] = None) -> None:
    """Write ``model`` (built as ``MODELS[model_name](**model_args)``) and the optional training
    state to ``path`` in the format above (atomically: a temporary file then a rename)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(model_name, str) or model_name not in MODELS:
        raise ValueError(f"model_name: expected one of {sorted(MODELS)}, got {model_name!r}")
    if not isinstance(model_args, dict):
        raise TypeError(f"model_args: expected a dict of constructor arguments, got {type(model_args).__name__}")
    check_plain("model_args", model_args)
    check_plain("train_args", train_args or {})
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step: expected an int >= 0, got {step!r}")
    rng = dict(rng or {})
    for k, v in rng.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"rng[{k!r}]: expected a tensor (an RNG state), got {type(v).__name__}")
    ckpt = {
        "format": FORMAT, "version": VERSION, "model_name": model_name, "model_args": dict(model_args),
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "step": step, "rng": rng, "train_args": dict(train_args or {}), "torch_version": str(torch.__version__),
    }
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, map_location: Any = "cpu") -> Dict[str, Any]:
    """The checkpoint dict at ``path`` (``torch.load(..., weights_only=True)``), checked to be in
    this format; raises ValueError saying what is wrong otherwise."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"path: {str(path)!r} is not a resnet_bk checkpoint (expected a dict with "
                         f"format={FORMAT!r}, got {type(ckpt).__name__}"
                         f"{' with format=' + repr(ckpt.get('format')) if isinstance(ckpt, dict) else ''})")
    if ckpt.get("version") != VERSION:
        raise ValueError(f"path: checkpoint format version {ckpt.get('version')!r} is not supported "
                         f"(this resnet_bk reads version {VERSION})")
    missing = [k for k in _REQUIRED if k not in ckpt]
    if missing:
        raise ValueError(f"path: checkpoint {str(path)!r} lacks {missing}")
    return ckpt


def build_model(ckpt: Dict[str, Any], **overrides) -> nn.Module:
    """The model of a loaded checkpoint dict: ``MODELS[model_name](**{**model_args, **overrides})``
    with its weights loaded strictly."""
    name = ckpt["model_name"]
    if name not in MODELS:
        raise ValueError(f"model_name: the checkpoint's model {name!r} is not in MODELS {sorted(MODELS)}; "
                         "register its factory with resnet_bk.training.registry.register_model first")
    args = {**ckpt["model_args"], **overrides}
    model = MODELS[name](**args)
    model.load_state_dict(ckpt["state_dict"], strict=True)
    return model


def load_model(path: str, map_location: Any = "cpu", **overrides) -> nn.Module:
    """Rebuild the model saved at ``path`` (see the module doc) on ``map_location``.

    ``overrides`` replace constructor arguments that do not change the weights' shapes, e.g.
    ``backend=None`` to let the BK-Core choose a backend on another machine."""
    model = build_model(load_checkpoint(path, map_location), **overrides)
    if map_location is not None and not callable(map_location) and not isinstance(map_location, dict):
        model = model.to(map_location)
    return model
