"""ODE solvers: tableaus against torchdiffeq, orders of convergence, the closed form for k = 1, and the
stability polynomials behind the factored head's group-space evaluation."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from bundles import relative_error  # tests/bundles.py

from dmf_deploy.config import FIXED_SOLVERS, Solver
from dmf_deploy.head import DMFHead, dynamic_conv, filter_per_tap, integrate_channels
from dmf_deploy.solvers import (
    fixed_solve,
    growth_is_exp,
    linear_growth,
    solve,
    stability_polynomial,
    truncation_error,
)

torchdiffeq = pytest.importorskip("torchdiffeq")

# torchdiffeq's names for our fixed-grid methods (docs/solvers.md, "The names").
TORCHDIFFEQ = {"euler": "euler", "midpoint": "midpoint", "rk4-38": "rk4"}
STAGES = {"euler": 1, "midpoint": 2, "rk4-38": 4}


def dynconv_ode(groups: int = 2, channels: int = 8, size: int = 5, filter_scale: float = 2.0, seed: int = 0):
    """The k = 3 alignment ODE dX/dt = ReLU(dynconv(X; filter)) in float64, and a mixed-sign X(0)."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(2, channels, size, size, generator=gen, dtype=torch.float64)
    logits = torch.randn(2, groups * 9, size, size, generator=gen, dtype=torch.float64)
    filt = torch.sigmoid(filter_scale * logits)
    weights = filter_per_tap(filt, groups, 3, official_order=False).unsqueeze(2)

    def rhs(x: torch.Tensor) -> torch.Tensor:
        return F.relu(dynamic_conv(x, weights, groups, 3))

    return rhs, x0, filt


class Counted:
    def __init__(self, f):
        self.f, self.calls = f, 0

    def __call__(self, *args):
        self.calls += 1
        return self.f(args[-1])  # (t, y) from torchdiffeq, (y) from ours


@pytest.mark.parametrize("steps", [1, 2, 3, 5])
@pytest.mark.parametrize("solver", ["euler", "midpoint", "rk4-38"])
def test_fixed_solvers_match_torchdiffeq_on_the_nonlinear_ode(solver, steps):
    rhs, x0, _ = dynconv_ode()
    # The ReLU really acts: a good share of dynconv(X0) is negative, so the ODE is not linear.
    assert float((rhs(x0) == 0).double().mean()) > 0.2

    ours_f, theirs_f = Counted(rhs), Counted(rhs)
    ours = fixed_solve(ours_f, x0, solver, steps)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    theirs = torchdiffeq.odeint(
        theirs_f, x0, t, method=TORCHDIFFEQ[solver], options={"step_size": 1.0 / steps}
    )[-1]
    # Same number of right-hand-side evaluations: step_size = 1/n really gave n steps.
    assert ours_f.calls == theirs_f.calls == STAGES[solver] * steps
    # float64, same tableau, operations in a different order: agreement to ~1e-15 of the state's size;
    # 1e-12 is far below the gap between any two methods (see the next test: 1e-2). Measured <= 5e-16.
    assert relative_error(ours, theirs) < 1e-12


def test_classic_rk4_and_rk4_38_differ_on_the_nonlinear_ode():
    rhs, x0, _ = dynconv_ode()
    classic = fixed_solve(rhs, x0, "rk4", 1)
    kutta = fixed_solve(rhs, x0, "rk4-38", 1)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    official = torchdiffeq.odeint(lambda _t, y: rhs(y), x0, t, method="rk4")[-1]  # no step size: 1 step
    # the official call is one 3/8-rule step (float64 rounding)
    assert relative_error(kutta, official) < 1e-12
    # Both are 4th order and agree on linear problems, but not here (measured gap 1.3e-2); the asserted
    # 1e-3 is 1e9x the tolerance above.
    assert relative_error(classic, kutta) > 1e-3


