"""Out of memory inside attention: an error naming the layer, node, shape and allocation; the memory
of the failed call released once the error is handled; the next request runs correctly."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import attnzoo
from attnzoo.stack import CallContext, layers
from attnzoo.stack.oom import AttentionOutOfMemoryError

from .conftest import make_qkv

SPARSE = {"name": "s", "default": {"selector": {"name": "streaming", "sink": 64, "local": 256, "block_size": 64},
                                   "op": "block_sparse"}}


@pytest.mark.parametrize("message,needed", [
    ("CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has a total capacity of 79.1 GiB", "2.50 GiB"),
    ("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate "
     "4294967296 bytes. Error code 12 (Cannot allocate memory)", "4.00 GiB"),
])
def test_out_of_memory_names_layer_node_shape_and_size(monkeypatch, message, needed):
    stack = attnzoo.build(SPARSE)
    held = []

    def failing_run(node, q, k, v, ctx):
        big = torch.empty(1 << 20)  # what a failed call holds when the allocator gives up
        held.append(weakref.ref(big))
        raise (torch.OutOfMemoryError if "CUDA" in message else RuntimeError)(message)

    q, k, v = make_qkv(2, 4, 2, 500, 500, 32)
    monkeypatch.setattr(layers, "run", failing_run)
    with pytest.raises(AttentionOutOfMemoryError) as info:
        stack(7, q, k, v, CallContext(layer_idx=7))
    text = str(info.value)
    assert "layer 7 (streaming->block_sparse)" in text and "500 queries x 500 keys" in text
    assert "batch 2, 4/2 heads, head dim 32, float32" in text and f"needed {needed} more" in text
    assert isinstance(info.value, torch.OutOfMemoryError)  # handlers of torch's error still catch it
    assert info.value.__context__ is None  # the failed call's frames are not kept alive
    del info
    gc.collect()
    assert held[0]() is None, "the failed call's tensors outlived the error"
    monkeypatch.undo()
    out = stack(7, q, k, v, CallContext(layer_idx=7))  # the next request runs
    assert out.shape == q.shape and torch.isfinite(out).all()


def test_other_runtime_errors_pass_through(monkeypatch):
    stack = attnzoo.build(SPARSE)
    monkeypatch.setattr(layers, "run", lambda *a: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    q, k, v = make_qkv(1, 2, 2, 100, 100, 16)
    with pytest.raises(RuntimeError, match="^shape mismatch$"):
        stack(0, q, k, v, CallContext(layer_idx=0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_prefill_that_cannot_fit():
    """A GPU capped a few MiB above what the inputs take: the prefill fails with the named error,
    allocated memory is back to its level before the call, and (the cap lifted) the next request
    gives the same output as before."""
    dev = torch.device("cuda", torch.cuda.current_device())  # the memory-fraction call wants an index
    stack = attnzoo.build(SPARSE)
    q, k, v = (t.to(dev, torch.bfloat16) for t in make_qkv(1, 8, 2, 16384, 16384, 64, seed=3))
    small = [t[:, :, :2048].contiguous() for t in (q, k, v)]
    expected = stack(0, *small, CallContext(layer_idx=0))
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(dev)
    total = torch.cuda.get_device_properties(dev).total_memory
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved(dev) + (8 << 20)) / total, dev)
    try:
        with pytest.raises(AttentionOutOfMemoryError, match=r"layer 0 \(streaming->block_sparse\).*16384 queries x "
                                                            r"16384 keys.*needed [\d.]+ [KMG]iB more"):
            stack(0, q, k, v, CallContext(layer_idx=0))
        gc.collect()
        attnzoo.clear_caches()  # per-shape caches may hold the 16K shape's small tensors (1.5 KiB on an H100)
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated(dev) - before <= 4096, "the failed call's memory was not freed"
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, dev)
    again = stack(0, *small, CallContext(layer_idx=0))
    assert torch.equal(again, expected)
