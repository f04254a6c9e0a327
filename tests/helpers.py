"""Shared test helpers: the relative error every test measures, the tolerance policy (taken from
the op layer, ``resnet_bk.ops.tolerance``), and the dense float64 oracle of BK-Core.

Import as ``from helpers import ...`` (tests/ is on sys.path through tests/conftest.py)."""
from __future__ import annotations

import torch

from resnet_bk import ops


def rel_err(got: torch.Tensor, ref: torch.Tensor, *, finite: bool = False) -> float:
    """max |got - ref| / max |ref| (0 for empty tensors, the absolute error for an all-zero ref), computed in float64 / complex128 (on the CPU). With ``finite``
    a non-finite value in ``got`` fails first (an unwritten or poisoned output)."""
    got, ref = got.detach().cpu(), ref.detach().cpu()
    wide = torch.complex128 if (got.is_complex() or ref.is_complex()) else torch.float64
    got, ref = got.to(wide), ref.to(wide)
    if finite:
        assert torch.isfinite(torch.view_as_real(got) if got.is_complex() else got).all(), \
            "non-finite (unwritten or poisoned) output"
    if ref.numel() == 0:
        return 0.0
    scale = ref.abs().max().item()
    if scale == 0.0:  # an all-zero reference: the absolute error
        return got.abs().max().item()
    return ((got - ref).abs().max() / scale).item()


def tol(dtype: torch.dtype, factor: float = 1.0) -> float:
    """The op layer's tolerance for ``dtype`` (float64 1e-10, float32 1e-5, 16-bit: one rounding),
    times ``factor`` where a test compares through more arithmetic than one op (say why there)."""
    return factor * ops.tolerance(dtype)


def dense_oracle(a, b, c, z, causal=False):
    """float64/complex128 oracle: diagonal of the dense inverse (leading blocks for causal)."""
    N = a.shape[-1]
    c128 = torch.complex128
    H = torch.diag_embed(a.to(c128))
    if N > 1:
        H = H + torch.diag_embed(b.to(c128).expand(a.shape[:-1] + (N - 1,)), 1) \
              + torch.diag_embed(c.to(c128).expand(a.shape[:-1] + (N - 1,)), -1)
    zt = z if isinstance(z, torch.Tensor) else torch.tensor(z, dtype=c128)
    T = H - zt.to(c128) * torch.eye(N, dtype=c128)
    if not causal:
        return _inv(T).diagonal(dim1=-2, dim2=-1)
    return torch.stack([_inv(T[..., : i + 1, : i + 1])[..., i, i] for i in range(N)], -1)


def _inv(T):
    """torch.linalg.inv one matrix at a time.

    A batched inverse runs MKL's LU inside at::parallel_for. Once any test has called
    torch.set_num_threads (which also turns MKL's dynamic threading off), the nested complex LU can
    spin for ever or fail with "Parameter 6 was incorrect on entry to ZLASWP". This was seen with
    torch 2.13.0+cpu on a 2-core AMD EPYC. One matrix per call is never nested."""
    flat = T.reshape(-1, *T.shape[-2:])
    return torch.stack([torch.linalg.inv(m) for m in flat.unbind(0)]).reshape(T.shape)


def cpu_backends():
    return [b for b in ("reference", "cpp") if b in ops.available_backends()]


def train_sgd(model, tokens, targets, steps: int, lr: float = 0.5) -> None:
    """``steps`` plain SGD steps of next-token cross-entropy on one batch (the DDP workers train a
    model this way in one process and under DDP, and compare the weights)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        logits = model(tokens)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        opt.step()
