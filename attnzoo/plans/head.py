"""Per-head plans: a router's decision (``HeadPlan``) and a routed layer's modes (``MixedPlan``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..settings import value_checks
from .block import BlockPlan
from .geometry import check_causal_lengths, check_index_tensor, check_int, check_qk_heads, streaming_block_mask

MODES = ("dense", "streaming", "block")


@dataclass(frozen=True, repr=False, eq=False)
class MixedPlan:
    """One mode per (batch, head) — what a routed layer computes, for single-launch kernels.

    ``mode[b, h]`` indexes ``MODES``: dense (every causal block), streaming (the ``streaming``
    selector's sink + local rule with ``sink[b, h]``/``local[b, h]`` tokens, given as ranges,
    not index lists) or block (``block``'s indices for that head; its other rows are ignored).
    Heads run over Hq, or Hkv when the plan is shared by each query group. Every mode uses the
    plan's one block size.
    """

    mode: torch.Tensor  # [B, H] int
    sink: torch.Tensor  # [B, H] tokens (streaming heads)
    local: torch.Tensor  # [B, H] tokens (streaming heads)
    block: BlockPlan | None
    block_size: int
    q_len: int
    kv_len: int
    causal: bool = True

    kind = "mixed"

    def __post_init__(self):
        for name in ("block_size", "q_len", "kv_len"):
            check_int(name, getattr(self, name))
        check_causal_lengths(self.q_len, self.kv_len, self.causal)
        for name in ("mode", "sink", "local"):
            check_index_tensor(name, getattr(self, name), 2)
            if getattr(self, name).shape != self.mode.shape:
                raise ValueError(f"{name} must be [B, H] = {tuple(self.mode.shape)}, "
                                 f"got {tuple(getattr(self, name).shape)}")
        if self.block is not None:
            b = self.block
            if (b.kv_counts.shape[:2] != self.mode.shape or (b.block_q, b.block_k) != (self.block_size,) * 2
                    or (b.q_len, b.kv_len, b.causal) != (self.q_len, self.kv_len, self.causal)):
                raise ValueError(
                    f"block plan (heads {tuple(b.kv_counts.shape[:2])}, block {b.block_q}x{b.block_k}, q_len "
                    f"{b.q_len}, kv_len {b.kv_len}, causal {b.causal}) does not match the mixed plan (heads "
                    f"{tuple(self.mode.shape)}, block {self.block_size}, q_len {self.q_len}, kv_len "
                    f"{self.kv_len}, causal {self.causal})")
        if value_checks(self.mode.device):
            self.check_values()

    def check_values(self) -> None:
        """Content checks (they read the mode/sink/local values: a host sync on a GPU)."""
        if ((self.mode < 0) | (self.mode >= len(MODES))).any():
            raise ValueError(f"mode values must index {MODES}")
        if ((self.sink < 0) | (self.local < 0)).any():
            raise ValueError("sink and local must be >= 0 tokens")
        streaming = (self.mode == MODES.index("streaming")).any()
        if streaming and not self.causal:
            raise ValueError("streaming heads need causal=True")
        if (self.mode == MODES.index("block")).any() and self.block is None:
            raise ValueError("block-mode heads need a BlockPlan in `block`")

    @property
    def batch(self) -> int:
        return self.mode.shape[0]

    @property
    def heads(self) -> int:
        return self.mode.shape[1]

    def validate(self, q: torch.Tensor, k: torch.Tensor) -> None:
        if q.shape[2] != self.q_len or k.shape[2] != self.kv_len or q.shape[0] != self.batch:
            raise ValueError(f"plan is for batch {self.batch}, q_len={self.q_len}, kv_len={self.kv_len}; "
                             f"got q {tuple(q.shape)} and k {tuple(k.shape)}")
        check_qk_heads(q, k, self.heads, "plan (mode)")
        if self.mode.device != q.device:
            raise ValueError(f"plan is on {self.mode.device}, q is on {q.device}")
        if value_checks(q.device):
            self.check_values()
            if self.block is not None:
                self.block.check_indices()

    def to_block_plan(self) -> BlockPlan:
        """The same pattern as index lists (block-level tensors, (N/b)^2 per head)."""
        dev, bs = self.mode.device, self.block_size
        dense = BlockPlan.full(1, 1, self.q_len, self.kv_len, bs, bs, self.causal, dev).to_block_mask()[0, 0]
        stream = streaming_block_mask(self.q_len, self.kv_len, bs, self.sink, self.local, dev)
        mask = torch.where((self.mode == MODES.index("streaming"))[..., None, None], stream, dense)
        if self.block is not None:
            mask = torch.where((self.mode == MODES.index("block"))[..., None, None],
                               self.block.to_block_mask(), mask)
        return BlockPlan.from_block_mask(mask, bs, bs, self.q_len, self.kv_len, self.causal)

    def to_mask(self) -> torch.Tensor:
        """Dense bool ``[B, H, Nq, Nk]``. Tests / small N only."""
        return self.to_block_plan().to_mask()

    def density(self, reduce: bool = True):
        return self.to_block_plan().density(reduce)

    def __repr__(self) -> str:
        n = self.mode.numel()
        shares = ", ".join(f"{m}={float((self.mode == i).sum()) / n:.2f}" for i, m in enumerate(MODES))
        return (f"MixedPlan(batch={self.batch}, heads={self.heads}, q_len={self.q_len}, kv_len={self.kv_len}, "
                f"block={self.block_size}, causal={self.causal}, {shares})")


@dataclass(frozen=True, repr=False, eq=False)
class HeadPlan:
    """Which branch each (batch, KV head) runs — a router's output. ``branch`` is ``[B, Hkv]``."""

    branch: torch.Tensor
    labels: tuple[str, ...]

    kind = "head"

    def __post_init__(self):
        check_index_tensor("branch", self.branch, 2)
        if not isinstance(self.labels, tuple) or not all(isinstance(x, str) for x in self.labels):
            raise TypeError("labels must be a tuple of branch names")
        if len(self.labels) < 1 or len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be non-empty and unique, got {self.labels}")

    @property
    def num_branches(self) -> int:
        return len(self.labels)

    def validate(self, q: torch.Tensor, k: torch.Tensor) -> None:
        if tuple(self.branch.shape) != (k.shape[0], k.shape[1]):
            raise ValueError(
                f"HeadPlan.branch must be [B, Hkv] = {(k.shape[0], k.shape[1])}, "
                f"got {tuple(self.branch.shape)}"
            )
        if value_checks(self.branch.device) and ((self.branch < 0) | (self.branch >= self.num_branches)).any():
            raise ValueError(f"HeadPlan.branch values must lie in [0, {self.num_branches})")

    def select(self, b: int) -> HeadPlan:
        """The plan of batch element ``b`` alone (batch 1)."""
        return HeadPlan(self.branch[b:b + 1], self.labels)

    def to_mask(self) -> torch.Tensor:
        """One-hot bool ``[B, Hkv, num_branches]``."""
        return torch.nn.functional.one_hot(self.branch.long(), self.num_branches).bool()

    def share(self) -> dict[str, float]:
        """Fraction of (batch, KV head) slots that run each branch."""
        m = self.to_mask().double().mean((0, 1))
        return {label: float(m[i]) for i, label in enumerate(self.labels)}

    def density(self, branch_density: dict[str, float] | None = None) -> float:
        """Mean density over heads given each branch's density (dense branches = 1.0)."""
        branch_density = branch_density or {}
        return sum(s * branch_density.get(lab, 1.0) for lab, s in self.share().items())

    def __repr__(self) -> str:
        shares = ", ".join(f"{k}={v:.2f}" for k, v in self.share().items())
        return f"HeadPlan(batch={self.branch.shape[0]}, kv_heads={self.branch.shape[1]}, {shares})"
