"""Worker of tests/models/test_ddp_idle_expert.py (a module of its own so that torch.multiprocessing's
spawn can import it by name). Every worker asserts; a failure in any rank fails the spawn."""
import datetime
import os

import torch
import torch.distributed as dist
import torch.nn as nn

from resnet_bk.models.base import LanguageModel

from helpers import train_sgd as _train

VOCAB, N = 13, 4


def _model():
    torch.manual_seed(0)
    return LanguageModel(VOCAB, d_model=8, n_layers=1, n_seq=N, num_experts=2, top_k=1, dropout_p=0.0,
                         moe_aux_weight=0.0).double()


def _routes(model, tokens):
    """Expert chosen by the (first and only) MoE layer for each token of ``tokens`` (B, N)."""
    moe = model.blocks[0].bk_layer.moe_ffn
    seen = []
    hook = moe.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        model(tokens)
    hook.remove()
    x = seen[0].reshape(-1, moe.d_model)
    return moe._router_logits_t(x).argmax(dim=0).reshape(tokens.shape)


def _expert_of_each_token(model):
    """(VOCAB, N) expert chosen for token v at position p (the model as built)."""
    return _routes(model, torch.arange(VOCAB).unsqueeze(1).expand(VOCAB, N).contiguous())


def batches(world, per):
    """Per-rank token batches from the model as built: rank 0 random tokens (both experts get some),
    every other rank only tokens that the router sends to expert 0 (expert 1 gets none there)."""
    ex = _expert_of_each_token(_model())
    g = torch.Generator().manual_seed(5)
    out = [torch.randint(0, VOCAB, (per, N), generator=g)]
    for _ in range(1, world):
        rows = []
        for _ in range(per):
            row = []
            for p in range(N):
                ok = (ex[:, p] == 0).nonzero().flatten()
                row.append(ok[torch.randint(0, len(ok), (1,), generator=g)].item())
            rows.append(row)
        out.append(torch.tensor(rows))
    targets = torch.randint(0, VOCAB, (world * per, N), generator=g)
    return out, targets


def idle_expert_worker(rank, world, init_file, result_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        per, steps = 3, 3
        toks, targets = batches(world, per)
        single, local = _model(), _model()
        _train(single, torch.cat(toks), targets, steps)  # the whole global batch in one process
        # the precondition: on this rank's first step, expert 1 gets no token on every rank but 0
        first = [_routes(local, toks[rank]).flatten()]
        used = set(first[0].tolist())
        assert used == ({0, 1} if rank == 0 else {0}), (rank, used)
        ddp = nn.parallel.DistributedDataParallel(local)  # the default find_unused_parameters=False
        _train(ddp, toks[rank], targets[rank * per:(rank + 1) * per], steps)
        worst = 0.0
        for (name, p1), (_, p2) in zip(single.named_parameters(), local.named_parameters()):
            worst = max(worst, (p1 - p2).abs().max().item())
        torch.save({"worst": worst}, os.path.join(result_dir, f"idle_{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