@pytest.mark.parametrize("ode", ["k1-vs-exact", "k3-vs-256-steps"])
def test_fixed_dopri5_converges_at_fifth_order(ode):
    """Error ratios between 4, 8 and 16 steps: 2^5 = 32 for a 5th-order method. float64 and small z
    keep rounding (1e-16) far below the 16-step error (~1e-9 here). Measured ratios: 26 and 29."""
    if ode == "k1-vs-exact":
        head = DMFHead(channels=8, groups=4, kernel=1).double()
        gen = torch.Generator().manual_seed(1)
        x0 = torch.randn(3, 8, 5, 5, generator=gen, dtype=torch.float64)  # negatives stay put exactly
        filt = torch.sigmoid(torch.randn(3, 4, 5, 5, generator=gen, dtype=torch.float64))  # z in (0, 1)
        ref = integrate_channels(x0, filt, head, "exact", 1, 0.0, 0.0)

        def run(n: int) -> torch.Tensor:
            return integrate_channels(x0, filt, head, "dopri5", n, 0.0, 0.0)

    else:
        # k = 3 with a positive state and small positive filters: dynconv > 0, so the ODE is smooth
        # (ReLU inactive) and coupled across positions.
        gen = torch.Generator().manual_seed(2)
        x0 = torch.rand(2, 8, 5, 5, generator=gen, dtype=torch.float64) + 0.1
        # per-tap weights [P, G, 1, k*k, h*w] in (0.1, 0.15): the summed rate stays below 1.4
        weights = 0.1 * (1 + 0.5 * torch.rand(2, 2, 1, 9, 25, generator=gen, dtype=torch.float64))

        def smooth_rhs(x: torch.Tensor) -> torch.Tensor:
            return F.relu(dynamic_conv(x, weights, 2, 3))

        def run(n: int) -> torch.Tensor:
            return fixed_solve(smooth_rhs, x0, "dopri5", n)

        ref = run(256)
    errors = [float((run(n) - ref).abs().max()) for n in (4, 8, 16)]
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    # [20, 40] around 32: the leading error term dominates at these step sizes; a 4th-order method
    # (a wrong weight) would give 16, a 6th-order artefact 64.
    assert all(20 <= r <= 40 for r in ratios), (errors, ratios)


def test_exact_matches_adaptive_dopri5_at_tight_tolerance():
    head = DMFHead(channels=8, groups=4, kernel=1).double()
    gen = torch.Generator().manual_seed(4)
    x0 = torch.randn(3, 8, 6, 6, generator=gen, dtype=torch.float64)
    filt = torch.sigmoid(2 * torch.randn(3, 4, 6, 6, generator=gen, dtype=torch.float64))
    exact = integrate_channels(x0, filt, head, "exact", 1, 0.0, 0.0)
    adaptive = integrate_channels(x0, filt, head, "dopri5-adaptive", 1, 1e-10, 1e-10)
    # rtol = atol = 1e-10 per step controls the local error; the accumulated error stays a small
    # multiple of that (measured 3e-10); 1e-8 bounds it while any modelling error would be >= 1e-3.
    assert relative_error(adaptive, exact) < 1e-8
    rate = filt.flatten()
    assert relative_error(linear_growth(rate, "dopri5-adaptive", 1, 1e-10, 1e-10), torch.exp(rate)) < 1e-8
    assert torch.equal(linear_growth(rate, "exact", 1), torch.exp(rate))


def test_stability_polynomials():
    taylor4 = (1.0, 1.0, 1 / 2, 1 / 6, 1 / 24)
    # Each coefficient is rounded once from the exact rational, so == is the right comparison.
    assert stability_polynomial("euler") == (1.0, 1.0)
    assert stability_polynomial("midpoint") == (1.0, 1.0, 0.5)
    assert stability_polynomial("rk4") == taylor4
    assert stability_polynomial("rk4-38") == taylor4  # why k = 1 cannot tell the two rk4s apart
    dopri5 = stability_polynomial("dopri5")
    assert len(dopri5) == 7  # degree 6: six stages carry weight
    assert dopri5[:6] == (*taylor4, 1 / 120)  # 5th order: Taylor of exp up to z^5
    assert dopri5[6] == float(Fraction(1, 600))  # not 1/720: the leading error term


