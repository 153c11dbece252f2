"""The head as bundles run it: head.onnx is `bundle_head_scores` traced.

It computes what `DMFHead` computes with grid_sample (the reference; tests hold the two together),
from standard ONNX ops only, and arranged for ONNX Runtime's CPU kernels, which run one op at a time
over whole tensors: the fewer and cheaper the passes over the [Q, N, ...] per-pair tensors, the
faster the head (benchmarks/head_formulations.py measures the choices).

The class bank in the bundle's layout (`bundle_bank`), class axis first so that galleries stack
classes:

- ``support_offset`` [N, 2, h, w, 9]: the support half of every tap's offset, y then x, tap last: the
  layout the sampling positions are computed in, so no per-pair tensor is transposed;
- ``tap_projections`` [N, 9, h, w, G*k*k]: channel-last, so one position of one tap map is a row of
  G*k*k values that a Gather fetches whole;
- ``class_weight`` [N, C].

Sampling: the 2x2 window of map positions around every sample, clamped into the map (Floor, Clip),
with bilinear hat weights relu(1 - |y - i|) * relu(1 - |x - j|). A window member that is not a
neighbour of the sample gets weight 0, so samples off the map read zero (DCN v1). One Gather fetches
the 9 taps x 4 corners rows for every (query, class, position), one batched MatMul sums them.

Scores for k = 1 in group space (docs/solvers.md), laid out [Q, G, N, h*w]: the sampled filters need one
transpose of a [N*h*w, G] matrix per query to get there, and <relu(q)_g, w_g> comes out of its MatMul
in that layout directly. The mean over positions is taken inside the same reduction. The solver's
growth is `linear_growth` on rates below MAX_FILTER: exp where the fixed-step solver equals it in
float32 (dopri5 x 8 does), one op where the stability polynomial takes about fifteen.

At 1000 classes (ResNet-12, one query, 2 CPU threads) the Gather and the MatMul take about 70% of the
head: they write and read back 1.1 GB of corner rows, close to the memory bus's speed.

Two head forms, one per export target (`HEAD_FORMS`): "gather" (above, for ONNX Runtime, whose CPU
GridSample is several times slower) and "gridsample" (`gridsample_head_scores`: the reference's
`F.grid_sample`, bilinear, zeros padding, align_corners=True, for TensorRT's native GridSample layer),
which reads the bank in the reference layout. Either may store tap_projections in float16
(`stored_bank`); the head widens it to float32 once, before sampling: a float16 Gather followed by a
Cast measured slower than the float32 Gather, so the half bank saves memory, not time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dmf_deploy.head import MAX_FILTER, TAP_SHIFTS, TAPS, ClassBank, DMFHead
from dmf_deploy.model import DMFNet
from dmf_deploy.solvers import linear_growth

CORNERS = 4  # of the bilinear window: (y, x), (y, x + 1), (y + 1, x), (y + 1, x + 1)
HEAD_FORMS = {"onnxruntime": "gather", "tensorrt": "gridsample"}  # export target -> head form
BANK_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def bundle_bank(bank: ClassBank) -> ClassBank:
    """A `ClassBank` (the reference layout) in the bundle's layout; see the module doc."""
    n, _, h, w = bank.support_offset.shape
    offset = bank.support_offset.reshape(n, TAPS, 2, h, w).permute(0, 2, 3, 4, 1)
    taps = bank.tap_projections.permute(0, 1, 3, 4, 2)
    return ClassBank(offset.contiguous(), taps.contiguous(), bank.class_weight)


def stored_bank(bank: ClassBank, form: str = "gather", bank_dtype: str = "float32") -> ClassBank:
    """A reference `ClassBank` as a bundle of this head form stores it: its layout, and tap_projections
    in `bank_dtype` (what support.onnx outputs and galleries hold)."""
    laid = bundle_bank(bank) if form == "gather" else bank
    return laid._replace(tap_projections=laid.tap_projections.to(BANK_DTYPES[bank_dtype]))


def form_head_scores(
    model: DMFNet, query: torch.Tensor, bank: ClassBank, form: str, solver: str, steps: int
) -> torch.Tensor:
    """[Q, N] scores from a bank as `stored_bank` stores it for `form` (head.onnx of either form)."""
    bank = ClassBank(*(t.float() for t in bank))  # a float16 bank is widened once, before sampling
    if form == "gridsample":
        return gridsample_head_scores(model, query, bank, solver, steps)
    return bundle_head_scores(model, query, bank, solver, steps)


