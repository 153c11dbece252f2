"""The DMF head: dynamic sampling, meta-filter, alignment ODE and meta-classifier.

Two forms compute the same scores:

- factored (the product): the support side is computed once per class into a `ClassBank`; each
  (query, class) pair then only adds two offset terms, samples the projected taps bilinearly, and
  (for k = 1) integrates in group space.
- literal (the reference): the paper read literally, one offset conv and one
  `torchvision.ops.deform_conv2d` per pair and the ODE in channel space.

Both run the same solver functions from `dmf_deploy.solvers`.

The factored form has two samplers that compute the same bilinear samples (zeros outside the map,
DCN v1), chosen by `DMFHead.sampler`:

- ``"grid_sample"`` (the reference): `F.grid_sample` over [N*9, GK, h, w] tap maps. Its saved
  tensors are small, so PyTorch training and evaluation use it.
- ``"gather"``: the 2x2 window of map positions around every sample computed in the graph (Floor,
  Clip, Cast) with bilinear hat weights relu(1 - |y - i|) * relu(1 - |x - j|) (zero for a position
  that is not a neighbour, so samples off the map read zero), the tap maps flattened channel-last to
  rows of GK values, the 9 taps x 4 corners fetched with one Gather and summed by one batched MatMul.
  Standard ops only (no GridSample), and about 4x faster than ONNX Runtime's CPU GridSample at 1000
  classes (benchmarks/head_formulations.py), so exported head graphs use it.

The default, ``sampler=None``, picks "gather" while torch is exporting a graph and "grid_sample"
otherwise.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dmf_deploy.solvers import linear_growth, solve

TAPS = 9  # the 3x3 deformable kernel
TAP_SHIFTS = tuple((ty - 1, tx - 1) for ty in range(3) for tx in range(3))
SAMPLERS = ("grid_sample", "gather")
CORNERS = ((0, 0), (0, 1), (1, 0), (1, 1))  # (dy, dx) of the four bilinear corners


class ClassBank(NamedTuple):
    """Everything the head needs of N classes; independent of the solver."""

    support_offset: torch.Tensor  # [N, 18, h, w]  support half of the offset conv
    tap_projections: torch.Tensor  # [N, 9, G*k*k, h, w]  W_t . S per tap of the deformable conv
    # (bundles store it channel-last, [N, 9, h, w, G*k*k]: see `channels_last_bank` below)
    class_weight: torch.Tensor  # [N, C]  meta-classifier weight: mean of the L2-normalised prototype


def exporting() -> bool:
    """True while torch traces a module for export (torch.export / either ONNX exporter)."""
    return bool(torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting())


class DMFHead(nn.Module):
    def __init__(
        self,
        channels: int,
        groups: int,
        kernel: int,
        official_filter_order: bool = False,
        sampler: str | None = None,
    ) -> None:
        super().__init__()
        self.channels, self.groups, self.kernel = channels, groups, kernel
        self.official_filter_order = official_filter_order
        self.sampler = sampler  # None: "gather" while exporting, else "grid_sample" (see the module doc)
        self.off_conv = nn.Conv2d(2 * channels, 2 * TAPS, 5, padding=2, bias=False)
        self.kernel_conv = nn.Conv2d(channels, groups * kernel * kernel, 3, padding=1, bias=False)

    # ----- support side: once per class --------------------------------------------------------
    def class_bank(self, prototypes: torch.Tensor) -> ClassBank:
        n, c, h, w = prototypes.shape
        c_ = self.channels
        support_offset = F.conv2d(prototypes, self.off_conv.weight[:, c_:], padding=2)
        # The deformable conv is linear in the support map, so project it per tap first:
        # P_t = W[:, :, t] . S, a 1x1 conv per tap; sampling P_t equals sampling S then projecting.
        per_tap = self.kernel_conv.weight.reshape(-1, c, TAPS).permute(2, 0, 1)  # [9, GK, C]
        tap_projections = torch.matmul(per_tap.unsqueeze(0), prototypes.reshape(n, 1, c, h * w))
        tap_projections = tap_projections.reshape(n, TAPS, -1, h, w)
        class_weight = F.normalize(prototypes, p=2, dim=1, eps=1e-12).mean(dim=(2, 3))
        return ClassBank(support_offset, tap_projections, class_weight)

    # ----- query side ---------------------------------------------------------------------------
    def query_offset(self, query: torch.Tensor) -> torch.Tensor:
        return F.conv2d(query, self.off_conv.weight[:, : self.channels], padding=2)

    @property
    def sampler(self) -> str | None:
        return self._sampler

    @sampler.setter
    def sampler(self, value: str | None) -> None:
        if value is not None and value not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS} or None (automatic), got {value!r}")
        self._sampler = value

    def active_sampler(self) -> str:
        if self._sampler is not None:
            return self._sampler
        return "gather" if exporting() else "grid_sample"

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

    def filters(self, query: torch.Tensor, bank: ClassBank, channels_last_bank: bool = False) -> torch.Tensor:
        """Meta-filters for every (query, class) pair: [Q, N, G*k*k, h, w], sigmoid applied.

        `channels_last_bank`: the bank's tap_projections are [N, 9, h, w, G*k*k], as bundles store
        them (the gather sampler then reads rows of G*k*k values without transposing the bank).
        """
        q, _, h, w = query.shape
        py, px = self.sampling_positions(query, bank)
        taps = bank.tap_projections
        if self.active_sampler() == "gather":
            rows = sample_taps_gather(taps, py, px, channels_last_bank)  # [Q, N, h*w, GK]
            # Channel-first again: a batched 2-D transpose. Measured: keeping the rows channel-last
            # through the group-space products costs a 4-D permute of the [Q, G, hw, N] products
            # instead, which ONNX Runtime does 4x slower.
            summed = rows.transpose(2, 3).reshape(q, rows.shape[1], -1, h, w)
        else:
            if channels_last_bank:
                taps = taps.permute(0, 1, 4, 2, 3)
            summed = sample_taps_grid_sample(taps, py, px)
        return torch.sigmoid(summed)

    # ----- ODE + meta-classifier ----------------------------------------------------------------
    def score_map(
        self,
        query: torch.Tensor,
        bank: ClassBank,
        solver: str,
        steps: int,
        rtol: float = 1e-2,
        atol: float = 1e-2,
        channels_last_bank: bool = False,
    ) -> torch.Tensor:
        """Per-position scores <X(1)(p), w>: [Q, N, h, w] (before any official-compat scale)."""
        filt = self.filters(query, bank, channels_last_bank)
        if self.kernel == 1:
            return self._group_space_scores(query, filt, bank.class_weight, solver, steps, rtol, atol)
        return self._channel_space_scores(query, filt, bank.class_weight, solver, steps, rtol, atol)

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
        growth = linear_growth(filt, solver, steps, rtol, atol).reshape(q, n, g, h * w)
        positive = F.relu(query).reshape(q, g, r, h * w).transpose(2, 3)  # [Q, G, hw, R]
        per_group = torch.matmul(positive, weight.reshape(n, g, r).permute(1, 2, 0))  # [Q, G, hw, N]
        aligned = (growth * per_group.permute(0, 3, 1, 2)).sum(dim=2)  # [Q, N, hw]
        negative = torch.matmul(torch.clamp(query, max=0.0).reshape(q, c, h * w).transpose(1, 2), weight.t())
        return (aligned + negative.transpose(1, 2)).reshape(q, n, h, w)

    def _channel_space_scores(
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
        from torchvision.ops import deform_conv2d

        q, c, h, w = query.shape
        n = prototypes.shape[0]
        qs = query.unsqueeze(1).expand(q, n, c, h, w).reshape(q * n, c, h, w)
        ss = prototypes.unsqueeze(0).expand(q, n, c, h, w).reshape(q * n, c, h, w)
        offset = self.off_conv(torch.cat([qs, ss], dim=1))  # the query comes first
        filt = torch.sigmoid(deform_conv2d(ss, offset, self.kernel_conv.weight, padding=(1, 1)))
        x1 = integrate_channels(qs, filt, self, solver, steps, rtol, atol)
        weight = F.normalize(prototypes, p=2, dim=1, eps=1e-12).mean(dim=(2, 3))
        return torch.einsum("qnchw,nc->qnhw", x1.reshape(q, n, c, h, w), weight)


# ----- samplers: the sum over the 9 taps of bilinear samples of the projected tap maps ---------------
def sample_taps_grid_sample(taps: torch.Tensor, py: torch.Tensor, px: torch.Tensor) -> torch.Tensor:
    """The reference sampler. taps [N, 9, GK, h, w]; py, px [Q, N, 9, h, w] -> [Q, N, GK, h, w]."""
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


def sample_taps_gather(
    taps: torch.Tensor, py: torch.Tensor, px: torch.Tensor, channels_last_bank: bool = False
) -> torch.Tensor:
    """The same samples from standard ops. taps [N, 9, GK, h, w] (or [N, 9, h, w, GK] with
    `channels_last_bank`); py, px [Q, N, 9, h, w] -> channel-last [Q, N, h*w, GK].

    Each sample reads the 2x2 window of map positions around (y, x), clamped into the map, with the
    bilinear hat weights relu(1 - |y - i|) * relu(1 - |x - j|). A window member that is not a neighbour
    of (y, x) (the sample lies off the map's edge, or outside it: DCN v1 reads zero there) gets weight 0.
    """
    if channels_last_bank:
        n, taps_, h, w, gk = taps.shape
        table = taps.reshape(n * taps_ * h * w, gk)
    else:
        n, taps_, gk, h, w = taps.shape
        # Rows of GK values, one per (class, tap, position). The bank keeps its channel-first contract;
        # this Transpose is one pass over it.
        table = taps.reshape(n * taps_, gk, h * w).transpose(1, 2).reshape(n * taps_ * h * w, gk)
    q, hw = py.shape[0], h * w
    # Positions as [Q, N, hw, 9], so that the corners gathered for one output position are adjacent.
    py = py.reshape(q, n, taps_, hw).transpose(2, 3)
    px = px.reshape(q, n, taps_, hw).transpose(2, 3)
    row, weights_y, step_y = _window(py, h)
    col, weights_x, step_x = _window(px, w)
    base = torch.arange(n * taps_, dtype=torch.int32, device=taps.device).reshape(1, n, 1, taps_) * hw
    steps = torch.tensor([0, step_x, step_y * w, step_y * w + step_x], dtype=torch.int32, device=taps.device)
    index = (base + row * w + col).unsqueeze(-1) + steps  # [Q, N, hw, 9, 4] rows of the table
    weight = torch.stack([weights_y[dy] * weights_x[dx] for dy, dx in CORNERS], dim=-1)
    # F.embedding, not index_select: it exports as a Gather on the int32 indices themselves, where
    # index_select casts all of them (36 per class and position) to int64 first.
    corners = F.embedding(index.reshape(-1), table).reshape(q * n * hw, taps_ * 4, gk)
    summed = torch.matmul(weight.reshape(q * n * hw, 1, taps_ * 4), corners)  # [Q*N*hw, 1, GK]
    return summed.reshape(q, n, hw, gk)


def _window(pos: torch.Tensor, size: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], int]:
    """Along one axis: the first index of the 2-wide window clamped into 0..size-1 (int32: TensorRT's
    index type), the hat weights of its two members, and the index step between them (0 when size is
    1: the window is that one position, its second member weighted 0)."""
    if size == 1:
        return torch.zeros_like(pos, dtype=torch.int32), (torch.relu(1 - pos.abs()), torch.zeros_like(pos)), 0
    first = torch.clamp(torch.floor(pos), 0, size - 2)
    offset = pos - first
    weights = (torch.relu(1 - offset.abs()), torch.relu(1 - (offset - 1).abs()))
    return first.to(torch.int32), weights, 1


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
    if solver == "exact":
        if k != 1:
            raise ValueError("the 'exact' solver exists only for kernel 1")
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
