"""Under serving load: bounded per-shape caches, flat memory over many prompt lengths, and one
model patched by two threads with different stacks at once."""

from __future__ import annotations

import gc
import threading
import warnings

import pytest
import torch

import attnzoo
from attnzoo.caches import cache_info, clear_caches
from attnzoo.config import load_config, preset_spec, without_dense_below
from attnzoo.stack import DensityMeter

from .conftest import small_llama

DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda",
                        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def _preset(name):
    return without_dense_below(load_config(preset_spec(name)))  # sparse at every length, on a GPU too


def _tensor_bytes(exclude=()) -> int:
    """Bytes of every live tensor's storage (each storage once, those of ``exclude`` left out)."""
    gc.collect()
    seen, total = {t.untyped_storage().data_ptr() for t in exclude}, 0
    with warnings.catch_warnings():  # isinstance() on torch.distributed's deprecated aliases warns
        warnings.simplefilter("ignore", FutureWarning)
        # plain tensors and parameters: other tests' fake tensors (torch.compile) have no storage
        objects = [obj for obj in gc.get_objects() if type(obj) in (torch.Tensor, torch.nn.Parameter)]
    for obj in objects:
        if not obj.is_meta:
            st = obj.untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                total += st.nbytes()
    return total


def _memory(device, model) -> tuple[int, int]:
    """(the process's tensor memory on ``device``, the part that is not the model's weights)."""
    weights = [*model.parameters(), *model.buffers()]
    held = _tensor_bytes(exclude=weights)
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated(), held
    return _tensor_bytes(), held


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@torch.no_grad()
def test_memory_flat_over_300_prompt_lengths(device):
    """300 prompts of distinct lengths (as a server sees them) through a preset: memory after all of
    them within 5 % of memory after the first 20; what is not the model's weights (caches, plans)
    stops growing once the caches are full (after 100 prompts: the largest bound is 64 lengths),
    every cache within its bound; clear_caches() empties them."""
    model = small_llama(device)
    lengths = (torch.randperm(900, generator=torch.Generator().manual_seed(0))[:300] + 400).tolist()
    g = torch.Generator().manual_seed(1)
    clear_caches()
    with attnzoo.patch(model, _preset("xattention")):
        for i, n in enumerate(lengths):
            ids = torch.randint(1, 128, (1, n), generator=g).to(device)
            model(input_ids=ids).logits.sum().item()
            if i == 19:
                after_20, entries_20 = _memory(device, model), cache_info()
            if i == 99:
                after_100 = _memory(device, model)
    after_300 = _memory(device, model)
    mib = lambda m: f"{m[0] / 2**20:.3f} MiB ({m[1] / 2**10:.1f} KiB not weights)"  # noqa: E731
    print(f"{device}: tensor memory after 20 prompts {mib(after_20)}, 100 {mib(after_100)}, 300 {mib(after_300)}; "
          f"cache entries after 20: {sum(n for n, _ in entries_20.values())}, after 300: "
          f"{sum(n for n, _ in cache_info().values())}")
    assert after_300[0] <= 1.05 * after_20[0], (after_20, after_300)
    assert after_300[1] <= 1.05 * after_100[1], (after_100, after_300)
    for name, (n, bound) in cache_info().items():
        assert n <= bound, name
    assert any(n for n, _ in cache_info().values()), "no cache was used: the check is empty"
    clear_caches()
    assert not any(n for n, _ in cache_info().values())


def _run(model, stack, ids, meter):
    with attnzoo.patch(model, stack, meter=meter):
        return model(input_ids=ids).logits


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@torch.no_grad()
def test_two_threads_one_model_different_stacks(device):
    """Two threads call one model, each inside its own patch with its own stack and prompt length,
    at the same time: each gets what it gets alone (outputs and metered densities), 20 runs in a row."""
    model = small_llama(device)
    g = torch.Generator().manual_seed(2)
    jobs = {"xattention": torch.randint(1, 128, (1, 1500), generator=g).to(device),
            "streaming": torch.randint(1, 128, (1, 2300), generator=g).to(device)}
    stacks = {name: _preset(name) for name in jobs}
    alone = {}
    for name, ids in jobs.items():
        meter = DensityMeter()
        alone[name] = (_run(model, stacks[name], ids, meter), meter.layers)
    assert not torch.allclose(alone["xattention"][0][:, :1500], alone["streaming"][0][:, :1500])
    for run in range(20):
        got, errors = {}, []
        barrier = threading.Barrier(2)

        def worker(name):
            try:
                meter = DensityMeter()
                with attnzoo.patch(model, stacks[name], meter=meter):
                    barrier.wait()  # both patches active before either calls the model
                    got[name] = (model(input_ids=jobs[name]).logits, meter.layers)
                    barrier.wait()
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)
                barrier.abort()

        threads = [threading.Thread(target=worker, args=(name,)) for name in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        for name in jobs:
            diff = (got[name][0] - alone[name][0]).abs().max().item()
            assert diff <= 1e-5, f"run {run}: {name} differs from its single-thread output by {diff}"
            assert got[name][1] == pytest.approx(alone[name][1], abs=1e-6), f"run {run}: {name} densities"
    assert model.config._attn_implementation == "sdpa"  # restored after the last patch


@torch.no_grad()
def test_a_thread_without_a_patch_is_refused_while_two_threads_patch():
    model = small_llama("cpu")
    ids = torch.randint(1, 128, (1, 64))
    ready, done = threading.Barrier(3), threading.Event()

    def holder(name):
        with attnzoo.patch(model, {"default": {"op": "dense"}, "name": name}):
            ready.wait()
            done.wait(30)

    threads = [threading.Thread(target=holder, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    ready.wait()
    try:
        with pytest.raises(RuntimeError, match="patched by 2 attnzoo.patch blocks in other threads"):
            model(input_ids=ids)
    finally:
        done.set()
        for t in threads:
            t.join()
    model(input_ids=ids)  # unpatched again
