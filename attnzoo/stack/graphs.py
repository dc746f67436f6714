"""CUDA-graph replay of a layer's attention call (selection + attention), per layer and shape.

At 8K-16K keys a sparse layer call spends more time launching kernels from Python (~0.9 ms for
20-80 launches) than running them (~0.1 ms). A CUDA graph replays the whole call's kernels in one
launch. ``torch.cuda.CUDAGraph`` is used directly rather than ``torch.compile(mode="reduce-overhead")``:
the hot path is already sync-free with static shapes per length, so nothing needs tracing, and
compiling every selector and Triton wrapper would add minutes of compile per shape and a second
code path to keep equal to the eager one.

How a call is served (``LayerGraphs.__call__``), per thread (graphs and their buffers are not shared
between threads: two threads replaying one graph would race on its input buffers):

1. the first call of a (layer, shapes, options) signature runs eagerly: it compiles, autotunes and
   fills the per-shape caches, and a shape seen once (a server's one-off prompt length) never costs
   a capture;
2. the second captures the call into a graph reading static input buffers (shared by every layer of
   that shape: layers run one after another) and writing a static output, then replays it;
3. later calls copy q/k/v (and the padding mask, the pre-RoPE keys) into the buffers, replay, and
   return a copy of the output the captured call allocated (a caller may keep it; the next replay
   overwrites the graph's own).

A call that is one dense attention launch (``Node.launches_once``: a dense layer, a layer below
its ``dense_below``) is never captured: a graph would save no launch and add the input copies
(on an H100 the embedded model's 16K prefill with full attention took 50.9 ms replayed, 48.7 eager,
in two runs of bench/results/2026-12-07-h100-graphs).

A node declares when its call cannot be captured (``Node.capture_refusal``: a routed layer's split
path, Token Sparse's width read, value checks): it runs eagerly, and ``report()`` says why, per
signature. A capture that fails anyway (an undeclared host read) runs eagerly from then on too. What
a captured call leaves in ``ctx.cache`` (a router's decision kept for decode) is handed to the caller's
cache after every replay as a copy (the graph's own tensors change at its next replay); a call
leaving anything else there is not captured. Density meters still see every call: the meter's entries are summed inside
the graph and the sum is added after each replay.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field, replace

import torch

from ..caches import LRUDict
from ..context import CallContext, deferred_value
from ..settings import get as setting

# signatures kept per thread: a few prompt lengths of a 30-40 layer model
_MAX_GRAPHS = 128
ONE_LAUNCH = "one dense attention launch: a graph would add only its input copies"


def wanted(q, k, v, ctx: CallContext) -> bool:
    """Whether this call may be served by a graph: a CUDA prefill without autograd, outside another
    capture (a user capturing the whole model keeps that capture), with graphs switched on."""
    if not (q.is_cuda and setting("cuda_graphs")):
        return False
    scale = ctx.density_scale  # compared only as a number: a tensor would be a host read
    if ctx.decode or ctx.active_heads is not None or not isinstance(scale, (int, float)) or scale != 1.0:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return False
    return not torch.cuda.is_current_stream_capturing()


def _reset_after_failed_capture(device, pool) -> None:
    """Out of the capture mode a failed capture leaves behind: the allocator still recording into
    the graph's pool (every later capture then failed with "already recording to mempool_id" on an
    H100), and the device's default generator (a fresh copy of its state: same seed and offset)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    try:
        torch._C._cuda_endAllocateToPool(idx, pool)
    except RuntimeError:
        pass  # not recording: the capture ended that itself
    gen = torch.cuda.default_generators[idx]
    gen.graphsafe_set_state(gen.clone_state())


def _copied(value):
    """A copy of what a captured call left in ``ctx.cache`` (a router's decision kept for decode),
    its tensors cloned out of the graph's memory; None where it is not a tensor or a dataclass of
    tensors and plain values (such a call is not captured)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value) if f.init}
        plain = (str, int, float, bool, type(None))
        if all(isinstance(x, (torch.Tensor, *plain)) or (isinstance(x, tuple) and all(isinstance(y, plain) for y in x))
               for x in fields.values()):
            tensors = {n: x.clone() for n, x in fields.items() if isinstance(x, torch.Tensor)}
            return dataclasses.replace(value, **tensors)
    return None


def _sig(t):
    return None if t is None else (tuple(t.shape), t.stride(), t.dtype, t.device)


class _Recorder:
    """A density meter stand-in during capture: entries are kept and summed into one device value."""

    def __init__(self):
        self.entries: list = []

    def add(self, layer, share, density) -> None:
        self.entries.append((share, density))

    def total(self):
        out = 0.0
        for share, density in self.entries:
            out = out + share * deferred_value(density)
        return out


@dataclass
class _Buffers:
    """Static inputs of one shape signature, shared by the graphs of every layer (each graph keeps
    the output its captured call allocated: no copy inside the graph)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kpm: torch.Tensor | None
    keys: torch.Tensor | None

    @classmethod
    def like(cls, q, k, v, kpm, keys) -> _Buffers:
        def copy(t):
            return None if t is None else torch.empty_like(t)
        return cls(copy(q), copy(k), copy(v), copy(kpm), copy(keys))

    def fill(self, q, k, v, kpm, keys) -> None:
        for dst, src in ((self.q, q), (self.k, k), (self.v, v), (self.kpm, kpm), (self.keys, keys)):
            if dst is not None:
                dst.copy_(src)


