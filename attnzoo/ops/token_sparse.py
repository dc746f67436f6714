"""Token Sparse Attention's compress / decompress: per-head gather and scatter of rows.

``compress`` gathers, for each plan head, the Q, K and V rows at the kept positions; ordinary
causal attention then runs on the shorter tensors (kept indices are ascending, so the causal
rule on compressed tensors is the original one restricted to kept tokens). ``decompress``
scatters the outputs back into zeros of full length: dropped tokens get exactly 0.

Heads that keep fewer tokens than the longest head are padded at the *end* of the compressed
sequence; causal attention never lets a real row see those slots, and their outputs are
dropped by ``decompress``, so no mask is needed.
"""

from __future__ import annotations

import torch

from ..plans import TokenPlan
from ..settings import value_checks
from ._checks import check_qkv
from .dense import dense


def _check_plan(q, k, plan, key_padding_mask=None):
    if not isinstance(plan, TokenPlan):
        raise TypeError(f"plan must be a TokenPlan, got {type(plan).__name__}")
    plan.validate(q, k)
    if key_padding_mask is not None and value_checks(q.device):  # a host read: where values are read
        kept_real = key_padding_mask[:, None, :].expand(-1, plan.heads, -1).gather(
            -1, plan.indices.long().clamp(min=0))
        if (plan.valid() & ~kept_real).any():
            raise ValueError("TokenPlan keeps padding positions (key_padding_mask is False there)")


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows of x ``[B, Hx, N, D]`` at idx ``[B, Hi, N']`` where Hi is a multiple of Hx.

    When Hi > Hx (a per-query-head plan over shared K/V heads) x is broadcast through a
    stride-0 view, so only the kept rows are copied, never the whole K/V.
    """
    B, Hx, N, D = x.shape
    Hi, n = idx.shape[1], idx.shape[2]
    if Hi % Hx:
        raise ValueError(f"cannot gather {Hi} index heads from {Hx} tensor heads")
    g = Hi // Hx
    xs = x[:, :, None].expand(B, Hx, g, N, D)
    ix = idx.view(B, Hx, g, n, 1).expand(B, Hx, g, n, D)
    return xs.gather(3, ix).reshape(B, Hi, n, D)


def compress(q, k, v, plan: TokenPlan, *, key_padding_mask=None):
    """Gather kept rows. Returns ``(qc, kc, vc)``.

    ``qc`` is ``[B, Hq, N', D]``. ``kc``/``vc`` are ``[B, Hkv, N', D]`` for a per-KV-head plan,
    ``[B, Hq, N', D]`` for a per-query-head plan (each query head keeps its own keys).
    """
    check_qkv(q, k, v, causal=True, key_padding_mask=key_padding_mask)
    _check_plan(q, k, plan, key_padding_mask)
    idx = plan.indices.long().clamp(min=0)
    Hq, Hp = q.shape[1], plan.heads
    q_idx = idx.repeat_interleave(Hq // Hp, dim=1) if Hp != Hq else idx
    return _gather_rows(q, q_idx), _gather_rows(k, idx), _gather_rows(v, idx)


def decompress(out: torch.Tensor, plan: TokenPlan, seq_len: int | None = None, lse=None):
    """Scatter ``out`` ``[B, Hq, N', D]`` back to ``[B, Hq, seq_len, D]`` (zeros elsewhere).

    With ``lse`` (``[B, Hq, N']``) also returns the full-length lse, -inf at dropped rows.
    """
    if not isinstance(plan, TokenPlan):
        raise TypeError(f"plan must be a TokenPlan, got {type(plan).__name__}")
    if value_checks(out.device if isinstance(out, torch.Tensor) else "cpu"):  # host reads (see settings)
        plan.check_indices()
    seq_len = plan.seq_len if seq_len is None else seq_len
    if isinstance(seq_len, bool) or not isinstance(seq_len, int):
        raise TypeError(f"seq_len must be an int or None, got {type(seq_len).__name__}")
    if seq_len != plan.seq_len:
        raise ValueError(f"seq_len {seq_len} does not match plan.seq_len {plan.seq_len}")
    if not isinstance(out, torch.Tensor) or out.ndim != 4:
        raise ValueError("out must be a tensor [B, Hq, N', D]")
    B, Hq, n, D = out.shape
    if out.device != plan.indices.device:
        raise ValueError(f"out is on {out.device}, the plan is on {plan.indices.device}")
    if lse is not None and (not isinstance(lse, torch.Tensor) or tuple(lse.shape) != (B, Hq, n)):
        raise ValueError(f"lse must be a tensor [B, Hq, N'] = {(B, Hq, n)}, got "
                         f"{tuple(lse.shape) if isinstance(lse, torch.Tensor) else type(lse).__name__}")
    if B != plan.batch or Hq % plan.heads or n != plan.max_len:
        raise ValueError(
            f"out {tuple(out.shape)} does not match plan (batch={plan.batch}, heads={plan.heads}, "
            f"max_len={plan.max_len})")
    g = Hq // plan.heads
    # invalid slots scatter into a spare column that is dropped
    idx = torch.where(plan.valid(), plan.indices.long(), seq_len)
    idx = idx.repeat_interleave(g, dim=1) if g > 1 else idx
    full = out.new_zeros(B, Hq, seq_len + 1, D).scatter(2, idx[..., None].expand(-1, -1, -1, D), out)
    full = full[:, :, :seq_len]
    if lse is None:
        return full
    lse_full = lse.new_full((B, Hq, seq_len + 1), float("-inf")).scatter(2, idx, lse)
    return full, lse_full[:, :, :seq_len]


def attention(q, k, v, plan: TokenPlan, *, key_padding_mask=None, scale=None,
                 return_lse: bool = False, backend: str | None = None):
    """compress -> causal dense attention on kept tokens -> decompress. A plan as wide as the
    sequence (sized without reading the kept counts) tells the dense op each head's kept count
    (``row_lengths``), so a backend may skip the padded slots; a narrower plan's width was sized to
    the counts, and the fastest dense kernel attends over all of it."""
    qc, kc, vc = compress(q, k, v, plan, key_padding_mask=key_padding_mask)
    rows = plan.lengths if plan.max_len == plan.seq_len else None
    kw = dict(causal=True, scale=scale, backend=backend, row_lengths=rows)
    if not return_lse:  # asking for lse would rule out the fastest dense kernels on CUDA
        return decompress(dense(qc, kc, vc, **kw), plan, q.shape[2])
    oc, lc = dense(qc, kc, vc, return_lse=True, **kw)
    return decompress(oc, plan, q.shape[2], lse=lc)
