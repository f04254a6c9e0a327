"""DistributedDataParallel with its default find_unused_parameters=False over a MoE model whose batch
leaves an expert without tokens on one rank (2 gloo processes): every expert's parameters take part
in each step's graph (zero gradient when idle), so training runs and equals one process trained on
the global batch. Worker: tests/models/_ddp_workers.py."""
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

sys.path.insert(0, os.path.dirname(__file__))
import _ddp_workers  # noqa: E402


def test_ddp_idle_expert_default_find_unused(tmp_path):
    world = 2
    mp.spawn(_ddp_workers.idle_expert_worker, args=(world, str(tmp_path / "dist_init"), str(tmp_path)),
             nprocs=world, join=True)
    worst = [torch.load(tmp_path / f"idle_{r}.pt", weights_only=True)["worst"] for r in range(world)]
    assert max(worst) <= 1e-10, worst
