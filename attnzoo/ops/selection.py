"""Block selection from scores, written straight into a plan's index lists (an op with backends).

Two rules, both per (batch, head, query block) row, both on the device with static shapes:

- ``by_mass`` (XAttention): keep the forced blocks (sink 0 and the diagonal, when asked), then the
  other causally visible blocks in descending score while the mass kept *before* adding one is
  below ``tau[h]`` x the row's total (``tau >= 1`` keeps every visible block); ties go to the lower
  block.
- ``top_n`` (top-k blocks): from scores that hold -1 where a block is not a candidate, keep the
  ``n_pick[I]`` largest (ties to the lower block), plus the forced blocks ``[own_lo[I], last[I]]``
  (those crossing the causal frontier).

Both return ``(kv_indices [B, H, Nqb, Kmax] int32, kv_counts [B, H, Nqb] int32)`` with ascending
indices (slots past the count are unspecified). Backends: ``torch`` (sorts, cumsum, one more sort
of the short list) and ``triton`` (``kernels.triton_select``: one program per row finds the cut by a
binary search over the scores' bits, no sort, and writes the index list).
"""

from __future__ import annotations

import torch

from .dispatch import Backend, Tolerance, choose, make_request, register_backend

# a selection is exact: both backends must return the same blocks (tests compare plans for equality)
EXACT = {dt: Tolerance(out=1e-12, lse=1e-12, grad=1e-12) for dt in (torch.float32, torch.float64)}

_ABSENT = 1 << 40  # sorts after every block index


def causal_block_sets(last_visible: torch.Tensor, num_kv_blocks: int, keep_sink: bool = True,
                      keep_diagonal: bool = True):
    """Bool ``[C, Nkb]`` masks for query blocks whose right-most visible key block is
    ``last_visible`` ``[C]``: the causally visible blocks, and those always kept (sink, diagonal)."""
    col = torch.arange(num_kv_blocks, device=last_visible.device)[None, :]
    visible = col <= last_visible[:, None]
    forced = torch.zeros_like(visible)
    if keep_sink:
        forced = forced | (col == 0)
    if keep_diagonal:
        forced = forced | (col == last_visible[:, None])
    return visible, forced & visible


def _finish(picked: torch.Tensor, forced_idx: torch.Tensor, counts: torch.Tensor, width: int):
    """Ascending index lists from picked blocks (``_ABSENT`` elsewhere) and forced ones."""
    idx = torch.cat([picked, forced_idx.expand(*picked.shape[:2], -1, -1)], -1).sort(-1).values[..., :width]
    return torch.where(idx == _ABSENT, -1, idx).to(torch.int32), counts


def _torch_by_mass(w, tau, keep_all, last, keep_sink: bool, keep_diagonal: bool):
    nkb = w.shape[-1]
    visible, forced = causal_block_sets(last, nkb, keep_sink, keep_diagonal)
    w64 = w.double()  # masses in fp64: rounding cannot move the threshold between backends
    target = tau.double() * w64.sum(-1, keepdim=True)
    forced_mass = (w64 * forced).sum(-1, keepdim=True)
    vals, order = torch.sort(w.masked_fill(~visible | forced, -1.0), dim=-1, descending=True, stable=True)
    mass = vals.double().clamp(min=0)
    take = (vals >= 0) & ((mass.cumsum(-1) - mass + forced_mass < target) | keep_all)
    sink = torch.full_like(last, 0 if keep_sink else _ABSENT)
    diag = last if keep_diagonal else torch.full_like(last, _ABSENT)
    diag = torch.where((last == 0) & keep_sink, _ABSENT, diag)
    counts = take.sum(-1, dtype=torch.int32) + forced.sum(-1, dtype=torch.int32)
    return _finish(torch.where(take, order, _ABSENT), torch.stack([sink, diag], -1), counts, nkb)


def _torch_top_n(scores, n_pick, own_lo, last, width: int):
    from .pooled import ranking_keys

    k = min(int(width), scores.shape[-1])
    if scores.dtype == torch.float64:  # exact comparisons: fp64 does not fit a packed key
        top = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
        ok = scores.gather(-1, top)
    else:
        ok, top = ranking_keys(scores, scores >= 0).topk(k, dim=-1)  # ties to the lower block
    valid = (ok >= 0) & (torch.arange(k, device=scores.device) < n_pick[:, None])
    own_at = lambda c: torch.where((c >= own_lo) & (c >= 0), c, _ABSENT)  # noqa: E731
    forced = torch.stack([own_at(last - 1), own_at(last)], -1)
    counts = valid.sum(-1, dtype=torch.int32) + (last - own_lo + 1).clamp(min=0).to(torch.int32)
    return _finish(torch.where(valid, top, _ABSENT), forced, counts, width + 2)


def _torch(rule: str, scores, **kw):
    return (_torch_by_mass if rule == "by_mass" else _torch_top_n)(scores, **kw)


register_backend(Backend(
    op="block_select", name="torch", fn=_torch, devices=("cpu", "cuda"),
    dtypes=(torch.float32, torch.float64), plan_kinds=("scores",), backward=False, lse=False,
    tolerances=EXACT, description="torch: sort, cumsum / topk, and one sort of the short index list"))


def _request(scores):
    return make_request("block_select", scores[:, :, :, None], scores[:, :, :1, None], scores[:, :, :1, None],
                        "scores", return_lse=False, key_padding_mask=None, causal=False)


def by_mass(w: torch.Tensor, tau: torch.Tensor, keep_all: torch.Tensor, last: torch.Tensor, *,
            keep_sink: bool = True, keep_diagonal: bool = True, backend: str | None = None):
    """XAttention's rule on block scores ``w`` ``[B, H, Nqb, Nkb]`` (fp32 or fp64). ``tau`` and
    ``keep_all`` are ``[1, H, 1, 1]`` (threshold, tau >= 1); ``last`` ``[Nqb]`` the last visible block."""
    impl = choose(_request(w), backend)
    return impl.fn("by_mass", w, tau=tau, keep_all=keep_all, last=last, keep_sink=keep_sink,
                   keep_diagonal=keep_diagonal)


def keep_rows(idx: torch.Tensor, counts: torch.Tensor, rows: torch.Tensor, last: torch.Tensor):
    """Index lists ``[B, H, Nqb, W]`` / counts with the query blocks where ``rows`` ``[B|1, Nqb]`` is
    True widened to every causally visible block (``W`` must hold them: ``by_mass`` lists are
    ``Nkb`` wide). On the device, no host sync: the rows come from padding masks."""
    full = torch.arange(idx.shape[-1], device=idx.device, dtype=idx.dtype)
    idx = torch.where(rows[:, None, :, None], full, idx)
    counts = torch.where(rows[:, None, :], (last + 1).to(counts.dtype), counts)
    return idx, counts


def top_n(scores: torch.Tensor, n_pick: torch.Tensor, own_lo: torch.Tensor, last: torch.Tensor, *, width: int,
          backend: str | None = None):
    """The top-k rule on scores ``[B, H, Nqb, Nkb]`` (-1 at non-candidates): ``n_pick``, ``own_lo``,
    ``last`` are ``[Nqb]``; ``width`` bounds the picked blocks (the list holds ``width + 2``)."""
    impl = choose(_request(scores), backend)
    return impl.fn("top_n", scores, n_pick=n_pick, own_lo=own_lo, last=last, width=width)
