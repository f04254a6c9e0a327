"""Issue 20 item 8: the design's interfaces that the models lacked.

``SparseBKCore.forward`` returns the design's two values (features, mask), the ratio as an option
and an attribute; ``AdaptiveResNetBKBlock`` has the design's ``ponder_cost`` / ``reset_ponder_cost()``."""
import copy

import torch

from resnet_bk.models import ACTLanguageModel, AdaptiveResNetBKBlock, SparseBKCore

D, NSEQ, V = 16, 32, 30


def test_sparse_core_returns_the_designs_two_values():
    torch.manual_seed(0)
    core = SparseBKCore(D, NSEQ)
    core.importance_predictor.bias.data.zero_()
    x, v = torch.randn(3, 20, D), torch.randn(3, 20)
    out = core(x, v)
    assert isinstance(out, tuple) and len(out) == 2
    features, mask = out                                   # the design's `features, mask = ...`
    assert features.shape == (3, 20, 2) and mask.shape == (3, 20)
    torch.testing.assert_close(core.last_sparsity_ratio, 1.0 - mask.mean())
    assert core.last_sparsity_ratio.requires_grad           # the mask's straight-through gradient
    copy.deepcopy(core)                                     # the kept ratio does not block deepcopy
    torch.manual_seed(1)
    f3, m3, ratio = core(x, v, return_sparsity_ratio=True)
    torch.testing.assert_close(ratio, 1.0 - m3.mean())
    assert ratio is core.last_sparsity_ratio


def test_act_block_ponder_cost_and_reset(one_thread):
    torch.manual_seed(0)
    model = ACTLanguageModel(V, D, 3, NSEQ, act_threshold=0.6, halt_bias_init=0.0, dropout_p=0.0)
    for block in model.blocks:
        assert isinstance(block, AdaptiveResNetBKBlock)
        assert float(block.ponder_cost) == 0.0
        assert not any(k.endswith("ponder_cost") for k in block.state_dict())
    x = torch.randint(0, V, (2, NSEQ))
    _, ponder = model(x)
    B, N = x.shape
    total = sum(b.ponder_cost for b in model.blocks)
    # The design's model: ponder = sum(block.ponder_cost for block in blocks) / (B * N).
    torch.testing.assert_close(total / (B * N), ponder.detach())
    assert 1.0 < float(ponder.detach()) < 3.0                        # some tokens halted before the last block
    assert float(model.blocks[0].ponder_cost) >= B * N        # every token runs block 0
    model(x)
    torch.testing.assert_close(sum(b.ponder_cost for b in model.blocks) / (B * N), 2 * ponder.detach())
    model.blocks[0].reset_ponder_cost()
    assert float(model.blocks[0].ponder_cost) == 0.0
    model.reset_ponder_cost()
    assert all(float(b.ponder_cost) == 0.0 for b in model.blocks)


def test_act_block_forward_accumulates_ponder_cost():
    torch.manual_seed(0)
    block = AdaptiveResNetBKBlock(D, NSEQ, threshold=0.6, halt_bias_init=0.0)
    x = torch.randn(2, 10, D)
    _, cumsum, running, weight = block(x)
    halted = ~running
    # 20 tokens ran; each that halted adds its remainder 1 - 0 = 1 (cumsum before was 0).
    assert float(block.ponder_cost) == 20 + int(halted.sum())
    block.reset_ponder_cost()
    assert float(block.ponder_cost) == 0.0
