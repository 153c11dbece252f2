"""The DMF head: dynamic sampling, meta-filter, alignment ODE and meta-classifier.

Two forms compute the same scores:

- factored (the product): the support side is computed once per class into a `ClassBank`; each
  (query, class) pair then only adds two offset terms, samples the projected taps bilinearly with
  `F.grid_sample` (zeros outside the map, DCN v1), and (for k = 1) integrates in group space.
- literal (the reference): the paper read literally, one offset conv and one
  `torchvision.ops.deform_conv2d` per pair and the ODE in channel space.

Both run the same solver functions from `dmf_deploy.solvers`. Exported head graphs compute the
factored form from standard ONNX ops instead of GridSample: see `dmf_deploy.bundle_head`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dmf_deploy.solvers import linear_growth, solve

TAPS = 9  # the 3x3 deformable kernel
TAP_SHIFTS = tuple((ty - 1, tx - 1) for ty in range(3) for tx in range(3))
MAX_FILTER = 1.0  # filters are sigmoids: the k = 1 ODE's rates lie in (0, 1) (see `linear_growth`)


class ClassBank(NamedTuple):
    """Everything the head needs of N classes; independent of the solver."""

    support_offset: torch.Tensor  # [N, 18, h, w]  support half of the offset conv
    tap_projections: torch.Tensor  # [N, 9, G*k*k, h, w]  W_t . S per tap of the deformable conv
    # (bundles store the bank in another layout: see `dmf_deploy.bundle_head.bundle_bank`)
    class_weight: torch.Tensor  # [N, C]  meta-classifier weight: mean of the L2-normalised prototype


class DMFHead(nn.Module):
    def __init__(
        self,
        channels: int,
        groups: int,
        kernel: int,
        official_filter_order: bool = False,
        dynamic_sampling: bool = True,
    ) -> None:
        super().__init__()
        self.channels, self.groups, self.kernel = channels, groups, kernel
        self.official_filter_order = official_filter_order
        # Without dynamic sampling every offset is zero: the taps read the plain 3x3 neighbourhood.
        self.off_conv: nn.Conv2d | None = None
        if dynamic_sampling:
            self.off_conv = nn.Conv2d(2 * channels, 2 * TAPS, 5, padding=2, bias=False)
        self.kernel_conv = nn.Conv2d(channels, groups * kernel * kernel, 3, padding=1, bias=False)

    # ----- support side: once per class --------------------------------------------------------
    def class_bank(self, prototypes: torch.Tensor) -> ClassBank:
        n, c, h, w = prototypes.shape
        if self.off_conv is None:
            support_offset = prototypes.new_zeros(n, 2 * TAPS, h, w)
        else:
            support_offset = F.conv2d(prototypes, self.off_conv.weight[:, self.channels :], padding=2)
        # The deformable conv is linear in the support map, so project it per tap first:
        # P_t = W[:, :, t] . S, a 1x1 conv per tap; sampling P_t equals sampling S then projecting.
        per_tap = self.kernel_conv.weight.reshape(-1, c, TAPS).permute(2, 0, 1)  # [9, GK, C]
        tap_projections = torch.matmul(per_tap.unsqueeze(0), prototypes.reshape(n, 1, c, h * w))
        tap_projections = tap_projections.reshape(n, TAPS, -1, h, w)
        class_weight = F.normalize(prototypes, p=2, dim=1, eps=1e-12).mean(dim=(2, 3))
        return ClassBank(support_offset, tap_projections, class_weight)

    # ----- query side ---------------------------------------------------------------------------
    def query_offset(self, query: torch.Tensor) -> torch.Tensor:
        if self.off_conv is None:
            q, _, h, w = query.shape
            return query.new_zeros(q, 2 * TAPS, h, w)
        return F.conv2d(query, self.off_conv.weight[:, : self.channels], padding=2)

    def sampling_positions(self, query: torch.Tensor, bank: ClassBank) -> tuple[torch.Tensor, torch.Tensor]:
        """Where each pair's deformable taps read, in pixels: (y, x), each [Q, N, 9, h, w]."""
        q, _, h, w = query.shape
        n = bank.support_offset.shape[0]
        offset = self.query_offset(query).unsqueeze(1) + bank.support_offset.unsqueeze(0)  # [Q,N,18,h,w]
        offset = offset.reshape(q, n, TAPS, 2, h, w)
        shift = torch.tensor(TAP_SHIFTS, dtype=query.dtype, device=query.device)  # [9, 2] as (dy, dx)
        rows = torch.arange(h, dtype=query.dtype, device=query.device).reshape(1, 1, 1, h, 1)
        cols = torch.arange(w, dtype=query.dtype, device=query.device).reshape(1, 1, 1, 1, w)
        py = rows + shift[:, 0].reshape(1, 1, TAPS, 1, 1) + offset[:, :, :, 0]
        px = cols + shift[:, 1].reshape(1, 1, TAPS, 1, 1) + offset[:, :, :, 1]
        return py, px

    def filters(self, query: torch.Tensor, bank: ClassBank) -> torch.Tensor:
        """Meta-filters for every (query, class) pair: [Q, N, G*k*k, h, w], sigmoid applied."""
        py, px = self.sampling_positions(query, bank)
        return torch.sigmoid(sample_taps(bank.tap_projections, py, px))

    # ----- ODE + meta-classifier ----------------------------------------------------------------
    def score_map(
        self,
        query: torch.Tensor,
        bank: ClassBank,
        solver: str,
        steps: int,
        rtol: float = 1e-2,
        atol: float = 1e-2,
    ) -> torch.Tensor:
        """Per-position scores <X(1)(p), w>: [Q, N, h, w] (before any official-compat scale)."""
        filt = self.filters(query, bank)
        if self.kernel == 1:
            return self._group_space_scores(query, filt, bank.class_weight, solver, steps, rtol, atol)
        return self.channel_space_scores(query, filt, bank.class_weight, solver, steps, rtol, atol)

    def _group_space_scores(
        self,
        query: torch.Tensor,
        filt: torch.Tensor,
        weight: torch.Tensor,
        solver: str,
        steps: int,
        rtol: float,
        atol: float,
    ) -> torch.Tensor:
        # k = 1: X(1) = where(X0 > 0, X0 * growth(F), X0), growth constant over a group, so
        # <X(1)(p), w> = <min(X0,0)(p), w> + sum_g growth(F_g(p)) <relu(X0)(p)_g, w_g>.
        q, c, h, w = query.shape
        n, g = weight.shape[0], self.groups
        r = c // g
        growth = linear_growth(filt, solver, steps, rtol, atol, max_rate=MAX_FILTER).reshape(q, n, g, h * w)
        positive = F.relu(query).reshape(q, g, r, h * w).transpose(2, 3)  # [Q, G, hw, R]
        per_group = torch.matmul(positive, weight.reshape(n, g, r).permute(1, 2, 0))  # [Q, G, hw, N]
        aligned = (growth * per_group.permute(0, 3, 1, 2)).sum(dim=2)  # [Q, N, hw]
        negative = torch.matmul(torch.clamp(query, max=0.0).reshape(q, c, h * w).transpose(1, 2), weight.t())
        return (aligned + negative.transpose(1, 2)).reshape(q, n, h, w)

    def channel_space_scores(
        self,
        query: torch.Tensor,
        filt: torch.Tensor,
        weight: torch.Tensor,
        solver: str,
        steps: int,
        rtol: float,
        atol: float,
    ) -> torch.Tensor:
        q, c, h, w = query.shape
        n = weight.shape[0]
        x0 = query.unsqueeze(1).expand(q, n, c, h, w).reshape(q * n, c, h, w)
        x1 = integrate_channels(x0, filt.reshape(q * n, -1, h, w), self, solver, steps, rtol, atol)
        return torch.einsum("qnchw,nc->qnhw", x1.reshape(q, n, c, h, w), weight)

    # ----- the literal pairwise reference -------------------------------------------------------
    def literal_score_map(
        self,
        query: torch.Tensor,
        prototypes: torch.Tensor,
        solver: str,
        steps: int,
        rtol: float = 1e-2,
        atol: float = 1e-2,
    ) -> torch.Tensor:
        """The paper read literally: everything recomputed per (query, class) pair. Reference only."""
        from dmf_deploy.torchvision_check import import_torchvision

        deform_conv2d = import_torchvision().ops.deform_conv2d  # one line if torchvision is another torch's

        q, c, h, w = query.shape
        n = prototypes.shape[0]
        qs = query.unsqueeze(1).expand(q, n, c, h, w).reshape(q * n, c, h, w)
        ss = prototypes.unsqueeze(0).expand(q, n, c, h, w).reshape(q * n, c, h, w)
        if self.off_conv is None:
            offset = qs.new_zeros(q * n, 2 * TAPS, h, w)
        else:
            offset = self.off_conv(torch.cat([qs, ss], dim=1))  # the query comes first
        filt = torch.sigmoid(deform_conv2d(ss, offset, self.kernel_conv.weight, padding=(1, 1)))
        x1 = integrate_channels(qs, filt, self, solver, steps, rtol, atol)
        weight = F.normalize(prototypes, p=2, dim=1, eps=1e-12).mean(dim=(2, 3))
        return torch.einsum("qnchw,nc->qnhw", x1.reshape(q, n, c, h, w), weight)


