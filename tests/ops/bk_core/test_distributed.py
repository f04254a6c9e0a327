"""torch.distributed (gloo on CPU): data parallelism (DistributedDataParallel over a ResNet-BK model
equals the single-process run on the same global batch) and sequence parallelism
(resnet_bk.distributed.bk_core_sequence_parallel equals the single-process bk_core, forward and
backward, with 2 and 4 processes, uneven chunks, chunks of one position, shared and per-row
off-diagonals, two-sided and causal, every CPU backend). Workers: tests/ops/bk_core/_dist_workers.py."""
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

sys.path.insert(0, os.path.dirname(__file__))
import _dist_workers  # noqa: E402


def _spawn(fn, world, tmp_path, *args):
    init_file = tmp_path / "dist_init"
    mp.spawn(fn, args=(world, str(init_file)) + args, nprocs=world, join=True)


def test_ddp_equals_single_process(tmp_path):
    _spawn(_dist_workers.ddp_worker, 2, tmp_path, str(tmp_path))
    worst = [torch.load(tmp_path / f"ddp_{r}.pt")["worst"] for r in range(2)]
    assert max(worst) <= 1e-10


@pytest.mark.parametrize("world", [2, 4])
def test_sequence_parallel_equals_single_process(world, tmp_path):
    _spawn(_dist_workers.sp_worker, world, tmp_path, 300 if world == 2 else 150)


def test_sequence_parallel_needs_an_initialised_group():
    from resnet_bk.distributed import bk_core_sequence_parallel
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        bk_core_sequence_parallel(torch.zeros(2, 4), torch.ones(4), torch.ones(4), 1j)
