"""ODE solvers for the alignment ODE dX/dt = f(X) over t in [0, 1].

Explicit Runge-Kutta methods are Butcher tableaus (data) run by one generic stepper, unrolled in
Python so that an ONNX trace sees plain arithmetic: no Loop, no data-dependent control flow.
`dopri5-adaptive` defers to torchdiffeq. `exact` is the closed form for k = 1 and lives in the head.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction as Fr
from functools import cache

import torch

from dmf_deploy.config import FIXED_SOLVERS

Rhs = Callable[[torch.Tensor], torch.Tensor]  # autonomous: the alignment ODE does not depend on t


@dataclass(frozen=True)
class Tableau:
    """An explicit Runge-Kutta method: stage nodes c, strictly lower-triangular a, weights b."""

    c: tuple[Fr, ...]
    a: tuple[tuple[Fr, ...], ...]
    b: tuple[Fr, ...]


TABLEAUS: dict[str, Tableau] = {
    "euler": Tableau(c=(Fr(0),), a=((),), b=(Fr(1),)),
    "midpoint": Tableau(c=(Fr(0), Fr(1, 2)), a=((), (Fr(1, 2),)), b=(Fr(0), Fr(1))),
    "rk4": Tableau(
        c=(Fr(0), Fr(1, 2), Fr(1, 2), Fr(1)),
        a=((), (Fr(1, 2),), (Fr(0), Fr(1, 2)), (Fr(0), Fr(0), Fr(1))),
        b=(Fr(1, 6), Fr(1, 3), Fr(1, 3), Fr(1, 6)),
    ),
    # Kutta's 3/8 rule: what torchdiffeq (and so the official DMF code) calls "rk4".
    "rk4-38": Tableau(
        c=(Fr(0), Fr(1, 3), Fr(2, 3), Fr(1)),
        a=((), (Fr(1, 3),), (Fr(-1, 3), Fr(1)), (Fr(1), Fr(-1), Fr(1))),
        b=(Fr(1, 8), Fr(3, 8), Fr(3, 8), Fr(1, 8)),
    ),
    # Dormand-Prince with its 5th-order weights; the 7th (FSAL) stage has weight 0 and is dropped.
    "dopri5": Tableau(
        c=(Fr(0), Fr(1, 5), Fr(3, 10), Fr(4, 5), Fr(8, 9), Fr(1)),
        a=(
            (),
            (Fr(1, 5),),
            (Fr(3, 40), Fr(9, 40)),
            (Fr(44, 45), Fr(-56, 15), Fr(32, 9)),
            (Fr(19372, 6561), Fr(-25360, 2187), Fr(64448, 6561), Fr(-212, 729)),
            (Fr(9017, 3168), Fr(-355, 33), Fr(46732, 5247), Fr(49, 176), Fr(-5103, 18656)),
        ),
        b=(Fr(35, 384), Fr(0), Fr(500, 1113), Fr(125, 192), Fr(-2187, 6784), Fr(11, 84)),
    ),
}
assert set(TABLEAUS) == set(FIXED_SOLVERS)


def rk_step(f: Rhs, y: torch.Tensor, dt: float, tableau: Tableau) -> torch.Tensor:
    """One explicit Runge-Kutta step of size dt."""
    stages: list[torch.Tensor] = []
    for row in tableau.a:
        y_stage = y
        for coef, k in zip(row, stages):
            if coef:
                y_stage = y_stage + (dt * float(coef)) * k
        stages.append(f(y_stage))
    update = sum((dt * float(w)) * k for w, k in zip(tableau.b, stages) if w)
    return y + update


def fixed_solve(f: Rhs, y0: torch.Tensor, solver: str, steps: int) -> torch.Tensor:
    """Integrate from t = 0 to 1 in `steps` equal steps; the loop unrolls at trace time."""
    tableau = TABLEAUS[solver]
    dt = 1.0 / steps
    y = y0
    for _ in range(steps):
        y = rk_step(f, y, dt, tableau)
    return y


def adaptive_solve(f: Rhs, y0: torch.Tensor, rtol: float, atol: float) -> torch.Tensor:
    """torchdiffeq's adaptive Dormand-Prince (the paper's solver). Not exportable."""
    from torchdiffeq import odeint

    t = torch.tensor([0.0, 1.0], dtype=y0.dtype, device=y0.device)
    return odeint(lambda _t, y: f(y), y0, t, method="dopri5", rtol=rtol, atol=atol)[-1]


def solve(
    f: Rhs, y0: torch.Tensor, solver: str, steps: int, rtol: float = 1e-2, atol: float = 1e-2
) -> torch.Tensor:
    """Integrate dy/dt = f(y) over [0, 1] with any general-purpose solver (not `exact`).

    `solver` and `steps` are trusted: `config.Solver.checked` validated them where they came in.
    """
    if solver == "dopri5-adaptive":
        return adaptive_solve(f, y0, rtol, atol)
    if solver == "exact":
        raise ValueError("'exact' is a closed form for k = 1, not a general-purpose solver")
    return fixed_solve(f, y0, solver, steps)


@cache
def stability_polynomial(solver: str) -> tuple[float, ...]:
    """Coefficients of R(z), the factor one step applies to y' = z y: R(z) = 1 + sum_j b.A^(j-1).1 z^j.

    Exact rational arithmetic, so the coefficients are the method's own, rounded once.
    """
    tab = TABLEAUS[solver]
    n = len(tab.b)
    a = [[tab.a[i][j] if j < len(tab.a[i]) else Fr(0) for j in range(n)] for i in range(n)]
    vec = [Fr(1)] * n  # A^(j-1) . 1
    coeffs = [Fr(1)]
    for _ in range(n):
        coeffs.append(sum(w * v for w, v in zip(tab.b, vec)))
        vec = [sum(a[i][j] * vec[j] for j in range(n)) for i in range(n)]
    while len(coeffs) > 1 and coeffs[-1] == 0:
        coeffs.pop()
    return tuple(float(c) for c in coeffs)


def linear_growth(
    rate: torch.Tensor,
    solver: str,
    steps: int,
    rtol: float = 1e-2,
    atol: float = 1e-2,
    max_rate: float | None = None,
) -> torch.Tensor:
    """What the solver makes of y' = rate * y, y(0) = 1, at t = 1: exp(rate) for `exact`.

    For the k = 1 ODE on a positive entry this is the whole solution (docs/solvers.md, "The closed form").
    `max_rate`: a bound on `rate` (the head's rates are sigmoids, below 1). Where the fixed-step
    solver's R(rate/steps)^steps equals exp(rate) to within the dtype's rounding over [0, max_rate]
    (`growth_is_exp`), the growth is evaluated as exp(rate): the same value, more accurately than
    the polynomial's float arithmetic, in one op instead of about fifteen.
    """
    if solver == "exact" or (max_rate is not None and growth_is_exp(solver, steps, rate.dtype, max_rate)):
        return torch.exp(rate)
    if solver == "dopri5-adaptive":
        return adaptive_solve(lambda y: rate * y, torch.ones_like(rate), rtol, atol)
    # R(rate / steps) with the 1 / steps folded into the coefficients: sum_k (c_k / steps^k) rate^k.
    coeffs = [c / steps**k for k, c in enumerate(stability_polynomial(solver))]
    factor = rate * coeffs[-1] + coeffs[-2]
    for c in reversed(coeffs[:-2]):  # Horner
        factor = factor * rate + c
    return _power(factor, steps)


def growth_is_exp(solver: str, steps: int, dtype: torch.dtype, max_rate: float) -> bool:
    """True when `solver` x `steps` applied to y' = r y gives exp(r) to within half an ulp of `dtype`
    for every r in [0, max_rate]: its truncation error is below the dtype's rounding.

    Fixed-step dopri5 with 8 steps on rates in [0, 1]: 6.8e-9 relative, under float32's 6.0e-8; the
    polynomial evaluated in float32 is off by 8.5e-7, exp(r) by 6.3e-8. One rk4-38 step: 3.7e-3.
    """
    if solver == "exact":
        return True
    if solver not in TABLEAUS:
        return False
    return truncation_error(solver, steps, max_rate) < torch.finfo(dtype).eps / 2


@cache
def truncation_error(solver: str, steps: int, max_rate: float) -> float:
    """max over r in [0, max_rate] of |R(r/steps)^steps - exp(r)| / R(r/steps)^steps, in float64.

    Plain Python floats, so that it also runs while torch traces a graph. The error grows like
    r^(order + 1), so a grid that includes the end point finds the maximum.
    """
    coeffs = stability_polynomial(solver)
    worst = 0.0
    for i in range(1025):
        rate = max_rate * i / 1024
        z = rate / steps
        growth = sum(c * z**k for k, c in enumerate(coeffs)) ** steps
        worst = max(worst, abs(growth - math.exp(rate)) / growth)
    return worst


def _power(x: torch.Tensor, n: int) -> torch.Tensor:
    """x**n by repeated squaring, unrolled (plain Mul ops in a graph)."""
    result: torch.Tensor | None = None
    base = x
    while n:
        if n & 1:
            result = base if result is None else result * base
        n >>= 1
        if n:
            base = base * base
    assert result is not None
    return result
