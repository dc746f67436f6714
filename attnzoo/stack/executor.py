"""Running a routed layer's plans: one mixed launch, or one call per branch on its heads.

The stack *describes* a routed layer (a router's ``HeadPlan`` and what each branch computes);
this module *executes* it:

- ``mixed_plan`` writes every branch as a head mode (dense, streaming ranges, block-sparse
  indices) into one ``MixedPlan``, on the device and with no host synchronisation: the mode,
  sink and local of each head are gathered from a per-branch table by the router's decision, and
  block-mode heads take their rows of a block plan computed for every head (the selector runs on
  all heads, because choosing a subset would need the decision on the host).
- ``split_by_branch`` runs one call per branch on exactly the (batch, KV head) pairs routed to
  it: one call per run of consecutive heads, on views (no copy), or the pairs gathered and folded
  into the batch where they are scattered. Finding them reads the decision: one host sync.
- the hybrid of the two (``pending_decision`` + ``fill_branch``): the sparse branches run in one
  mixed launch in which the dense branch's heads walk no block (``mixed_plan(skip=...)``), queued
  *before* the host waits for the decision, so the GPU has work while the host then launches the
  dense heads through the fastest dense kernel and writes them into the mixed launch's output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import settings
from ..caches import shape_cache
from ..plans import MODES, BlockPlan, MixedPlan, cdiv


@dataclass(frozen=True)
class HeadMode:
    """What one branch of a routed layer computes, as a mixed-plan head mode."""

    kind: str  # one of MODES
    block_size: int | None = None  # streaming and block modes
    sink: int = 0  # streaming
    local: int = 0  # streaming

    def __post_init__(self):
        if self.kind not in MODES:
            raise ValueError(f"head mode kind must be one of {MODES}, got {self.kind!r}")


def common_block_size(modes: list[HeadMode], default: int = 64) -> int | None:
    """The one block size a mixed plan of ``modes`` uses, or None if the branches disagree."""
    sizes = {m.block_size for m in modes if m.kind != "dense"}
    if len(sizes) > 1:
        return None
    return sizes.pop() if sizes else default


def mixed_plan(branch: torch.Tensor, modes: list[HeadMode], block_plans: dict[int, BlockPlan],
               q_heads: int, q_len: int, kv_len: int, block_size: int, skip: int | None = None) -> MixedPlan:
    """A per-query-head MixedPlan for the decision ``branch`` ``[B, Hkv]`` (index into ``modes``).

    ``block_plans[i]`` is branch ``i``'s plan over *all* heads (per query or per KV head); a head
    routed to a block branch takes its rows from it. Heads routed to branch ``skip`` become block
    heads with no block (the kernel writes zeros for them; another call fills them in). No host
    synchronisation.
    """
    B, Hkv = branch.shape
    g, dev = q_heads // Hkv, branch.device
    per_head = _mode_table(tuple(modes), dev)[branch.long()].repeat_interleave(g, dim=1)  # [B, Hq, 3]
    mode, sink, local = per_head.unbind(-1)
    block = None
    if block_plans:
        per_q = {i: _per_query_head(bp, q_heads) for i, bp in block_plans.items()}
        if len(per_q) == 1:
            (i, bp), = per_q.items()
            block = bp
        else:  # several block branches: each head keeps the rows of its own branch's plan
            nkb = cdiv(kv_len, block_size)
            chosen = branch.repeat_interleave(g, dim=1)[..., None, None]
            mask = torch.zeros(B, q_heads, cdiv(q_len, block_size), nkb, dtype=torch.bool, device=dev)
            for i, bp in per_q.items():
                mask = torch.where(chosen == i, bp.to_block_mask(), mask)
            block = BlockPlan.from_block_mask(mask, block_size, block_size, q_len, kv_len,
                                              max_blocks=max(bp.max_blocks for bp in per_q.values()))
    return MixedPlan(mode.contiguous(), sink.contiguous(), local.contiguous(), block, block_size, q_len, kv_len, True)


@shape_cache(32)
def uniform_plan(mode: HeadMode, batch: int, q_heads: int, q_len: int, kv_len: int, device: torch.device) -> MixedPlan:
    """Every head under one range mode (dense or streaming), as a MixedPlan of per-head ranges.

    A streaming layer needs no index lists: a single-launch kernel walks the sink and the window
    arithmetically. The plan depends only on shapes, so it is built once and reused by every
    layer of a forward (and by later forwards of the same shape): three small tensors per entry.
    """
    if mode.kind == "block":
        raise ValueError("a block-mode plan depends on the inputs, not only on shapes")
    bs = mode.block_size or 64
    shape = (batch, q_heads)
    full = lambda x: torch.full(shape, x, dtype=torch.int32, device=device)  # noqa: E731
    return MixedPlan(full(MODES.index(mode.kind)), full(mode.sink), full(mode.local), None, bs, q_len, kv_len, True)


@shape_cache(64)
def _mode_table(modes: tuple[HeadMode, ...], device) -> torch.Tensor:
    """``[branches, 3]`` (mode, sink, local) on ``device``: copied to a GPU once per layer kind, not per
    call (a copy from host memory would block the host)."""
    return torch.tensor([[MODES.index(m.kind), m.sink, m.local] for m in modes], dtype=torch.int32, device=device)


def _per_query_head(plan: BlockPlan, q_heads: int) -> BlockPlan:
    if plan.heads == q_heads:
        return plan
    g = q_heads // plan.heads
    return BlockPlan(plan.kv_indices.repeat_interleave(g, dim=1), plan.kv_counts.repeat_interleave(g, dim=1),
                     plan.block_q, plan.block_k, plan.q_len, plan.kv_len, plan.causal)


def branch_densities(branch: torch.Tensor, plan: MixedPlan, n_branches: int):
    """``[(share, density)]`` per branch as device tensors: the fraction of (batch, KV head) slots
    routed to it and the mean density of their heads under ``plan``."""
    B, Hkv = branch.shape
    d = plan.density(reduce=False).view(B, Hkv, -1).mean(-1)
    out = []
    for i in range(n_branches):
        chosen = (branch == i).double()
        n = chosen.sum()
        out.append((n / chosen.numel(), (d * chosen).sum() / n.clamp(min=1)))
    return out


@dataclass(frozen=True)
class HeadRun:
    """KV heads ``h0:h1`` of batch element ``b``, routed to one branch: a call on views of q/k/v."""

    b: int
    h0: int
    h1: int


# more runs of consecutive heads than settings ``max_head_runs`` (4): one call on the gathered pairs instead

# run(i, part): branch i's output for ``part`` -- None (every pair: the whole call), a HeadRun (views,
# output [1, (h1 - h0) * g, Nq, D]) or (b, h) index tensors (pairs folded into the batch, [n, g, Nq, D])
RunBranch = Callable[[int, "HeadRun | tuple[torch.Tensor, torch.Tensor] | None"], torch.Tensor]


def pending_decision(branch: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The router's decision ``[B, Hkv]`` on the host, as a function that waits for it.

    On a GPU it is copied to pinned host memory behind the work queued so far and an event marks
    it; the host waits only when it calls the function. A caller that queues more work first (the
    sparse branches) keeps the GPU busy while the host waits and then launches the rest.
    """
    if branch.device.type != "cuda":
        return lambda: branch
    host = torch.empty(branch.shape, dtype=branch.dtype, pin_memory=True)
    host.copy_(branch, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()

    def wait() -> torch.Tensor:
        ready.synchronize()
        return host

    return wait


def head_runs(decision: torch.Tensor, i: int) -> list[HeadRun] | None:
    """The runs of consecutive KV heads routed to branch ``i`` (host decision), or None if more
    than settings ``max_head_runs``."""
    runs = []
    for b, row in enumerate(decision.tolist()):
        h = 0
        while h < len(row):
            if row[h] != i:
                h += 1
                continue
            h1 = h
            while h1 < len(row) and row[h1] == i:
                h1 += 1
            runs.append(HeadRun(b, h, h1))
            h = h1
    return runs if len(runs) <= settings.get("max_head_runs") else None


def _write_branch(out5: torch.Tensor, branch: torch.Tensor, decision: torch.Tensor, i: int,
                  run: RunBranch) -> None:
    """Branch ``i``'s output into ``out5`` ``[B, Hkv, g, Nq, D]``: a call per run of heads (on views,
    no gather), or one call on the gathered pairs where the heads are scattered."""
    g = out5.shape[2]
    runs = head_runs(decision, i)
    if runs is not None:
        for r in runs:
            out5[r.b, r.h0:r.h1] = run(i, r)[0].unflatten(0, (r.h1 - r.h0, g)).to(out5.dtype)
        return
    # the count is known on the host: a static-size nonzero reads nothing more back
    n = int((decision == i).sum())
    b, h = torch.nonzero_static(branch == i, size=n).unbind(-1)
    out5[b, h] = run(i, (b, h)).to(out5.dtype)


def split_by_branch(q, k, branch: torch.Tensor, n_branches: int, run: RunBranch) -> torch.Tensor:
    """One call per branch (per run of its heads) on the (batch, KV head) pairs routed to it.

    Reads the decision back (a host sync) and writes each branch's outputs in head order. A branch
    that takes every pair is called once on the whole batch.
    """
    B, Hq, Nq, D = q.shape
    Hkv = k.shape[1]
    decision = pending_decision(branch)()
    for i in range(n_branches):
        if bool((decision == i).all()):
            return run(i, None)
    out5 = q.new_empty(B, Hkv, Hq // Hkv, Nq, D)  # every pair is written by exactly one branch
    for i in range(n_branches):
        if bool((decision == i).any()):
            _write_branch(out5, branch, decision, i, run)
    return out5.flatten(1, 2)


def fill_branch(out: torch.Tensor, branch: torch.Tensor, decision: torch.Tensor, i: int,
                run: RunBranch) -> torch.Tensor:
    """``out`` ``[B, Hq, Nq, D]`` with the heads routed to branch ``i`` (host ``decision``) replaced
    by that branch's output. In place, unless ``out`` is part of an autograd graph."""
    if not bool((decision == i).any()):
        return out
    if bool((decision == i).all()):
        return run(i, None).to(out.dtype)
    if out.requires_grad:
        out = out.clone()  # the op that made ``out`` saved it for its backward
    B, Hkv = decision.shape
    _write_branch(out.unflatten(1, (Hkv, out.shape[1] // Hkv)), branch, decision, i, run)
    return out
