"""Spend a density budget across heads: XAttention thresholds that keep the most attention mass
for a given mean density (``attnzoo calibrate --density-budget``).

A fixed recall target per head (``calibrate_thresholds``) makes the stack's density whatever the
hardest heads need: on the YaRN-extended SmolLM2, layers 3-10 spread their attention at 16K-32K,
so recall 0.8 there already costs every block and no target fitted a 0.35 budget (density 0.52
at the lowest; bench/results/2026-12-07-h100-fidelity-per-length). Here each head's threshold is
chosen instead, jointly:

1. ``head_curves``: per head, for every tau in a grid, the share of the true attention mass that
   XAttention's selection keeps (mean over query-block rows) and the blocks it keeps (over the
   causal ones) -- the selector's own rule (``by_mass``) applied to the estimated block scores,
   scored against the exact block mass, for all taus at once (one sort, one searchsorted);
2. ``allocate``: the Lagrangian choice. For a price ``lam`` per unit of density every head takes
   the tau maximising ``recall - lam * density``; ``lam`` is bisected to the cheapest price whose
   mean density fits the budget. On concave curves that is the budget's best mean recall up to one
   tau step per head (the budget a discrete grid cannot spend exactly is left over); mean recall is
   the criterion XAttention's authors calibrate to, and issue 34's "share of full's mass per head".
"""

from __future__ import annotations

import math

import torch

from .ops.selection import causal_block_sets
from .plans import last_visible_block

__all__ = ["TAU_GRID", "head_curves", "allocate", "threshold_curves", "budget_thresholds"]

# dense near 1, where recall and density move fastest: 1 - 0.9 ... 1 - 1e-4, then 1 (every block)
TAU_GRID = tuple(round(1 - 10 ** (math.log10(0.9) + (-4 - math.log10(0.9)) * i / 55), 6) for i in range(56)) + (1.0,)


@torch.no_grad()
def head_curves(w: torch.Tensor, exact: torch.Tensor, q_len: int, kv_len: int, block_size: int,
                taus=TAU_GRID) -> dict[str, torch.Tensor]:
    """Sums over query-block rows, per head (batch folded in), for each tau of ``taus``: ``recall``
    ``[H, T]`` (share of the row's exact mass kept, summed over rows), ``kept`` ``[H, T]`` blocks
    kept, and ``rows`` / ``visible`` ``[H]``; divide to get means (sums so texts add up).

    ``w``: XAttention's estimated block scores, ``exact``: true block mass (``exact_block_mass``),
    both ``[B, H, Nqb, Nkb]``. Sink and diagonal blocks are always kept, as the selector does."""
    if w.shape != exact.shape or w.ndim != 4:
        raise ValueError(f"w and exact must both be [B, H, Nqb, Nkb], got {tuple(w.shape)} and {tuple(exact.shape)}")
    tau = torch.as_tensor(taus, dtype=torch.float64, device=w.device)
    if tau.ndim != 1 or not bool(((tau > 0) & (tau <= 1)).all()):
        raise ValueError(f"taus must be values in (0, 1], got {taus!r}")
    last = last_visible_block(q_len, kv_len, block_size, block_size, w.device)
    visible, forced = causal_block_sets(last, w.shape[-1])
    w64, ex = w.double(), exact.double()
    # the selector's rule (ops.selection._torch_by_mass): blocks in descending W while the W mass
    # before adding one (forced blocks included) is below tau x the row's W mass
    vals, order = torch.sort(w.masked_fill(~visible | forced, -1.0), dim=-1, descending=True, stable=True)
    mass = vals.double().clamp(min=0)
    before = torch.where(vals >= 0, mass.cumsum(-1) - mass + (w64 * forced).sum(-1, keepdim=True), math.inf)
    target = w64.sum(-1, keepdim=True) * tau  # [B, H, R, T]
    n_other = (vals >= 0).sum(-1, keepdim=True)
    take = torch.where(tau >= 1, n_other, torch.searchsorted(before.contiguous(), target.contiguous()))
    gained = torch.cat([torch.zeros_like(mass[..., :1]), (ex.gather(-1, order) * (vals >= 0)).cumsum(-1)], -1)
    row_mass = ex.sum(-1, keepdim=True)
    kept_mass = (ex * forced).sum(-1, keepdim=True) + gained.gather(-1, take)
    real = row_mass > 0  # padded query rows hold no mass and rate nothing
    recall = torch.where(real, kept_mass / row_mass.clamp_min(1e-300), 0.0)
    kept = (take + forced.sum(-1)[:, None]) * real
    return {"recall": recall.sum((0, 2)), "kept": kept.sum((0, 2)).double(),
            "rows": real.sum((0, 2, 3)).double(), "visible": (visible.sum(-1) * real[..., 0]).sum((0, 2)).double()}


