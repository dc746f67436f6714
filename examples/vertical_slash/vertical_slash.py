"""A vertical-slash block selector (MInference-style) in one file: import it and it is registered,
tested by the selector matrix, benchmarked, and buildable from YAML as {name: vertical_slash}."""

from dataclasses import dataclass
from typing import ClassVar

import torch

import attnzoo
from attnzoo.plans import BlockPlan, last_visible_block
from attnzoo.selectors import as_context


@attnzoo.register("selector", "vertical_slash")
@dataclass
class VerticalSlash:
    block_size: int = 64
    last_q: int = 64  # real queries (the last ones) that estimate the pattern
    verticals: int = 4  # key blocks every query block keeps
    slashes: int = 2  # block diagonals every query block keeps
    plan_kind: ClassVar[str] = "block"  # what it returns; the stack pairs it with block_sparse
    small_config: ClassVar[dict] = {"block_size": 32, "verticals": 2, "slashes": 1}  # for short tests

    def __post_init__(self):
        for name in ("block_size", "last_q", "verticals", "slashes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @torch.no_grad()
    def __call__(self, q, k, ctx=None) -> BlockPlan:
        B, Hq, Nq, D = q.shape
        Hkv, Nk, b, dev = k.shape[1], k.shape[2], self.block_size, q.device
        real = as_context(ctx).key_padding_mask  # [B, Nk], True = real token; padding never votes
        real = torch.ones(B, Nk, dtype=torch.bool, device=dev) if real is None else real
        n = min(self.last_q, Nq)
        rows = torch.where(real[:, Nk - Nq:], torch.arange(Nq, device=dev), -1).topk(n, -1).values  # last n real
        voting, rows = rows >= 0, rows.clamp(min=0)  # [B, n]
        qpos = rows + Nk - Nq  # their key positions
        qn = q.gather(2, rows[:, None, :, None].expand(B, Hq, n, D)).float().reshape(B, Hkv, Hq // Hkv, n, D)
        s = torch.einsum("bhgqd,bhkd->bhgqk", qn, k.float()) / D**0.5
        keys = torch.arange(Nk, device=dev)
        seen = (keys <= qpos[..., None]) & real[:, None, :]  # [B, n, Nk]
        a = torch.softmax(s.masked_fill(~seen[:, None, None], float("-inf")), -1).nan_to_num(0.0)
        a = (a * voting[:, None, None, :, None]).sum(2)  # [B, Hkv, n, Nk]: mass per (voting query, key)
        nkb, nqb = -(-Nk // b), -(-Nq // b)
        vert = torch.zeros(B, Hkv, nkb, device=dev).index_add_(2, keys // b, a.sum(2))
        diag = ((qpos[..., None] - keys).clamp(min=0) // b)[:, None].expand(B, Hkv, n, Nk)  # block offsets
        slash = torch.zeros(B, Hkv, nkb, device=dev).scatter_add_(2, diag.reshape(B, Hkv, -1), a.reshape(B, Hkv, -1))
        top_v = vert.topk(min(self.verticals, nkb), -1).indices  # [B, Hkv, v]
        top_s = slash.topk(min(self.slashes, nkb), -1).indices  # [B, Hkv, s]
        last = last_visible_block(Nq, Nk, b, b, dev)  # [Nqb]
        cols = torch.arange(nkb, device=dev)
        keep = (cols[:, None] == top_v[:, :, None, :]).any(-1)[:, :, None, :].expand(B, Hkv, nqb, nkb).clone()
        keep |= ((last[:, None] - cols)[None, None, :, :, None] == top_s[:, :, None, None, :]).any(-1)
        keep |= cols == last[:, None]  # own block
        keep &= cols <= last[:, None]  # causal
        return BlockPlan.from_block_mask(keep, b, b, Nq, Nk)
