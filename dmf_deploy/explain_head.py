"""What the head aligned: explain.onnx is `explain_outputs` traced.

For every (query, class) pair of a class bank in the bundle's layout (`dmf_deploy.bundle_head`):

- ``sampling_positions`` [Q, N, h*w, 9, 2]: (x, y) in feature cells where each query position's nine
  taps read the class's maps, offsets included. These are `bundle_head.sampling_positions`, the very
  positions head.onnx samples at (there laid out (y, x) first, tap last).
- ``contributions`` [Q, N, h, w]: each position's term <X(1)(p), w> of the score, times the official
  score scale where the model has one, so that their mean is the score head.onnx computes.
- ``aligned`` [Q, N, h, w]: |X(1)(p)|, the L2 norm over channels of the aligned query feature (the
  paper's Fig. 4).

For k = 1 both maps come from group space, as the head's scores do: X(1) is the query with each
group's positive entries scaled by growth(F_g(p)) and the rest unchanged. For k = 3 the ODE is solved
in channel space.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dmf_deploy.bundle_head import filters, group_growth, positive_terms, sampling_positions
from dmf_deploy.head import ClassBank, DMFHead, integrate_channels
from dmf_deploy.model import DMFNet


def explain_outputs(
    model: DMFNet, query: torch.Tensor, bank: ClassBank, solver: str | None = None, steps: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sampling_positions, contributions, aligned) of query features [Q, C, h, w] against a bank in
    the bundle's layout; see the module doc."""
    solver, steps = model.resolve_solver(solver, steps)
    config, head = model.config, model.head
    q, _, h, w = query.shape
    n = bank.class_weight.shape[0]
    yx = sampling_positions(head, query, bank)  # [Q, N, 2 (y, x), hw, 9]
    points = torch.stack((yx[:, :, 1], yx[:, :, 0]), dim=-1)  # [Q, N, hw, 9, 2 (x, y)]
    if head.kernel == 1:
        terms, norms = group_space_terms(head, query, bank, solver, steps)
    else:
        terms, norms = channel_space_terms(head, query, bank, solver, steps, config.rtol, config.atol)
    contributions = terms.reshape(q, n, h, w) * config.score_scale((h, w))
    return points, contributions, norms.reshape(q, n, h, w)


def group_space_terms(
    head: DMFHead, query: torch.Tensor, bank: ClassBank, solver: str, steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """k = 1: per-position score terms and |X(1)(p)|, both [Q, N, h*w]."""
    q, c, h, w = query.shape
    g = head.groups
    growth = group_growth(head, query, bank, solver, steps)  # [Q, G, N, hw]
    negative = torch.clamp(query, max=0.0).reshape(q, c, h * w)
    terms = positive_terms(head, query, bank.class_weight, growth) + torch.matmul(bank.class_weight, negative)
    # |X(1)(p)|^2 = sum_g growth_g(p)^2 |relu(q)(p)_g|^2 + |min(q, 0)(p)|^2.
    positive_sq = F.relu(query).square().reshape(q, g, c // g, h * w).sum(dim=2, keepdim=True)
    negative_sq = negative.square().sum(dim=1, keepdim=True)  # [Q, 1, hw]
    norms = torch.sqrt((growth.square() * positive_sq).sum(dim=1) + negative_sq)
    return terms, norms


def channel_space_terms(
    head: DMFHead, query: torch.Tensor, bank: ClassBank, solver: str, steps: int, rtol: float, atol: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Any k: X(1) integrated in channel space; per-position score terms and |X(1)(p)|, [Q, N, h*w]."""
    q, c, h, w = query.shape
    n = bank.class_weight.shape[0]
    filt = filters(head, query, bank)  # [Q, N, G*k*k, h, w]
    x0 = query.unsqueeze(1).expand(q, n, c, h, w).reshape(q * n, c, h, w)
    x1 = integrate_channels(x0, filt.reshape(q * n, -1, h, w), head, solver, steps, rtol, atol)
    x1 = x1.reshape(q, n, c, h * w)
    terms = (x1 * bank.class_weight.reshape(1, n, c, 1)).sum(dim=2)
    return terms, torch.sqrt(x1.square().sum(dim=2))
