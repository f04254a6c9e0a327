"""Worker processes of tests/ops/bk_core/test_distributed.py (a module of its own so that torch.multiprocessing's
spawn can import it by name). Every worker asserts; a failure in any rank fails the spawn."""
import os

import torch

from helpers import rel_err, train_sgd as _train
import torch.distributed as dist
import torch.nn as nn

from resnet_bk import ops
from resnet_bk.distributed import bk_core_sequence_parallel


def _init(rank, world, init_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)




# ---------------------------------------------------------------------------------------------
# sequence parallelism

def _global_problem(lead, N, shared, symmetric, seed):
    g = torch.Generator().manual_seed(seed)
    a = -2.0 + 3.0 * (2 * torch.rand(lead + (N,), generator=g, dtype=torch.float64) - 1)
    shape = (N - 1,) if shared else lead + (N - 1,)
    b = 0.5 + torch.rand(shape, generator=g, dtype=torch.float64)
    c = b.clone() if symmetric else 0.5 + torch.rand(shape, generator=g, dtype=torch.float64)
    gout = torch.randn(lead + (N,), generator=g, dtype=torch.complex128)
    return a, b, c, gout


def _sp_case(rank, world, lengths, lead, shared, symmetric, causal, z, dtype, backend, tol, seed, ztensor=True):
    assert len(lengths) == world
    N = sum(lengths)
    a, b, c, gout = _global_problem(lead, N, shared, symmetric, seed)
    a, b, c = a.to(dtype), b.to(dtype), c.to(dtype)
    cdt = torch.complex128 if dtype == torch.float64 else torch.complex64
    # single-process result of the whole sequence (float64, reference of the answer)
    zref = torch.tensor(z, dtype=torch.complex128, requires_grad=True)
    leaves = [a.double().requires_grad_(), b.double().requires_grad_(), c.double().requires_grad_()]
    ref = ops.bk_core(*leaves, zref, causal=causal, backend=backend)
    ref_grads = torch.autograd.grad(ref, leaves + [zref], gout)
    s = sum(lengths[:rank])
    n = lengths[rank]
    mlen = n - 1 if rank == world - 1 else n
    a_r = a[..., s:s + n].clone().requires_grad_()
    b_r = b[..., s:s + mlen].clone().requires_grad_()
    c_r = c[..., s:s + mlen].clone().requires_grad_()
    z_r = torch.tensor(z, dtype=cdt, requires_grad=True) if ztensor else z
    out = bk_core_sequence_parallel(a_r, b_r, c_r, z_r, causal=causal, backend=backend)
    assert out.shape == lead + (n,) and out.dtype == cdt
    err = rel_err(out, ref[..., s:s + n])
    assert err < tol, (rank, "forward", err)
    grads = torch.autograd.grad(out, [a_r, b_r, c_r] + ([z_r] if ztensor else []), gout[..., s:s + n].to(cdt))
    for name, gx, gy in (("diag", grads[0], ref_grads[0][..., s:s + n]),
                         ("super", grads[1], ref_grads[1][..., s:s + mlen]),
                         ("sub", grads[2], ref_grads[2][..., s:s + mlen])):
        if gy.numel():
            # a shared off-diagonal's gradient is a sum over rows: compare against the global slice
            e = rel_err(gx, gy)
            assert e < tol, (rank, name, e)
    if ztensor:
        gz = grads[3].to(torch.complex128).clone()
        dist.all_reduce(gz)  # z's gradient is split over the ranks: the sum is the total
        e = rel_err(gz, ref_grads[3])
        assert e < tol, (rank, "z", e)


