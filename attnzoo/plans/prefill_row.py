"""The key blocks a prefill plan chose for each sequence's last query block (``PrefillRow``), kept so
that generated tokens read what the prompt's end read, plus every block written after the prompt."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .block import BlockPlan
from .geometry import cdiv


@dataclass(frozen=True, eq=False)
class PrefillRow:
    """``indices[b, h, :counts[b, h]]``: the key blocks (ascending) the prefill's plan gave the
    query block holding sequence b's last real token; ``start[b]``: the first key block that holds
    a token after sequence b's prompt (its prompt has ``start[b] * block_k`` or more tokens).
    Positions count from each sequence's first real token (the runner's start-aligned frame)."""

    indices: torch.Tensor  # [B, H, K]
    counts: torch.Tensor  # [B, H]
    start: torch.Tensor  # [B]
    block_q: int
    block_k: int

    @classmethod
    def of(cls, plan: BlockPlan, key_padding_mask=None) -> PrefillRow:
        """From a prefill's plan (Nq == Nk) and the start-aligned padding mask it ran under: each
        sequence's row at its own last real query (no host read)."""
        B, H, _, K = plan.kv_indices.shape
        dev = plan.kv_indices.device
        lengths = (torch.full((B,), plan.kv_len, device=dev) if key_padding_mask is None
                   else key_padding_mask.sum(-1).clamp(min=1))
        qb = ((lengths - 1) // plan.block_q).long()  # [B]
        idx = plan.kv_indices.gather(2, qb[:, None, None, None].expand(B, H, 1, K))[:, :, 0]
        cnt = plan.kv_counts.gather(2, qb[:, None, None].expand(B, H, 1))[:, :, 0]
        return cls(idx.long(), cnt.long(), (lengths // plan.block_k).long(), plan.block_q, plan.block_k)

    def select(self, b: int) -> PrefillRow:
        """Sequence ``b`` alone (the runner decodes a left-padded batch one sequence at a time)."""
        s = slice(b, b + 1)
        return PrefillRow(self.indices[s], self.counts[s], self.start[s], self.block_q, self.block_k)

    def decode_plan(self, kv_len: int) -> BlockPlan:
        """The plan of one decode query per sequence against ``kv_len`` keys: the kept row's blocks
        before ``start`` and every block from ``start`` on (ascending, no host read)."""
        B, H, K = self.indices.shape
        dev = self.indices.device
        nkb = cdiv(kv_len, self.block_k)
        cand = torch.arange(nkb, device=dev).expand(B, H, nkb)
        slot = torch.arange(K, device=dev)
        keep_row = (slot < self.counts[..., None]) & (self.indices < self.start[:, None, None])
        keep_new = cand >= self.start[:, None, None]
        idx = torch.cat([self.indices, cand], -1)
        keep = torch.cat([keep_row, keep_new], -1)
        # both parts are ascending and every kept row block lies before `start`: moving the kept
        # entries to the front in order (a stable sort of the drop flags) keeps them ascending
        order = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices
        counts = keep.sum(-1)
        idx = idx.gather(-1, order)
        idx = torch.where(torch.arange(K + nkb, device=dev) < counts[..., None], idx, -1)
        return BlockPlan(idx[:, :, None], counts[:, :, None], self.block_q, self.block_k, 1, kv_len)
