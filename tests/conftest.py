import os

import pytest
import torch

torch.manual_seed(0)

# Triton's interpreter is chosen when triton is first imported (resnet_bk.ops imports it, and
# triton's own tl.zeros / tl.sum are @triton.jit functions decorated then): without a GPU, set it
# before anything imports resnet_bk, so tests/test_triton.py can run the kernels on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
    from resnet_bk import ops
    return [b for b in ("reference", "cpp") if b in ops.available_backends()]


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    monkeypatch.delenv("RESNET_BK_BACKEND", raising=False)
    monkeypatch.delenv("RESNET_BK_VERIFY", raising=False)
    yield
