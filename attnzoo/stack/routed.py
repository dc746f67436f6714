"""Routed nodes: a router picks a branch per (batch, KV head); the branches run as one mixed launch,
one call per branch, or the hybrid of the two, chosen per layer by measurement (``ops.executor``
executes each path; this module describes the node and chooses).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..caches import LRUDict
from ..context import CallContext
from ..ops import dense as dense_op
from ..ops import mixed as mixed_op
from ..ops.mixed import fused_backend
from ..plans import BlockPlan, HeadPlan
from ..registry import to_config
from ..settings import get as setting
from .executor import (
    HeadMode,
    HeadRun,
    branch_densities,
    common_block_size,
    fill_branch,
    mixed_plan,
    pending_decision,
    split_by_branch,
)
from .nodes import Node, dense_below_applies, head_mode

__all__ = ["Routed", "SYNC_PATH_MARGIN"]


@dataclass
class Routed(Node):
    router: object
    branches: dict[str, Node]
    dense_below: dict = field(default_factory=dict)  # device type -> keys below which every head runs dense
    # per call shape: "mixed" (one launch) or "split" (a call per branch), chosen by timing both once
    # (bounded: a server meets many shapes; lengths are bucketed by powers of two, so 256 covers every
    # layer of a 64-layer model at four batch/length shapes before the oldest is timed again)
    _path: LRUDict = field(default_factory=lambda: LRUDict(256, "stack.Routed.paths"), init=False, repr=False,
                           compare=False)

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.branches)

    def places_blocks(self, decode: bool) -> bool:
        return not decode or super().places_blocks(decode)

    def children(self):
        return list(self.branches.values())

    def decide(self, q, k, ctx: CallContext) -> HeadPlan:
        key = ("head_plan", id(self))
        if ctx.decode and ctx.cache is not None and key in ctx.cache:
            return ctx.cache[key]  # decided once at prefill, reused for every decode step
        with torch.no_grad():
            plan = self.router(q, k, ctx, self.labels)
        if not isinstance(plan, HeadPlan) or plan.labels != self.labels:
            raise ValueError(f"router {type(self.router).__name__} must return a HeadPlan over {self.labels}")
        plan.validate(q, k)
        if ctx.cache is not None:
            ctx.cache[key] = plan
        return plan

    def launches_once(self, q, k) -> bool:
        return dense_below_applies(self.dense_below, k)

    def capture_refusal(self, q, k, ctx=None) -> str | None:
        if dense_below_applies(self.dense_below, k):
            return None
        if not self._one_launch_possible(q, k, ctx):
            return "a routed layer takes its split path, which reads the router's decision on the host"
        if ctx is not None and q.is_cuda and self._path.get(self._path_key(q, k, ctx, True), "mixed") != "mixed":
            return ("the split path was timed faster here than one mixed launch with what a replay saves; it "
                    "reads the router's decision on the host")
        return super().capture_refusal(q, k, ctx)

    def _one_launch_possible(self, q, k, ctx) -> bool:
        """Whether every branch can run in one mixed launch here (by declaration)."""
        return self._launch(q, k, k, None if ctx is None else ctx.key_padding_mask) is not None

    def _launch(self, q, k, v, key_padding_mask):
        """``(modes, block size, backend)`` of one mixed launch of every branch on these shapes, or
        None: a branch that is no head mode, branches of different block sizes, no such backend."""
        modes = self.head_modes()
        bs = None if modes is None else common_block_size(modes)
        if bs is None:
            return None  # one launch needs one block size across branches
        backend = fused_backend(q, k, v, q.shape[1], bs, key_padding_mask=key_padding_mask)
        return None if backend is None else (modes, bs, backend)

    def __call__(self, q, k, v, ctx: CallContext) -> torch.Tensor:
        if dense_below_applies(self.dense_below, k):
            ctx.record(1.0)
            return dense_op(q, k, v, key_padding_mask=ctx.key_padding_mask, scale=ctx.scale)
        if ctx.keep_plan is not None:  # branch plans cover subsets of the heads: not the layer's plan
            ctx = replace(ctx, keep_plan=None)
        plan = self.decide(q, k, ctx)
        path = self._choose_path(q, k, v, plan, ctx)
        if path != "split":
            out = self._paths()[path](q, k, v, plan, ctx)
            if out is not None:
                return out
        return self._split(q, k, v, plan, ctx)

    def path_choices(self) -> dict[int, dict[str, int]]:
        """Which path each layer chose so far, per key-length bucket: ``{bucket: {path: layers}}``
        (what a benchmark reports beside its timings)."""
        out: dict[int, dict[str, int]] = {}
        for key, path in self._path.items():
            counts = out.setdefault(key[5], {})
            counts[path] = counts.get(path, 0) + 1
        return out

    @staticmethod
    def length_bucket(n: int) -> int:
        """The power-of-two bucket a key length ``n`` is timed under."""
        return 1 << max(0, n - 1).bit_length()

    def _paths(self) -> dict:
        return {"mixed": self._fused, "hybrid": self._hybrid, "split": self._split}

    def _choose_path(self, q, k, v, plan: HeadPlan, ctx: CallContext) -> str:
        """One mixed launch, the hybrid, or one call per branch: by measurement on the device, per
        call shape and layer.

        The mixed launch runs every head in the Triton kernel, with no host sync. The split runs
        dense heads through the fastest dense kernel (SDPA's cuDNN/FA3-class kernels on Hopper) and
        selects only for the heads routed to a sparse branch, at the cost of a host sync to find
        them, which leaves the GPU idle while the host launches the rest. The hybrid queues the
        sparse branches' single launch before that sync, so the GPU has work while it waits. Which
        wins depends on the share of dense heads (a router sends most heads of some layers to full
        attention) and the length, so the first call of each shape (lengths bucketed by powers of
        two) in each layer times each path
        (CUDA events, best of two after a warm-up, behind queued GPU work as in a prefill) and keeps
        the fastest for that layer. On the CPU there is no single-launch backend: split."""
        if q.device.type != "cuda" or ctx.decode:
            return "mixed"  # _fused declines where it cannot run; the CPU falls through to split
        # the single launch is the one path a CUDA graph can hold (the others read the decision on
        # the host): under graphs it is credited with the host time a replay saves
        graphs = bool(setting("cuda_graphs")) and not torch.is_grad_enabled()
        key = self._path_key(q, k, ctx, graphs)
        best = self._path.get(key)
        if best is None:
            quiet = replace(ctx, meter=None)
            timings = {}
            for name, fn in self._paths().items():
                if fn(q, k, v, plan, quiet) is None:  # also the warm-up: kernels compile now
                    continue
                timings[name] = min(_time_behind_busy_gpu(lambda: fn(q, k, v, plan, quiet)) for _ in range(2))  # noqa: B023
            best = self._path[key] = pick_path(timings, graphs)
        return best  # (read once: another thread may evict the entry meanwhile)

    def _path_key(self, q, k, ctx: CallContext, graphs: bool) -> tuple:
        # keyed by the key length's power-of-two bucket, not the exact shape: every new prompt
        # length re-timed three paths inside its own prefill (a 32,767-token NIAH prompt after a
        # 32,768 one took 6.4 s on an H100 instead of ~0.13)
        B, Hq, _, D = q.shape
        return (ctx.layer_idx, B, Hq, k.shape[1], D, self.length_bucket(k.shape[2]), q.dtype,
                ctx.key_padding_mask is None, graphs)

    def _split(self, q, k, v, plan: HeadPlan, ctx: CallContext) -> torch.Tensor:
        return split_by_branch(q, k, plan.branch, len(self.labels), self._run_branch(q, k, v, ctx))

    def _run_branch(self, q, k, v, ctx: CallContext):
        """``run(i, part)`` for ``ops.executor``: branch ``i`` on every pair (None), on a run of
        heads (views) or on gathered pairs folded into the batch."""
        def run(i, part):
            node = self.branches[self.labels[i]]
            if part is None:  # every pair takes this branch
                return node(q, k, v, ctx)
            if isinstance(part, HeadRun):
                return node(*self._slice(q, k, v, ctx, part))
            return node(*self._fold(q, k, v, ctx, *part))

        return run

    @staticmethod
    def _slice(q, k, v, ctx, r: HeadRun):
        """KV heads ``r.h0:r.h1`` of batch element ``r.b`` (and their query heads), as views."""
        B, Hq = q.shape[:2]
        Hkv = k.shape[1]
        g, b = Hq // Hkv, slice(r.b, r.b + 1)
        sub = replace(
            ctx,
            key_padding_mask=None if ctx.key_padding_mask is None else ctx.key_padding_mask[b],
            pre_rope_keys=None if ctx.pre_rope_keys is None else ctx.pre_rope_keys[b, :, r.h0:r.h1],
            cache=None,  # nested routers decide per call
            share=ctx.share * (r.h1 - r.h0) / (B * Hkv),
        )
        return q[b, r.h0 * g:r.h1 * g], k[b, r.h0:r.h1], v[b, r.h0:r.h1], sub

    @staticmethod
    def _fold(q, k, v, ctx, b, h):
        """The (batch, KV head) pairs ``(b[i], h[i])`` as a batch of single-KV-head problems."""
        B, Hq, Nq, D = q.shape
        Hkv = k.shape[1]
        sub = replace(
            ctx,
            key_padding_mask=None if ctx.key_padding_mask is None else ctx.key_padding_mask[b],
            pre_rope_keys=None if ctx.pre_rope_keys is None else ctx.pre_rope_keys[b, :, h, None],
            cache=None,  # nested routers decide per call inside a sub-batch
            share=ctx.share * len(b) / (B * Hkv),
        )
        qs = q.reshape(B, Hkv, Hq // Hkv, Nq, D)[b, h]  # [n, g, Nq, D]: the pairs become the batch
        return qs, k[b, h][:, None], v[b, h][:, None], sub

    def head_modes(self) -> list[HeadMode] | None:
        """Every branch as a mixed-plan head mode, or None if one cannot be written as one."""
        modes = [head_mode(self.branches[label]) for label in self.labels]
        return None if any(m is None for m in modes) else modes

    def _fused(self, q, k, v, plan: HeadPlan, ctx: CallContext) -> torch.Tensor | None:
        """All branches in one mixed-mode launch (no host sync), or None where that is not possible."""
        parts = self._mixed_parts(q, k, v, plan, ctx)
        if parts is None:
            return None
        mplan, backend = parts
        self._record_mixed(plan, mplan, ctx)
        return mixed_op(q, k, v, mplan, key_padding_mask=ctx.key_padding_mask, scale=ctx.scale, backend=backend)

    def _hybrid(self, q, k, v, plan: HeadPlan, ctx: CallContext) -> torch.Tensor | None:
        """The sparse branches in one mixed launch, queued before the host waits for the router's
        decision; then the dense branch's heads through the fastest dense kernel (see
        ``ops.executor``). None where there is not exactly one dense branch or no mixed launch."""
        modes = self.head_modes()
        dense = [i for i, m in enumerate(modes or ()) if m.kind == "dense"]
        if ctx.decode or len(dense) != 1:
            return None
        decision = pending_decision(plan.branch)  # its copy is queued before the selectors' work
        parts = self._mixed_parts(q, k, v, plan, ctx, skip=dense[0])
        if parts is None:
            return None
        mplan, backend = parts
        self._record_mixed(plan, mplan, ctx, skip=dense[0])
        out = mixed_op(q, k, v, mplan, key_padding_mask=ctx.key_padding_mask, scale=ctx.scale, backend=backend)
        return fill_branch(out, plan.branch, decision(), dense[0], self._run_branch(q, k, v, ctx))

    def _mixed_parts(self, q, k, v, plan: HeadPlan, ctx: CallContext, skip: int | None = None):
        """(MixedPlan, backend name) of a single launch of every branch but ``skip``, or None."""
        launch = None if ctx.decode else self._launch(q, k, v, ctx.key_padding_mask)
        if launch is None:
            return None
        modes, bs, backend = launch
        block_plans = {}
        for i, m in enumerate(modes):
            if m.kind == "block":  # every head's rows, but a selector may skip those routed elsewhere
                with torch.no_grad():
                    sctx = replace(ctx, active_heads=plan.branch == i)
                    bp = self.branches[self.labels[i]].selector(q, k, sctx)
                if not isinstance(bp, BlockPlan):
                    return None  # e.g. a selector that fell back to a dense plan on a short input
                block_plans[i] = bp
        mplan = mixed_plan(plan.branch, modes, block_plans, q.shape[1], q.shape[2], k.shape[2], bs, skip=skip)
        return mplan, backend.name

    def _record_mixed(self, plan: HeadPlan, mplan, ctx: CallContext, skip: int | None = None) -> None:
        if ctx.meter is None:
            return

        def density():  # sum over branches of (share of the layer's pairs) x (their density)
            parts = branch_densities(plan.branch, mplan, len(self.labels))
            return sum(share * d for i, (share, d) in enumerate(parts) if i != skip)  # skip records its own

        ctx.record(density)

    def to_config(self) -> dict:
        out = {"router": to_config(self.router), "branches": {k: n.to_config() for k, n in self.branches.items()}}
        if self.dense_below:
            out["dense_below"] = dict(self.dense_below)
        return out


# A path with a host sync must beat the sync-free mixed launch by this factor: after the sync the host
# no longer runs ahead of the GPU, a cost one call's timing does not show. On the embedded model at
# 32K (H100), keeping every layer whose split measured faster made Elastic FA-XA's prefill slower
# (1.08x full against 1.15x with every layer mixed, before the fused router).
SYNC_PATH_MARGIN = 0.9
# the host time a CUDA-graph replay saves a sparse layer call: ~0.93 ms of Python and launches per
# call at 8K-16K on an H100 (issue 38's profile); under graphs the split path must beat the mixed
# launch by that much (at 16K the mixed launch replayed ran 1.07x of full where the split path ran
# 0.77x eagerly; at 128K the mixed launch took longer than full's dense call, 0.90x)
GRAPH_REPLAY_SAVES_MS = 0.9


def pick_path(timings: dict[str, float], graphs: bool) -> str:
    """The path a routed layer keeps, from each path's timed milliseconds: the fastest, unless it reads
    the host (split, hybrid) and is not ``SYNC_PATH_MARGIN`` faster than the mixed launch, or, under
    CUDA graphs (which hold only the mixed launch), not ``GRAPH_REPLAY_SAVES_MS`` faster."""
    best = min(timings, key=timings.get)
    mixed = timings.get("mixed", float("inf"))
    saved = GRAPH_REPLAY_SAVES_MS if graphs else 0.0
    if best != "mixed" and (timings[best] > SYNC_PATH_MARGIN * mixed or timings[best] + saved > mixed):
        return "mixed"
    return best


def _time_behind_busy_gpu(fn, busy_cycles: int = 4_000_000) -> float:
    """Milliseconds of GPU time from the start of ``fn``'s work to its end, with the GPU kept busy
    (~2 ms of spinning) while the host queues it. In a prefill the host runs ahead of the GPU, so
    a host sync inside ``fn`` stalls the GPU for as long as the host then needs to launch the next
    kernel; timed from an idle GPU, that stall would not show, and a path that queues its work
    before it syncs would not show its advantage either."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(busy_cycles)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)