def sample_taps(taps: torch.Tensor, py: torch.Tensor, px: torch.Tensor) -> torch.Tensor:
    """The sum over the 9 taps of bilinear samples of the projected tap maps, with grid_sample.
    taps [N, 9, GK, h, w]; py, px [Q, N, 9, h, w] -> [Q, N, GK, h, w]."""
    n, _, _, h, w = taps.shape
    q = py.shape[0]
    # align_corners=True maps pixel centres 0..w-1 onto -1..1; zeros padding = DCN's zero reads.
    grid = torch.stack((px * (2.0 / (w - 1)) - 1.0, py * (2.0 / (h - 1)) - 1.0), dim=-1)  # [Q,N,9,h,w,2]
    # Sample all queries of one (class, tap) map in one call: queries stack along the height.
    grid = grid.permute(1, 2, 0, 3, 4, 5).reshape(n * TAPS, q * h, w, 2)
    flat = taps.reshape(n * TAPS, -1, h, w)
    sampled = F.grid_sample(flat, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    summed = sampled.reshape(n, TAPS, -1, q, h, w).sum(dim=1)  # [N, GK, Q, h, w]
    return summed.permute(2, 0, 1, 3, 4)


def filter_per_tap(filt: torch.Tensor, groups: int, kernel: int, official_order: bool) -> torch.Tensor:
    """[P, G*k*k, h, w] -> [P, G, k*k, h*w]: the weight of (group, tap) at each position.

    Our order: channel g*k*k + t. The official code reads the same memory as [P, G, h*w, k*k].
    """
    p, _, h, w = filt.shape
    kk = kernel * kernel
    if official_order:
        return filt.reshape(p, groups, h * w, kk).transpose(2, 3)
    return filt.reshape(p, groups, kk, h * w)


def integrate_channels(
    x0: torch.Tensor, filt: torch.Tensor, head: DMFHead, solver: str, steps: int, rtol: float, atol: float
) -> torch.Tensor:
    """Solve dX/dt = ReLU(dynconv(X; filter)) in channel space, X [P, C, h, w]."""
    p, c, h, w = x0.shape
    g, k = head.groups, head.kernel
    weights = filter_per_tap(filt, g, k, head.official_filter_order).unsqueeze(2)  # [P, G, 1, kk, hw]
    if solver == "exact":  # k = 1: Solver.checked refused it for any other kernel
        growth = torch.exp(weights.reshape(p, g, 1, h * w))
        grouped = x0.reshape(p, g, c // g, h * w)
        return torch.where(grouped > 0, grouped * growth, grouped).reshape(p, c, h, w)

    def rhs(x: torch.Tensor) -> torch.Tensor:
        return F.relu(dynamic_conv(x, weights, g, k))

    return solve(rhs, x0, solver, steps, rtol, atol)


def dynamic_conv(x: torch.Tensor, weights: torch.Tensor, groups: int, kernel: int) -> torch.Tensor:
    """Every channel of group g at p: sum_t weights[g, t, p] * x(p + shift_t), zero outside the map."""
    p, c, h, w = x.shape
    if kernel == 1:
        out = x.reshape(p, groups, c // groups, h * w) * weights[:, :, :, 0]
        return out.reshape(p, c, h, w)
    padded = F.pad(x, (1, 1, 1, 1))
    out = torch.zeros_like(x).reshape(p, groups, c // groups, h * w)
    for t, (dy, dx) in enumerate(TAP_SHIFTS):
        shifted = padded[:, :, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w].reshape(
            p, groups, c // groups, h * w
        )
        out = out + shifted * weights[:, :, :, t]
    return out.reshape(p, c, h, w)