@dataclass
class _Entry:
    calls: int = 0
    graph: torch.cuda.CUDAGraph | None = None
    buffers: _Buffers | None = None
    out: torch.Tensor | None = None  # the captured call's output (the graph's memory)
    meter_total: object = None  # the graph's summed meter entries (a device value or a number)
    declined: str | None = None  # why this signature runs eagerly
    kept: dict = field(default_factory=dict)  # what the captured call left in ctx.cache (graph tensors)


@dataclass
class _PerThread:
    entries: LRUDict = field(default_factory=lambda: LRUDict(_MAX_GRAPHS, "stack.graphs"))
    buffers: LRUDict = field(default_factory=lambda: LRUDict(_MAX_GRAPHS, "stack.graph_buffers"))
    pool: object = None


class LayerGraphs:
    """The graphs of one LayerStack (see the module docstring)."""

    def __init__(self):
        self._local = threading.local()

    def __reduce__(self):  # a copied or pickled stack starts without graphs (they hold device buffers)
        return (LayerGraphs, ())

    def _state(self) -> _PerThread:
        st = getattr(self._local, "state", None)
        if st is None:
            st = self._local.state = _PerThread()
        return st

    def __call__(self, run, layer_idx: int, node, q, k, v, ctx: CallContext) -> torch.Tensor:
        """``run(node, q, k, v, ctx)`` (the eager call) served as described above."""
        kpm, keys = ctx.key_padding_mask, ctx.pre_rope_keys
        shapes = (_sig(q), _sig(k), _sig(v), _sig(kpm), _sig(keys))
        # the node's identity too: stacks resolved for models of other depths share these graphs
        key = (layer_idx, id(node), shapes, ctx.scale, ctx.share, ctx.kv_head_offset, ctx.kv_heads_total,
               ctx.starts_aligned, ctx.meter is not None)
        st = self._state()
        entry = st.entries.get(key)
        if entry is None:
            entry = _Entry()
            if node.launches_once(q, k):
                entry.declined = ONE_LAUNCH
            st.entries[key] = entry
        entry.calls += 1
        if entry.declined is not None or (entry.graph is None and entry.calls == 1):
            return run(node, q, k, v, ctx)
        if entry.graph is None:
            self._capture(st, entry, shapes, run, node, q, k, v, ctx)
            if entry.graph is None:
                return run(node, q, k, v, ctx)
        else:
            entry.buffers.fill(q, k, v, kpm, keys)
        entry.graph.replay()
        if ctx.cache is not None:  # copies: the next replay of this graph rewrites its tensors
            ctx.cache.update({key: _copied(value) for key, value in entry.kept.items()})
        if ctx.meter is not None:
            total = entry.meter_total
            ctx.meter.add(ctx.layer_idx, 1.0, total.clone() if isinstance(total, torch.Tensor) else total)
        return entry.out.clone()

    def _capture(self, st: _PerThread, entry: _Entry, shapes, run, node, q, k, v, ctx: CallContext) -> None:
        why = node.capture_refusal(q, k, ctx)
        if why is not None:
            entry.declined = why
            return
        kpm, keys = ctx.key_padding_mask, ctx.pre_rope_keys
        bufs = st.buffers.get(shapes)
        if bufs is None:
            bufs = _Buffers.like(q, k, v, kpm, keys)
            st.buffers[shapes] = bufs
        bufs.fill(q, k, v, kpm, keys)
        if st.pool is None:
            st.pool = torch.cuda.graph_pool_handle()
        recorder = _Recorder() if ctx.meter is not None else None
        cache: dict = {}
        sub = replace(ctx, key_padding_mask=bufs.kpm, pre_rope_keys=bufs.keys, cache=cache, meter=recorder)
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.current_stream()
        try:
            # thread_local: another thread's CUDA calls during this capture do not invalidate it
            with torch.cuda.graph(graph, pool=st.pool, capture_error_mode="thread_local"):
                out = run(node, bufs.q, bufs.k, bufs.v, sub)
                total = recorder.total() if recorder is not None else None
        except Exception as e:  # noqa: BLE001 - any capture failure means: run this signature eagerly
            # ending a failed capture raises before torch.cuda.graph restores the caller's stream and
            # before the CUDA generator leaves capture mode (every later random op on the device
            # would then raise "Offset increment outside graph capture"): both are undone here
            torch.cuda.set_stream(stream)
            _reset_after_failed_capture(q.device, st.pool)
            # and later captures take a new pool: a capture that fails before its end can leave an
            # allocator still routing into this one (torch 2.11 on an H100: the next capture on it
            # failed with "beginAllocateToPool: already recording to mempool_id" after the reset
            # above; pytorch/pytorch#190308 unwinds such captures in torch itself)
            st.pool = None
            entry.declined = f"capture failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            return
        uncopyable = [key for key, value in cache.items() if _copied(value) is None]
        if uncopyable:
            entry.declined = f"the call keeps state in ctx.cache that a replay cannot hand out ({uncopyable})"
            return
        entry.graph, entry.buffers, entry.out, entry.meter_total, entry.kept = graph, bufs, out, total, cache

    def report(self) -> list[dict]:
        """This thread's signatures: layer, q's shape, calls, and ``graph`` or the reason it runs eagerly."""
        out = []
        for key, e in self._state().entries.items():
            state = "graph" if e.graph is not None else (e.declined or "eager (first call)")
            out.append({"layer": key[0], "q": key[2][0][0], "calls": e.calls, "state": state})
        return out

    def clear(self) -> None:
        """Drop this thread's graphs and buffers."""
        self._local.state = None