def gridsample_head_scores(
    model: DMFNet, query: torch.Tensor, bank: ClassBank, solver: str | None = None, steps: int | None = None
) -> torch.Tensor:
    """[Q, N] scores from a bank in the reference layout, sampled by `F.grid_sample` (GridSample)."""
    return model.head_scores(query, bank, solver, steps)


def bundle_head_scores(
    model: DMFNet, query: torch.Tensor, bank: ClassBank, solver: str | None = None, steps: int | None = None
) -> torch.Tensor:
    """[Q, N] scores from query features and a class bank in the bundle's layout (head.onnx)."""
    solver, steps = model.resolve_solver(solver, steps)
    config = model.config
    scores = head_scores(model.head, query, bank, solver, steps, config.rtol, config.atol)
    return scores * config.score_scale(tuple(query.shape[-2:]))


def head_scores(
    head: DMFHead,
    query: torch.Tensor,
    bank: ClassBank,
    solver: str,
    steps: int,
    rtol: float = 1e-2,
    atol: float = 1e-2,
) -> torch.Tensor:
    """`DMFHead.score_map` averaged over positions, [Q, N], from a bank in the bundle's layout."""
    if head.kernel == 1:
        return group_space_scores(head, query, bank, solver, steps)
    filt = filters(head, query, bank)
    maps = head.channel_space_scores(query, filt, bank.class_weight, solver, steps, rtol, atol)
    return maps.mean(dim=(2, 3))


def filters(head: DMFHead, query: torch.Tensor, bank: ClassBank) -> torch.Tensor:
    """`DMFHead.filters` from a bank in the bundle's layout: [Q, N, G*k*k, h, w], sigmoid applied."""
    q, _, h, w = query.shape
    n, gk = bank.class_weight.shape[0], bank.tap_projections.shape[-1]
    rows = sample_filters(head, query, bank).reshape(q, n, h * w, gk)
    return torch.sigmoid(rows.transpose(2, 3).reshape(q, n, gk, h, w))


def group_space_scores(
    head: DMFHead, query: torch.Tensor, bank: ClassBank, solver: str, steps: int
) -> torch.Tensor:
    """k = 1: mean_p [ <min(q,0)(p), w> + sum_g growth(F_g(p)) <relu(q)(p)_g, w_g> ], as [Q, N]."""
    growth = group_growth(head, query, bank, solver, steps)
    # Sum over groups, then mean over positions, as two reductions: float32 error grows with the
    # length of each sum (one sum of G*hw = 7744 terms was 20x further from the reference).
    aligned = positive_terms(head, query, bank.class_weight, growth).mean(dim=2)
    negative = torch.matmul(torch.clamp(query, max=0.0).mean(dim=(2, 3)), bank.class_weight.t())
    return aligned + negative


def group_growth(
    head: DMFHead, query: torch.Tensor, bank: ClassBank, solver: str, steps: int
) -> torch.Tensor:
    """k = 1: the factor growth(F_g(p)) by which the ODE scales a positive entry, [Q, G, N, h*w]."""
    q, _, h, w = query.shape
    n = bank.class_weight.shape[0]
    filt = torch.sigmoid(sample_filters(head, query, bank).transpose(1, 2))  # [Q, G, N*hw]
    return linear_growth(filt, solver, steps, max_rate=MAX_FILTER).reshape(q, head.groups, n, h * w)