def sp_worker(rank, world, init_file, big):
    _init(rank, world, init_file)
    try:
        backends = ["cpp", "reference"] if "cpp" in ops.available_backends() else ["reference"]
        if world == 2:
            lengths_list = [[7, 9], [1, 12]]
        else:
            lengths_list = [[5, 17, 1, 9], [8, 8, 8, 8]]
        seed = 0
        for lengths in lengths_list:
            for causal in (False, True):
                for backend in backends:
                    seed += 1
                    _sp_case(rank, world, lengths, (2, 3), False, False, causal, 0.3 + 0.8j, torch.float64,
                             backend, 1e-10, seed)
                    _sp_case(rank, world, lengths, (3,), True, True, causal, -0.5 + 0.05j, torch.float64,
                             backend, 1e-10, seed)
        # float32 against the float64 single-process answer, and one long chunk per rank
        for causal in (False, True):
            _sp_case(rank, world, [big] * world, (2,), True, True, causal, 1j, torch.float32, backends[0], 1e-5, 99)
            _sp_case(rank, world, [big] * world, (1,), False, True, causal, 0.1 + 0.01j, torch.float64,
                     backends[0], 1e-10, 98)
        # a real z (Python number, off the spectrum): the real ghost branch
        for causal in (False, True):
            _sp_case(rank, world, [6] * world, (2,), False, True, causal, 9.0 + 0j, torch.float64, backends[0], 1e-10,
                     7, ztensor=False)
        # a tensor z with Im z = 0 that requires grad: a clear error on every rank (documented limitation)
        try:
            m = 4 if rank == world - 1 else 5
            bk_core_sequence_parallel(torch.zeros(2, 5, dtype=torch.float64), torch.ones(m, dtype=torch.float64),
                                      torch.ones(m, dtype=torch.float64),
                                      torch.tensor(2.0 + 0j, dtype=torch.complex128, requires_grad=True))
        except ValueError as e:
            assert "Im z = 0" in str(e)
        else:
            raise AssertionError("a real tensor z requiring grad was accepted")
        # bad input names the argument and the rank
        a = torch.zeros(2, 5, dtype=torch.float64)
        wrong = torch.ones(2, 5 if rank == world - 1 else 4, dtype=torch.float64)
        try:
            bk_core_sequence_parallel(a, wrong, wrong, 1j)
        except ValueError as e:
            assert "super_chunk" in str(e) and f"rank {rank}" in str(e), str(e)
        else:
            raise AssertionError("a wrong off-diagonal chunk length was accepted")
        dist.barrier()
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# data parallelism: DistributedDataParallel == single process on the same global batch

def _model(vocab, N):
    """resnet_bk.models.base.LanguageModel (ResNet-BK blocks: MoE FFN + causal BK-Core with a learnable
    Im z). Dropout off and no MoE balancing loss: both depend on the batch split, which is exactly
    what must not change the result here (per-token top-1 routing does not)."""
    from resnet_bk.models.base import LanguageModel
    return LanguageModel(vocab, d_model=16, n_layers=2, n_seq=N, num_experts=2, top_k=1, dropout_p=0.0,
                         learnable_z=True, moe_aux_weight=0.0).double()


def ddp_worker(rank, world, init_file, result_dir):
    _init(rank, world, init_file)
    try:
        torch.manual_seed(0)
        B, N, vocab, steps = 4 * world, 16, 13, 3
        g = torch.Generator().manual_seed(123)
        tokens = torch.randint(0, vocab, (B, N), generator=g)
        targets = torch.randint(0, vocab, (B, N), generator=g)
        single = _model(vocab, N)
        local = _model(vocab, N)
        local.load_state_dict(single.state_dict())
        init = {k: v.clone() for k, v in single.state_dict().items()}
        _train(single, tokens, targets, steps)  # the whole global batch in one process
        ddp = nn.parallel.DistributedDataParallel(local)
        per = B // world
        _train(ddp, tokens[rank * per:(rank + 1) * per], targets[rank * per:(rank + 1) * per], steps)
        worst = 0.0
        for (name, p1), (_, p2) in zip(single.named_parameters(), local.named_parameters()):
            worst = max(worst, (p1 - p2).abs().max().item())
            assert torch.allclose(p1, p2, rtol=0, atol=1e-10), (rank, name, (p1 - p2).abs().max().item())
        moved = max((p - init[name]).abs().max().item() for name, p in single.named_parameters())
        assert moved > 1e-3  # training did change the parameters
        torch.save({"worst": worst}, os.path.join(result_dir, f"ddp_{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
