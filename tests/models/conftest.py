import pytest
import torch


@pytest.fixture
def one_thread():
    """The CI machine is small and shared: one intra-op thread avoids oversubscription (used by the
    model test files that build many small models)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)
