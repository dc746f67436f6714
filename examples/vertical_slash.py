"""A vertical-slash block selector (MInference-style) in one file: import it and it is registered,
tested by the selector matrix, benchmarked, and buildable from YAML as {name: vertical_slash}."""

from dataclasses import dataclass
from typing import ClassVar

import torch

import attnzoo
from attnzoo.plans import BlockPlan, last_visible_block


@attnzoo.register("selector", "vertical_slash")
@dataclass
class VerticalSlash:
    block_size: int = 64
    last_q: int = 64  # queries that estimate the pattern
    verticals: int = 4  # key blocks every query block keeps
    slashes: int = 2  # block diagonals every query block keeps
    small_config: ClassVar[dict] = {"block_size": 32, "verticals": 2, "slashes": 1}  # for short tests

    def __post_init__(self):
        for name in ("block_size", "last_q", "verticals", "slashes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def __call__(self, q, k, ctx=None) -> BlockPlan:
        B, Hq, Nq, D = q.shape
        Hkv, Nk, b, dev = k.shape[1], k.shape[2], self.block_size, q.device
        n = min(self.last_q, Nq)
        qpos = torch.arange(Nk - n, Nk, device=dev)  # key positions of the last n queries
        s = torch.einsum("bhgqd,bhkd->bhgqk", q[:, :, -n:].float().reshape(B, Hkv, Hq // Hkv, n, D), k.float())
        s = s.masked_fill(torch.arange(Nk, device=dev) > qpos[:, None], float("-inf"))
        a = torch.softmax(s / D**0.5, -1).sum((2, 3))  # [B, Hkv, Nk]: mass per key over group and rows
        nkb, nqb = -(-Nk // b), -(-Nq // b)
        vert = torch.zeros(B, Hkv, nkb, device=dev).index_add_(2, torch.arange(Nk, device=dev) // b, a)
        diag = (qpos[:, None] - torch.arange(Nk, device=dev)).clamp(min=0) // b  # block offset of each (query, key)
        slash = torch.zeros(B, Hkv, nkb, device=dev).index_add_(2, diag.flatten(), a[:, :, None].expand(-1, -1, n, -1)
                                                    .reshape(B, Hkv, -1) / n)
        top_v = vert.topk(min(self.verticals, nkb), -1).indices  # [B, Hkv, v]
        top_s = slash.topk(min(self.slashes, nkb), -1).indices  # [B, Hkv, s] block offsets
        last = last_visible_block(Nq, Nk, b, b, dev)  # [Nqb]
        cols = torch.arange(nkb, device=dev)
        keep = (cols[:, None] == top_v[:, :, None, :]).any(-1)[:, :, None, :].expand(B, Hkv, nqb, nkb).clone()
        keep |= ((last[:, None] - cols)[None, None, :, :, None] == top_s[:, :, None, None, :]).any(-1)
        keep |= cols == last[:, None]  # own block
        keep &= cols <= last[:, None]  # causal
        return BlockPlan.from_block_mask(keep, b, b, Nq, Nk)
