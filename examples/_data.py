"""Data shared by the example scripts (run as ``python examples/<script>.py``: this folder is then on
``sys.path``)."""
import torch


def text_batches(n: int, batch_size: int, n_seq: int, seed: int):
    """n (x, y) batches of byte windows of CPython's documentation topics (no download)."""
    from pydoc_data.topics import topics
    data = torch.tensor(list("\n".join(topics[k] for k in sorted(topics))[:200_000].encode()), dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        s = torch.randint(0, data.numel() - n_seq - 1, (batch_size,), generator=g)
        w = data[s[:, None] + torch.arange(n_seq + 1)]
        out.append((w[:, :-1], w[:, 1:]))
    return out