@pytest.mark.parametrize("steps", [1, 2, 3, 8])
@pytest.mark.parametrize("solver", FIXED_SOLVERS)
def test_linear_growth_equals_stepping_y_prime_equals_f_y(solver, steps):
    gen = torch.Generator().manual_seed(steps)
    rate = torch.cat([torch.rand(40, generator=gen, dtype=torch.float64), 3 * torch.randn(40, generator=gen)])
    rate = rate.double()
    stepped = fixed_solve(lambda y: rate * y, torch.ones_like(rate), solver, steps)
    grown = linear_growth(rate, solver, steps)
    # float64: Horner plus repeated squaring against n explicit steps; a few ulps per step (~1e-15).
    assert relative_error(grown, stepped) < 1e-13


@pytest.mark.parametrize(
    ("solver", "steps", "dtype", "is_exp"),
    [
        ("dopri5", 8, torch.float32, True),  # truncation 6.8e-9 < 6.0e-8 = half float32's eps
        ("dopri5", 6, torch.float32, True),  # 2.7e-8
        ("dopri5", 4, torch.float32, False),  # 1.7e-7
        ("rk4", 8, torch.float32, False),  # 1.8e-6
        ("rk4-38", 1, torch.float32, False),  # 3.7e-3: the training solver keeps its polynomial
        ("dopri5", 8, torch.float64, False),  # float64 resolves the truncation
        ("dopri5-adaptive", 1, torch.float32, False),
        ("exact", 1, torch.float32, True),
    ],
)
def test_growth_is_exp_only_where_the_polynomial_is_exp_in_that_dtype(solver, steps, dtype, is_exp):
    assert growth_is_exp(solver, steps, dtype, max_rate=1.0) is is_exp
    rate = torch.rand(4096, generator=torch.Generator().manual_seed(3)).to(dtype)
    grown = linear_growth(rate, solver, steps, 1e-2, 1e-2, max_rate=1.0)
    assert torch.equal(grown, torch.exp(rate)) is is_exp
    if is_exp and solver != "exact":
        # The exp shortcut is the closer float32 value of the solver's own result (float64 polynomial).
        truth = linear_growth(rate.double(), solver, steps)
        polynomial = linear_growth(rate, solver, steps)  # no max_rate: Horner + squaring in float32
        assert truncation_error(solver, steps, 1.0) < 6e-8
        assert relative_error(grown.double(), truth) < relative_error(polynomial.double(), truth)
        assert relative_error(grown.double(), truth) < 1.2e-7


def test_positive_k1_state_is_x0_times_polynomial():
    """docs/solvers.md: on positive entries each fixed method equals X0 * R(hF)^n exactly (up to rounding)."""
    head = DMFHead(channels=6, groups=3, kernel=1).double()
    gen = torch.Generator().manual_seed(8)
    x0 = torch.randn(2, 6, 4, 4, generator=gen, dtype=torch.float64)
    filt = torch.sigmoid(torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64))
    growth = filt.reshape(2, 3, 1, 16)
    for solver in FIXED_SOLVERS:
        x1 = integrate_channels(x0, filt, head, solver, 3, 0.0, 0.0).reshape(2, 3, 2, 16)
        grouped = x0.reshape(2, 3, 2, 16)
        expected = torch.where(grouped > 0, grouped * linear_growth(growth, solver, 3), grouped)
        assert relative_error(x1, expected) < 1e-13, solver  # float64 rounding, as above


def test_solver_argument_errors():
    with pytest.raises(ValueError, match="unknown solver"):
        Solver.checked("rk45", 1, kernel=1)
    for steps in (0, 2.5, True):
        with pytest.raises(ValueError, match="steps must be a positive integer"):
            Solver.checked("euler", steps, kernel=1)
    with pytest.raises(ValueError, match="exists only for kernel 1; this model has k = 3"):
        Solver.checked("exact", 1, kernel=3)
    assert Solver.checked("dopri5-adaptive", 1, kernel=3).adaptive
    assert not Solver.checked("exact", 1, kernel=1).adaptive
    rhs, x0, _ = dynconv_ode()
    with pytest.raises(ValueError, match="closed form"):
        solve(rhs, x0, "exact", 1)