def positive_terms(
    head: DMFHead, query: torch.Tensor, weight: torch.Tensor, growth: torch.Tensor
) -> torch.Tensor:
    """k = 1: sum_g growth(F_g(p)) <relu(q)(p)_g, w_g> at every position, [Q, N, h*w]."""
    q, c, h, w = query.shape
    n, g = weight.shape[0], head.groups
    positive = F.relu(query).reshape(q, g, c // g, h * w)
    per_group = torch.matmul(weight.reshape(n, g, c // g).transpose(0, 1), positive)  # [Q, G, N, hw]
    return (growth * per_group).sum(dim=1)


def sample_filters(head: DMFHead, query: torch.Tensor, bank: ClassBank) -> torch.Tensor:
    """The deformable conv of every (query, class) pair before its sigmoid, channel-last:
    [Q, N*h*w, G*k*k], rows in (class, position) order."""
    q, _, h, w = query.shape
    taps = bank.tap_projections
    n, gk = taps.shape[0], taps.shape[-1]
    index, weight = bilinear_corners(sampling_positions(head, query, bank), h, w)
    # F.embedding exports as a Gather on the int32 indices themselves (index_select casts to int64).
    rows = F.embedding(index.reshape(-1), taps.reshape(-1, gk)).reshape(q * n * h * w, TAPS * CORNERS, gk)
    summed = torch.matmul(weight.reshape(q * n * h * w, 1, TAPS * CORNERS), rows)
    return summed.reshape(q, n * h * w, gk)


def sampling_positions(head: DMFHead, query: torch.Tensor, bank: ClassBank) -> torch.Tensor:
    """Where each pair's taps read, in pixels: [Q, N, 2 (y, x), h*w, 9]."""
    q, _, h, w = query.shape
    n = bank.support_offset.shape[0]
    own = head.query_offset(query).reshape(q, TAPS, 2, h * w).permute(0, 2, 3, 1)  # [Q, 2, hw, 9]
    # The undeformed tap positions p + p_t join the query's term, which is small, not every pair's.
    own = own + tap_grid(h, w, query.dtype, query.device)
    return own.unsqueeze(1) + bank.support_offset.reshape(1, n, 2, h * w, TAPS)


def tap_grid(h: int, w: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[2, h*w, 9]: row and column of position p shifted by tap t's (dy, dx)."""
    rows = torch.arange(h, dtype=dtype, device=device).repeat_interleave(w)
    cols = torch.arange(w, dtype=dtype, device=device).repeat(h)
    shifts = torch.tensor(TAP_SHIFTS, dtype=dtype, device=device).t()  # [2, 9]
    return torch.stack((rows, cols)).unsqueeze(-1) + shifts.unsqueeze(1)


def bilinear_corners(positions: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For positions [Q, N, 2, h*w, 9]: the table rows of the 4 window corners of every sample
    (int32, TensorRT's index type) and their bilinear weights, both [Q, N, h*w, 9, 4].

    Table row of (class n, tap t, y, x): ((n * 9 + t) * h + y) * w + x. A 1-wide axis has a 1-wide
    window: its second member reads the first again with weight 0.
    """
    n, hw = positions.shape[1], positions.shape[3]
    floor = torch.floor(positions)
    if h == w:
        first = torch.clamp(floor, 0, max(h - 2, 0))
    else:
        last = torch.tensor([max(h - 2, 0), max(w - 2, 0)], dtype=positions.dtype, device=positions.device)
        first = torch.minimum(torch.clamp(floor, min=0), last.reshape(2, 1, 1))
    offset = positions - first
    near = torch.relu(1 - offset.abs())
    far = torch.relu(1 - (offset - 1).abs())
    if min(h, w) == 1:
        wide = torch.tensor([h > 1, w > 1], dtype=positions.dtype, device=positions.device)
        far = far * wide.reshape(2, 1, 1)
    # Table row of (class n, tap t, y, x): ((n * 9 + t) * h + y) * w + x, in int32: exact whatever
    # precision the graph is cast to later (float16 holds integers up to 2048 only). The per-class and
    # per-tap base comes as one [N, h*w, 9] tensor: ONNX Runtime broadcasts a trailing [9] slowly.
    first_y, first_x = first.to(torch.int32).unbind(2)
    tap_base = (torch.arange(TAPS, dtype=torch.int32, device=positions.device) * hw).expand(hw, TAPS)
    class_base = torch.arange(n, dtype=torch.int32, device=positions.device) * (TAPS * hw)
    row = first_y * w + first_x + (class_base.reshape(n, 1, 1) + tap_base)
    step_x, step_y = int(w > 1), w if h > 1 else 0
    index = torch.stack([row, row + step_x, row + step_y, row + (step_y + step_x)], dim=-1)
    near_y, near_x = near.unbind(2)
    far_y, far_x = far.unbind(2)
    weight = torch.stack([near_y * near_x, near_y * far_x, far_y * near_x, far_y * far_x], dim=-1)
    return index, weight