def allocate(recall: torch.Tensor, density: torch.Tensor, budget: float, iters: int = 64) -> torch.Tensor:
    """Per head, the index into the tau grid: the heads' mean density at most ``budget`` with the
    most mean recall (Lagrangian; within one tau step of the optimum on concave curves).
    ``recall`` / ``density``: ``[N, T]``, density nondecreasing in T. Where even the sparsest choice
    exceeds the budget, that one."""
    if recall.shape != density.shape or recall.ndim != 2:
        raise ValueError(f"recall and density must both be [heads, taus], got {tuple(recall.shape)} and "
                         f"{tuple(density.shape)}")
    if not 0 < budget <= 1:
        raise ValueError(f"budget must be a density in (0, 1], got {budget}")
    r, d = recall.double(), density.double()

    def pick(lam: float) -> torch.Tensor:
        gain = r - lam * d
        # ties to the sparser tau: the lowest index among the maxima (density is nondecreasing)
        return (gain >= gain.amax(-1, keepdim=True) - 1e-12).double().argmax(-1)

    def fits(idx) -> bool:  # a relative 1e-6: fp32 densities need not sum exactly to a decimal budget
        return float(d.gather(-1, idx[:, None]).mean()) <= budget * (1 + 1e-6)

    if fits(pick(0.0)):
        return pick(0.0)
    lo, hi = 0.0, 1.0
    while not fits(pick(hi)) and hi < 1e12:
        hi *= 4
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fits(pick(mid)) else (mid, hi)
    return pick(hi)


@torch.no_grad()
def threshold_curves(model, calibration_inputs, *, stride: int = 8, block_size: int = 64, taus=TAU_GRID,
                     progress: bool = False) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer: (recall, density)}``, each ``[H, T]``: ``head_curves`` of every attention layer as
    means per calibration input, then over inputs (each input weighs the same, whatever its length)."""
    from .calibration import layer_block_masses

    sums: dict[int, list] = {}
    for layer, w, exact, q_len, kv_len in layer_block_masses(model, calibration_inputs, stride=stride,
                                                              block_size=block_size, progress=progress):
        c = head_curves(w, exact, q_len, kv_len, block_size, taus)
        acc = sums.setdefault(layer, [0, 0, 0])
        acc[0] = acc[0] + (c["recall"] / c["rows"].clamp_min(1)[:, None]).cpu()
        acc[1] = acc[1] + (c["kept"] / c["visible"].clamp_min(1)[:, None]).cpu()
        acc[2] += 1
    return {layer: (r / n, d / n) for layer, (r, d, n) in sorted(sums.items())}


def budget_thresholds(curves: dict, density_budget: float, *, stride: int, block_size: int, dense_layers=(),
                      taus=TAU_GRID) -> dict:
    """The calibration whose heads outside ``dense_layers`` average ``density_budget`` of the
    causal blocks on ``curves`` (``threshold_curves``) with the most mean recall; dense layers get
    tau 1 and spend none of it. ``expected``: the curves' mean recall and density of the choice."""
    dense = {int(i) for i in dense_layers}
    sparse = [i for i in sorted(curves) if i not in dense]
    if not sparse:
        raise ValueError(f"dense_layers {sorted(dense)} leave no layer to calibrate")
    heads = curves[sparse[0]][0].shape[0]
    pick = allocate(torch.cat([curves[i][0] for i in sparse]), torch.cat([curves[i][1] for i in sparse]),
                    density_budget)
    chosen = {i: pick[n * heads:(n + 1) * heads, None] for n, i in enumerate(sparse)}
    grid = torch.as_tensor(taus, dtype=torch.float64)
    at = {i: (curves[i][0].gather(-1, chosen[i])[:, 0], curves[i][1].gather(-1, chosen[i])[:, 0]) for i in sparse}
    mean = lambda j: round(float(torch.cat([at[i][j] for i in sparse]).mean()), 4)  # noqa: E731
    return {
        "method": "xattention_thresholds",
        "stride": stride,
        "block_size": block_size,
        "density_budget": round(float(density_budget), 4),
        "thresholds": {i: [1.0] * heads if i in dense else [round(float(t), 6) for t in grid[chosen[i][:, 0]]]
                       for i in sorted(curves)},
        "expected": {"recall": mean(0), "density": mean(1),
                     "per_layer": {i: {"recall": round(float(at[i][0].mean()), 4),
                                       "density": round(float(at[i][1].mean()), 4)} for i in sparse}},
    }
