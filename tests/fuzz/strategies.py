"""Hypothesis strategies: random attention problems, memory layouts, padding and plans."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from attnzoo.plans import BlockPlan, MixedPlan, TokenPlan

DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Memory layouts a caller may hand an op: each keeps the values and changes only the strides.
LAYOUTS = {
    "contiguous": lambda x: x,
    "transposed_head_dim": lambda x: x.transpose(-1, -2).contiguous().transpose(-1, -2),
    "strided_head_dim": lambda x: torch.stack([x, torch.zeros_like(x)], -1)[..., 0],
    "sequence_major": lambda x: x.transpose(1, 2).contiguous().transpose(1, 2),  # HF's [B, N, H, D]
    "strided_sequence": lambda x: torch.stack([x, torch.zeros_like(x)], 3)[:, :, :, 0],
}


# On a GPU the layouts a model passes (contiguous, HF's sequence-major view, a broadcast batch): the
# others only multiply Triton's specialisations (every stride's divisibility is a compile key), and
# the campaign spent its time compiling (534 cases in 495 s on an H100 with every layout)
GPU_LAYOUTS = ("contiguous", "sequence_major")


@dataclass
class Problem:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kpm: torch.Tensor | None
    causal: bool
    layout: str
    pad: str

    @property
    def shape(self):
        B, Hq, Nq, D = self.q.shape
        return B, Hq, self.k.shape[1], Nq, self.k.shape[2], D

    def __repr__(self):
        B, Hq, Hkv, Nq, Nk, D = self.shape
        return (f"Problem(B={B}, Hq={Hq}, Hkv={Hkv}, Nq={Nq}, Nk={Nk}, D={D}, {self.q.dtype}, "
                f"causal={self.causal}, pad={self.pad}, layout={self.layout})")


def _block_plan_to(plan: BlockPlan, device) -> BlockPlan:
    return BlockPlan(plan.kv_indices.to(device), plan.kv_counts.to(device), plan.block_q, plan.block_k,
                     plan.q_len, plan.kv_len, plan.causal)


def padding(draw, B: int, Nk: int, g: torch.Generator) -> tuple[str, torch.Tensor | None]:
    kind = draw(st.sampled_from(["none", "left", "right", "holes"]))
    if kind == "none":
        return kind, None
    m = torch.ones(B, Nk, dtype=torch.bool)
    for b in range(B):
        n = int(torch.randint(0, Nk + 1, (1,), generator=g))  # may pad a whole sequence
        if kind == "left":
            m[b, :n] = False
        elif kind == "right":
            m[b, Nk - n:] = False
        else:
            m[b] = torch.rand(Nk, generator=g) < 0.7
    return kind, m


@st.composite
def problems(draw, max_n: int = 160, head_dims=(8, 16, 32, 64), dtypes=DTYPES, causal=None,
             allow_expand: bool = True, allow_padding: bool = True, min_nk: int = 1, square: bool = False,
             device: str = "cpu", decode: bool = False, groups=(1, 2, 3, 4), prefill: bool = False):
    """A random problem on ``device`` (drawn on the CPU, so a seed gives the same values anywhere).
    ``decode``: one causal query per head (a generated token against its cache); ``prefill``: at
    least two queries; ``groups``: the query heads per KV head drawn from."""
    B = draw(st.integers(1, 3))
    Hkv = draw(st.integers(1, 3))
    Hq = Hkv * draw(st.sampled_from(groups))
    min_nk = max(min_nk, 2) if prefill else min_nk
    causal = True if decode else (draw(st.booleans()) if causal is None else causal)
    Nk = draw(st.integers(min_nk, max_n))
    if decode:
        Nq = 1
    elif square:
        Nq = Nk
    elif causal:  # decode, prefill, chunked
        Nq = draw(st.one_of(st.just(Nk), st.integers(2, Nk)) if prefill else
                  st.one_of(st.just(1), st.just(Nk), st.integers(1, Nk)))
    else:
        Nq = draw(st.integers(2 if prefill else 1, max_n))
    D = draw(st.sampled_from(head_dims))
    dtype = draw(st.sampled_from(dtypes))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    q = torch.randn(B, Hq, Nq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Nk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Nk, D, generator=g).to(dtype)
    q, k, v = (t.to(device) for t in (q, k, v))
    names = sorted(LAYOUTS) if str(device) == "cpu" else list(GPU_LAYOUTS)
    layout = draw(st.sampled_from(names + (["expanded_batch"] if allow_expand else [])))
    if layout == "expanded_batch":  # one sequence broadcast over the batch (stride 0)
        q, k, v = (t[:1].expand(B, *t.shape[1:]) for t in (q, k, v))
    else:
        q, k, v = (LAYOUTS[layout](t) for t in (q, k, v))
    pad, kpm = padding(draw, B, Nk, g) if allow_padding else ("none", None)
    return Problem(q, k, v, None if kpm is None else kpm.to(device), causal, layout, pad)


@st.composite
def block_plans(draw, p: Problem, blocks=(1, 4, 16, 32, 64), per_head=None) -> BlockPlan:
    B, Hq, Hkv, Nq, Nk, _ = p.shape
    bq, bk = draw(st.sampled_from(blocks)), draw(st.sampled_from(blocks))
    H = draw(st.sampled_from([Hq, Hkv])) if per_head is None else (Hq if per_head == "q" else Hkv)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    full = BlockPlan.full(B, H, Nq, Nk, bq, bk, causal=p.causal).to_block_mask()
    keep = torch.rand(full.shape, generator=g) < draw(st.floats(0.0, 1.0))
    plan = BlockPlan.from_block_mask(keep & full, bq, bk, Nq, Nk, p.causal)
    if draw(st.booleans()):  # garbage in the unused slots must be ignored
        slots = torch.arange(plan.max_blocks) >= plan.kv_counts[..., None]
        junk = torch.randint(-3, plan.num_kv_blocks + 3, plan.kv_indices.shape, generator=g, dtype=torch.int32)
        plan = BlockPlan(torch.where(slots, junk, plan.kv_indices), plan.kv_counts, bq, bk, Nq, Nk, p.causal)
    return _block_plan_to(plan, p.q.device)


@st.composite
def mixed_plans(draw, p: Problem, blocks=(16, 32, 64)) -> MixedPlan:
    B, Hq, Hkv, Nq, Nk, _ = p.shape
    bs = draw(st.sampled_from(blocks))
    H = draw(st.sampled_from([Hq, Hkv]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    mode = torch.randint(0, 3, (B, H), generator=g, dtype=torch.int32)
    sink = torch.randint(0, 3 * bs, (B, H), generator=g, dtype=torch.int32)
    local = torch.randint(0, 4 * bs, (B, H), generator=g, dtype=torch.int32)
    full = BlockPlan.full(B, H, Nq, Nk, bs, bs).to_block_mask()
    block = BlockPlan.from_block_mask(full & (torch.rand(full.shape, generator=g) < 0.5), bs, bs, Nq, Nk)
    dev = p.q.device
    return MixedPlan(mode.to(dev), sink.to(dev), local.to(dev), _block_plan_to(block, dev), bs, Nq, Nk, True)


@st.composite
def token_plans(draw, p: Problem) -> TokenPlan:
    B, Hq, Hkv, N, _, _ = p.shape
    H = draw(st.sampled_from([Hq, Hkv]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    keep = (torch.rand(B, H, N, generator=g) < draw(st.floats(0.05, 1.0))).to(p.q.device)
    if p.kpm is not None:
        keep &= p.kpm[:, None, :]
    return TokenPlan.from_keep_mask(keep)
