"""How the portable block-sparse backend (``ops.block_sparse``'s ``blocked``) walks a plan: rows of
(batch element, plan head, query block), chunked so that each chunk's score matrix fits a budget
and pads its rows little. Forward and backward share one ``BlockLayout`` per call."""

from __future__ import annotations

import torch

from .. import settings
from ..plans import BlockPlan
from ..plans.geometry import cdiv

# Upper bound on score elements materialised per chunk (fp32): bounds memory, keeps GEMMs big. 2^21
# (8 MiB) on the 2-core CPU, 3K tokens, 9/3 heads, interleaved medians: 2^19-2^20 suited plans with
# uneven rows best, 2^22-2^23 a streaming plan's (fewer chunks, less per-chunk overhead); 2^21
# was within ~10 % of the best for each. (settings ``layout_chunk_elements``)


class BlockLayout:
    """Index bookkeeping shared by forward and backward for one (q, k, plan) triple.

    Work is organised in *rows*: one (batch element, plan head, query block) each, flattened to
    ``row = (b * Hp + hp) * Nqb + I``. A row holds the ``r * bq`` query rows of the query heads
    its plan head serves and gathers its own key blocks straight from the KV head that serves it
    (K/V are never repeated to Hq). Rows are processed in chunks of similar selection counts, so
    padding every row of a chunk to its longest costs little even when heads differ widely (one
    head near-dense, its neighbour at 0.1, as XAttention leaves them)."""

    def __init__(self, q_shape, k_shape, plan: BlockPlan, device):
        B, Hq, Nq, D = q_shape
        Hkv, Nk = k_shape[1], k_shape[2]
        self.B, self.Hq, self.Nq, self.D, self.Hkv, self.Nk = B, Hq, Nq, D, Hkv, Nk
        self.Hp = plan.heads  # plan heads: Hq or Hkv
        self.r = Hq // self.Hp  # query heads served by one plan head
        self.bq, self.bk = plan.block_q, plan.block_k
        self.Nqb = plan.num_q_blocks
        self.Nkb = cdiv(Nk, self.bk)
        self.offset = plan.offset
        self.causal = plan.causal
        self.indices = plan.kv_indices.reshape(B * self.Hp * self.Nqb, -1)
        self.counts = plan.kv_counts.reshape(-1)
        self.device = device

    def split(self, rows):
        """(batch element, plan head, KV head, query block) of each row."""
        I = rows % self.Nqb
        bh = rows // self.Nqb
        hp = bh % self.Hp
        return bh // self.Hp, hp, hp // (self.Hp // self.Hkv), I

    def chunks(self):
        """Yield (rows, kmax): rows (a long tensor) sized to settings ``layout_chunk_elements``, and
        the most key blocks any of them selects. Rows go in order of their selection count where that pads less than
        plan order by a tenth or more (XAttention's per-head densities, from near-dense to 0.05,
        padded a 3K-token layer to several times its pairs in plan order); otherwise in plan order,
        whose neighbouring rows share memory (a streaming plan's rows are all alike)."""
        per_slot = self.r * self.bq * self.bk  # score elements per (row, slot)
        counts = self.counts.cpu()
        ordered = torch.sort(counts, stable=True)
        plan_order = (self._split_counts(counts.tolist(), per_slot), None)
        by_count = (self._split_counts(ordered.values.tolist(), per_slot), ordered.indices)
        spans, order = by_count if padded_slots(by_count[0]) < 0.9 * padded_slots(plan_order[0]) else plan_order
        for c0, c1, kmax in spans:
            rows = torch.arange(c0, c1) if order is None else order[c0:c1]
            yield rows.to(self.device), kmax

    @staticmethod
    def _split_counts(counts: list, per_slot: int) -> list:
        """Greedy ``(c0, c1, kmax)`` spans of ``counts`` whose padded score size fits a chunk."""
        spans, c0, n = [], 0, len(counts)
        chunk_elements = settings.get("layout_chunk_elements")
        while c0 < n:
            c1, kmax = c0, 0
            while c1 < n:
                k_new = max(kmax, counts[c1])
                if c1 > c0 and (c1 - c0 + 1) * max(k_new, 1) * per_slot > chunk_elements:
                    break
                kmax, c1 = k_new, c1 + 1
            spans.append((c0, c1, kmax))
            c0 = c1
        return spans

    def keys(self, rows, kmax, key_padding_mask):
        """Selected blocks ``[C, kmax]`` and token positions ``[C, L]`` of their keys, with
        unusable keys (empty slot, past Nk, padding) moved to position ``BIG`` so that one
        comparison against the query position masks both them and the causal future."""
        blk = self.indices[rows, :kmax].long()
        slot_ok = torch.arange(kmax, device=self.device) < self.counts[rows, None]
        blk = torch.where(slot_ok, blk, 0)
        tok, ok = self._key_ok(rows, blk, slot_ok, key_padding_mask)
        first = 0 if key_padding_mask is not None else self._first_masked_slot(rows, blk, slot_ok)
        return blk, torch.where(ok, tok, self.BIG), first

    def _first_masked_slot(self, rows, blk, slot_ok) -> int:
        """Smallest slot in the chunk whose block is not entirely visible to every query of its
        row (empty slot, partial last block, or crossing the causal diagonal). Slots before it
        need no mask: indices are ascending, so masking is confined to the tail."""
        first_row = self.split(rows)[3][:, None] * self.bq + self.offset
        end = (blk + 1) * self.bk  # one past the block's last key
        needs = ~slot_ok | (end > self.Nk)
        if self.causal:
            needs = needs | (end - 1 > first_row)
        if not bool(needs.any()):
            return blk.shape[-1]
        first = torch.where(needs, torch.arange(blk.shape[-1], device=self.device), blk.shape[-1])
        return int(first.amin())

    BIG = 1 << 40

    def masked(self, rows, tok_eff):
        """Bool ``[C, r*bq, L]``: True where the key must be excluded."""
        within = torch.arange(self.r * self.bq, device=self.device) % self.bq
        qpos = self.split(rows)[3][:, None] * self.bq + within + self.offset
        if not self.causal:
            qpos = torch.full_like(qpos, self.BIG - 1)
        return tok_eff[:, None, :] > qpos[:, :, None]

    def gather(self, x_blocks, rows, blk):
        """Key blocks of ``x_blocks`` ``[B, Hkv, Nkb, bk, D]`` (``kv_blocks``) for each row:
        ``[C, L, D]``. One ``index_select`` of whole blocks (contiguous bk x D copies): advanced
        indexing with three index tensors gathered element by element, ~2 GB/s on the 2-core CPU,
        and was a third of the forward."""
        b, _, kvh, _ = self.split(rows)
        flat = ((b * self.Hkv + kvh) * self.Nkb)[:, None] + blk
        return x_blocks.view(-1, self.bk, self.D).index_select(0, flat.reshape(-1)).view(len(rows), -1, self.D)

    def kv_blocks(self, x):
        """``[B, Hkv, Nk, D]`` -> ``[B, Hkv, Nkb, bk, D]``, contiguous (one O(N) pad when
        Nk % bk != 0, one O(N) copy when ``x`` is a strided view)."""
        pad = self.Nkb * self.bk - self.Nk
        if pad:
            x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        return x.reshape(x.shape[0], x.shape[1], self.Nkb, self.bk, x.shape[3]).contiguous()

    def open_and_edge(self, rows, kmax, key_padding_mask):
        """Each row's selected slots split in two, for kernels that take a mask per key but not
        cheaply one per (query, key): *open* slots, whose keys every query of the row may see
        (up to key-level exclusions: empty slot, past Nk, padding), and *edge* slots, which cross
        the causal diagonal (the last one or two of a row: indices ascend). Returns
        ``(open_blk [C, Ko], open_ok [C, Ko*bk] bool)`` and ``(edge_blk [C, Ke], edge_tok
        [C, Ke*bk])`` with ``edge_tok`` as in ``keys`` (unusable keys at ``BIG``, for ``masked``)."""
        cnt = self.counts[rows]
        blk = self.indices[rows, :kmax].long()
        slot = torch.arange(kmax, device=self.device)
        slot_ok = slot < cnt[:, None]
        if self.causal:
            first_row = self.split(rows)[3][:, None] * self.bq + self.offset
            n_open = (slot_ok & ((blk + 1) * self.bk - 1 <= first_row)).sum(-1)
        else:
            n_open = cnt
        ko, ke = int(n_open.max()), int((cnt - n_open).max())
        open_blk = torch.where(slot_ok[:, :ko], blk[:, :ko], 0)
        open_ok = self._key_ok(rows, open_blk, slot[:ko] < n_open[:, None], key_padding_mask)[1]
        j = n_open[:, None] + slot[:ke]
        edge_slot_ok = j < cnt[:, None]
        edge_blk = torch.where(edge_slot_ok, blk.gather(1, j.clamp(max=max(kmax - 1, 0))), 0)
        tok, ok = self._key_ok(rows, edge_blk, edge_slot_ok, key_padding_mask)
        return (open_blk, open_ok), (edge_blk, torch.where(ok, tok, self.BIG))

    def diagonal_edges(self, rows, edge_blk, edge_tok, key_padding_mask) -> bool:
        """Whether every row's edge is exactly its own diagonal block, selected and whole: then
        the (query, key) mask is the same lower triangle for every row, which a kernel applies with
        ``is_causal`` instead of reading a mask. Needs aligned square blocks (bq == bk, offset a
        multiple of bk) and no padding mask; keys past Nk in the last block sit after every real
        query, so causality alone excludes them."""
        if not (self.causal and self.bq == self.bk and self.offset % self.bk == 0
                and key_padding_mask is None and edge_blk.shape[1] == 1):
            return False
        diag = self.split(rows)[3] + self.offset // self.bk
        return bool(((edge_blk[:, 0] == diag) & (edge_tok[:, 0] < self.BIG)).all())

    def _key_ok(self, rows, blk, slot_ok, key_padding_mask):
        """Token positions ``[C, L]`` of the slots' keys and whether each is a real key."""
        tok = (blk[..., None] * self.bk + torch.arange(self.bk, device=self.device)).flatten(-2)
        ok = slot_ok.repeat_interleave(self.bk, dim=-1) & (tok < self.Nk)
        if key_padding_mask is not None:
            b = self.split(rows)[0]
            ok = ok & key_padding_mask[b[:, None], tok.clamp(max=self.Nk - 1)]
        return tok, ok

    def _by_row(self, x):
        """``[B, Hq, Nq_pad, ...]`` viewed as ``[B, Hp, r, Nqb, bq, ...]``."""
        return x.view(self.B, self.Hp, self.r, self.Nqb, self.bq, *x.shape[3:])

    def q_rows(self, x, rows):
        """``[B, Hq, Nq_pad, ...]`` -> ``[C, r*bq, ...]``: the query rows of each row."""
        b, hp, _, I = self.split(rows)
        sl = self._by_row(x)[b, hp, :, I]  # advanced indices around a slice: [C, r, bq, ...]
        return sl.reshape(len(rows), self.r * self.bq, *x.shape[3:])

    def put_rows(self, dst, val, rows):
        """Inverse of ``q_rows``: write ``val`` into ``dst`` (contiguous) at ``rows``."""
        b, hp, _, I = self.split(rows)
        self._by_row(dst)[b, hp, :, I] = val.view(len(rows), self.r, self.bq, *val.shape[2:])

    def pad_q(self, x):
        pad = self.Nqb * self.bq - self.Nq
        if pad == 0:
            return x.contiguous()
        return torch.nn.functional.pad(x, (0, 0, 0, pad) if x.ndim == 4 else (0, pad))


def padded_slots(spans) -> int:
    """Slots a chunking computes, padding included."""
    return sum((c1 - c0) * kmax for c0, c1, kmax in spans)
