"""Left padding, moved out of the way of block grids.

Block plans tile keys from position 0 and query blocks from row 0, and ``streaming`` puts its sink
on the first block. A left-padded sequence (what batched ``generate()`` in Hugging Face builds)
starts at position ``s > 0``, so its blocks, strides and sink would sit on the padding and the
plan would differ from the same prompt alone. ``StartAligned`` rolls each sequence of a prefill
batch so that its first real token is row 0 (left padding becomes right padding, which every
selector handles exactly), and rolls the output back. It is a gather along the sequence, O(N D)
per tensor, built on the device: no host synchronisation.

Why prefill only: with Nq < Nk (decode, chunked prefill) the queries are the *last* rows of every
sequence, so once each sequence starts at 0 they no longer share one bottom-right causal offset.
Callers that need exactness there run such calls one sequence at a time (``first_real``).
"""

from __future__ import annotations

import torch


def first_real(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` int64: position of each sequence's first real token (0 when it has none)."""
    return key_padding_mask.to(torch.int8).argmax(-1)


class StartAligned:
    """Rolls ``[B, ..., N, ...]`` tensors so each sequence's first real token moves to position 0.

    ``x_aligned[b, ..., n] = x[b, ..., (n + s_b) mod N]``; ``restore`` applies the inverse.
    """

    def __init__(self, key_padding_mask: torch.Tensor):
        if key_padding_mask.ndim != 2:
            raise ValueError(f"key_padding_mask must be [B, N], got {tuple(key_padding_mask.shape)}")
        B, N = key_padding_mask.shape
        self.n = N
        pos = torch.arange(N, device=key_padding_mask.device)
        start = first_real(key_padding_mask)[:, None]
        self._fwd = (pos[None, :] + start) % N  # [B, N]: source of each aligned position
        self._inv = (pos[None, :] - start) % N  # [B, N]: aligned position of each source
        self.mask = key_padding_mask.gather(1, self._fwd)

    def _take(self, x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
        if x.shape[dim] != self.n:
            raise ValueError(f"expected {self.n} positions in dim {dim}, got shape {tuple(x.shape)}")
        shape = [1] * x.ndim
        shape[0], shape[dim] = x.shape[0], self.n
        return x.gather(dim, index.view(shape).expand(*x.shape[:dim], self.n, *x.shape[dim + 1:]))

    def align(self, x: torch.Tensor, dim: int = 2) -> torch.Tensor:
        return self._take(x, self._fwd, dim)

    def restore(self, x: torch.Tensor, dim: int = 2) -> torch.Tensor:
        return self._take(x, self._inv, dim)
