import os

import pytest
import torch

torch.manual_seed(0)

# Triton's interpreter is chosen when triton is first imported (resnet_bk.ops imports it, and
# triton's own tl.zeros / tl.sum are @triton.jit functions decorated then): without a GPU, set it
# before anything imports resnet_bk, so tests/kernels/test_triton.py can run the kernels on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# The slow lane: `pytest -m "not slow"` skips these (the whole suite, CI's run, includes them).
# node-id substrings, each with why it is slow on 2 cores
SLOW = {
    "test_compile_fullgraph_matches_eager": "torch.compile of a model step (Inductor codegen)",
    "test_gradients_float32[causal-": "causal gradients by finite differences over many positions",
    "test_forward_n4097_vs_dense": "dense inverse at N = 4097",
    "-128-causal-": "causal dense oracle: one inverse per leading block, O(N^4)",
    "test_sequence_parallel_equals_single_process": "spawns gloo process groups",
    "test_ddp_equals_single_process": "spawns gloo process groups",
    "test_ddp_idle_expert_default_find_unused": "spawns gloo process groups",
    "test_bench_compile_smoke": "Inductor compiles a model's training step",
    "test_compile_new_shapes_go_dynamic_not_one_graph_each": "traces a model three times, twice with symbolic shapes",
    "test_fullgraph_inductor_train_step_equals_eager": "Inductor compiles a model's forward and backward",
    "test_fullgraph_compiled_train_step_equals_eager[2]": "traces a model's forward and backward (top-2)",
    "test_fullgraph_compiled_train_step_float64": "traces a model's forward and backward (float64)",
    "test_act_and_length_wrapper_compile_without_recompiling_per_call": "torch.compile of ACT and the length wrapper, 5 batches each",
    "test_cuda_sources_compile": "nvcc compiles every CUDA source",
    "test_kernels_compile_for_gpu": "the Triton compiler lowers every kernel",
    "test_peak_memory_is_linear_in_n": "fresh processes at large N",
    "perrow-64-causal": "causal dense autograd oracle",
    "test_large_outputs_are_advised": "64 MiB outputs, fresh processes",
    "test_off_by_default_and_small_outputs_not_advised": "64 MiB outputs, fresh processes",
    "test_step.py::test_compile_fullgraph[triton]": "torch.compile through the Triton interpreter",
    "test_step.py::test_compile_fullgraph[reference]": "torch.compile of the reference step (cpp is the fast lane's)",
    "test_step.py::test_gradcheck[shared-triton]": "finite differences through the Triton interpreter",
    "test_step.py::test_gradgradcheck[triton]": "second-order finite differences through the Triton interpreter",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(key in item.nodeid for key in SLOW):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    monkeypatch.delenv("RESNET_BK_BACKEND", raising=False)
    monkeypatch.delenv("RESNET_BK_VERIFY", raising=False)
    yield
