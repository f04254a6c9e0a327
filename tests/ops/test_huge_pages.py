"""With the huge-page advice on (RESNET_BK_HUGEPAGE=1 or ops.cpu_huge_pages(True); off by
default), large fresh outputs of the CPU ops are advised to use transparent huge pages
(MADV_HUGEPAGE) before the kernel first writes them, so a fresh 32 MiB output does not pay 8192
page faults; small ones are left alone, and nothing is advised by default. Checked in the kernel's own record of the
advice: the "hg" flag of the memory area in /proc/self/smaps (set by the advice itself, whatever
the system's THP mode)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from resnet_bk import ops
from resnet_bk.ops.pooling import compiled as pooling_compiled

pytestmark = [
    pytest.mark.skipif("cpp" not in ops.available_backends() or not pooling_compiled.HAS_POOL_OPS,
                       reason="compiled extension not built"),
    pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc/self/smaps"),
]

HUGE = 2 << 20

_PROBE = textwrap.dedent('''
    import sys, torch
    from resnet_bk import ops

    def advised(t):
        """Whether any memory area overlapping t's bytes carries the huge-page advice ("hg")."""
        start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        hit, seen = False, False
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                head = line.split()[0]
                if "-" in head and not head.endswith(":"):
                    lo, hi = (int(x, 16) for x in head.split("-"))
                    inside = lo < end and start < hi
                    seen = seen or inside
                elif inside and line.startswith("VmFlags:"):
                    hit = hit or "hg" in line.split()[1:]
        assert seen, "no memory area holds %x" % start
        return hit

    B, N = int(sys.argv[1]), int(sys.argv[2])
    if sys.argv[3] == "on":
        assert ops.cpu_huge_pages(True) is False      # the previous setting: off by default
        assert ops.cpu_huge_pages() is True
    a = torch.randn(B, N).requires_grad_()
    h = torch.ones(N - 1)
    y = ops.bk_core(a, h, h, 1j)
    (ga,) = torch.autograd.grad(y, (a,), torch.randn(B, N, dtype=torch.complex64))
    x = torch.randn(2, N, 64, requires_grad=True)
    logits = torch.zeros(N // 2, 2, requires_grad=True)
    p = ops.learned_downsample(x, logits)
    (gx,) = torch.autograd.grad(p, (x,), torch.randn_like(p))
    for name, t in (("bk_core out", y), ("bk_core grad_a", ga), ("downsample out", p), ("downsample grad_x", gx)):
        print(name, t.numel() * t.element_size(), advised(t))
''')


def _probe(B, N, switch="keep", env=None, **extra):
    res = subprocess.run([sys.executable, "-c", _PROBE, str(B), str(N), switch], capture_output=True, text=True,
                         env={**(os.environ if env is None else env), **extra}, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = {}
    for line in res.stdout.splitlines():
        *name, nbytes, hg = line.split()
        out[" ".join(name)] = (int(nbytes), hg == "True")
    return out


@pytest.mark.parametrize("how", ["env", "switch"])
def test_large_outputs_are_advised(how):
    # bk_core out 8 MiB, grad_a 4 MiB; downsample out 16 MiB, grad_x 32 MiB
    got = _probe(16, 65536, RESNET_BK_HUGEPAGE="1") if how == "env" else _probe(16, 65536, switch="on")
    for name, (nbytes, hg) in got.items():
        assert hg == (nbytes >= 4 * HUGE), (name, nbytes, hg, got)
    assert any(hg for _, hg in got.values()) and not all(hg for _, hg in got.values()), got


def test_off_by_default_and_small_outputs_not_advised():
    env = {k: v for k, v in os.environ.items() if k != "RESNET_BK_HUGEPAGE"}
    got = _probe(16, 65536, env=env)
    assert not any(hg for _, hg in got.values()), got
    got = _probe(4, 4096, RESNET_BK_HUGEPAGE="1")      # every output below 8 MiB
    assert not any(hg for _, hg in got.values()), got


def test_cpu_huge_pages_switch():
    prev = ops.cpu_huge_pages()
    try:
        assert ops.cpu_huge_pages(not prev) is prev
        assert ops.cpu_huge_pages() is (not prev)
    finally:
        ops.cpu_huge_pages(prev)
    assert ops.cpu_huge_pages() is prev
    with pytest.raises(TypeError, match="enabled: expected a bool"):
        ops.cpu_huge_pages(1)
