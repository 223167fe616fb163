"""Fits the rational erf of src/ops/fused_grad.rs: erf(x) ≈ x · P(t) / Q(t), t = x²/8 − 1, on
(0, 4], P of degree 7 and Q of degree 5 with Q's constant term 1, by least squares in a
Chebyshev basis of t, reweighted towards the largest errors (Lawson's iteration) to approach the
minimax fit; then converted to powers of t. Prints the largest error against scipy's erf in f64
over [-4, 4] and the coefficients, lowest degree first.

Usage: scripts/fit_erf.py   (numpy and scipy: e.g. the venv of scripts/setup-torch-venv.sh)
"""

import numpy as np
from numpy.polynomial import chebyshev as C
from scipy.special import erf

P_DEGREE, Q_DEGREE, ROUNDS = 7, 5, 80


def main():
    x = np.sqrt(np.linspace(0, 16, 80001))[1:]
    t = x * x / 8 - 1
    f = erf(x)
    tp, tq = C.chebvander(t, P_DEGREE), C.chebvander(t, Q_DEGREE)
    weights = np.ones_like(x)
    best = None
    for _ in range(ROUNDS):
        # x·P(t) − f·(Q(t) − 1) = f, linear in the coefficients.
        a = np.hstack([x[:, None] * tp, -f[:, None] * tq[:, 1:]])
        sol, *_ = np.linalg.lstsq(a * weights[:, None], f * weights, rcond=None)
        p, q = sol[: P_DEGREE + 1], np.concatenate([[1.0], sol[P_DEGREE + 1:]])
        err = np.abs(x * C.chebval(t, p) / C.chebval(t, q) - f)
        if best is None or err.max() < best[0]:
            best = (err.max(), p, q)
        weights = weights * (err / err.max()) ** 0.5 + 1e-4
    _, p, q = best
    pp, qq = C.cheb2poly(p), C.cheb2poly(q)
    pp, qq = pp / qq[0], qq / qq[0]
    xs = np.linspace(-4, 4, 2000001)
    ts = xs * xs / 8 - 1
    num, den = np.zeros_like(ts), np.zeros_like(ts)
    for c in pp[::-1]:
        num = num * ts + c
    for c in qq[::-1]:
        den = den * ts + c
    print("largest error (f64):", np.abs(xs * num / den - erf(xs)).max())
    print("smallest Q (no pole):", den.min())
    print("P:", ", ".join(repr(float(v)) for v in pp))
    print("Q:", ", ".join(repr(float(v)) for v in qq))


if __name__ == "__main__":
    main()
