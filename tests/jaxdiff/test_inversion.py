"""Inversion (issue 13 part B): ``jd.invert`` runs deterministic solvers backwards on the sampling grid.

On Gaussian data the probability-flow map is exact (``GaussianData.flow``), so the inversion error (data ->
noise) is measured against it and must fall at the solver's order; the round trip data -> noise -> data must
converge at least at that order (measured: DDIM 0.9-0.95; DPM-Solver++ 2M 4.3-4.6 and 3M 5-6, whose backward and
forward leading errors cancel; UniPC-2 2.8-3.0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd

GD = jd.testing.GaussianData(mean=jnp.array([0.5, -1.0]), scale=jnp.array([0.3, 1.5]))
S = jd.VPLinear()

CASES = {  # name: (solver, order of the inversion error)
    "DDIM": (jd.DDIM(), 1),
    "DPMSolverPP-2M": (jd.DPMSolverPP(order=2), 2),
    "DPMSolverPP-3M": (jd.DPMSolverPP(order=3), 3),
    "UniPC-2": (jd.UniPC(order=2), 3),  # UniPC-p with its corrector is of order p + 1
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_inversion_and_round_trip_converge_at_order(name):
    solver, order = CASES[name]
    den = GD.denoiser(S, "epsilon")
    x0 = GD.sample_marginal(jax.random.key(0), S, 1e-3, (16, 2))
    inv, rt = [], []
    for n in (8, 16, 32):
        ts = jd.timesteps(S, n, "logsnr")
        x_T = jd.invert(den, x0, ts, solver, args=GD)
        inv.append(float(jnp.max(jnp.abs(x_T - GD.flow(S, x0, ts[-1], ts[0])))))
        rt.append(float(jnp.max(jnp.abs(jd.sample(den, x_T, ts, solver, args=GD) - x0))))
    inv_slope = np.log2(inv[1] / inv[2])
    rt_slope = np.log2(rt[1] / rt[2])
    # measured 8->16->32: DDIM 0.95, 2M 1.93, 3M 3.6 (pre-asymptotic, 2.85 from 4 to 8), UniPC-2 2.86
    assert order - 0.3 <= inv_slope <= order + 0.7, (inv_slope, inv)
    assert rt_slope >= order - 0.2, (rt_slope, rt)


def test_invert_trajectory_ends_match():
    den = GD.denoiser(S, "epsilon")
    x0 = GD.sample_marginal(jax.random.key(1), S, 1e-3, (4, 2))
    ts = jd.timesteps(S, 6, "logsnr")
    x_T, traj = jd.invert(den, x0, ts, jd.DPMSolverPP(order=2), args=GD, return_trajectory=True)
    assert traj.shape == (7, 4, 2)
    assert float(jnp.max(jnp.abs(traj[0] - x0))) == 0.0 and float(jnp.max(jnp.abs(traj[-1] - x_T))) == 0.0


BAD = {
    "stochastic": (lambda: jd.invert(GD.denoiser(S), jnp.zeros((2, 2)), jd.timesteps(S, 4, "logsnr"), jd.DPMSolverPPSDE(),
                                     args=GD), r"`DPMSolverPPSDE` is stochastic.*has no inversion"),
    "sigma zero": (lambda: jd.invert(GD.denoiser(S), jnp.zeros((2, 2)), jd.timesteps(S, 4, "logsnr", final="zero"), jd.DDIM(),
                                     args=GD), r"`invert` starts at `ts\[-1\]`, which is sigma = 0"),
    "pure noise": (lambda: jd.invert(GD.denoiser(jd.RectifiedFlow(), "velocity"), jnp.zeros((2, 2)),
                                     jd.timesteps(jd.RectifiedFlow(), 4, "time", t_end=0.01), jd.DDIM(), args=GD),
                   r"`invert` ends at `ts\[0\]`, which is pure noise"),
    "ddpm": (lambda: jd.invert(GD.denoiser(S), jnp.zeros((2, 2)), jd.timesteps(S, 4, "logsnr"), jd.DDPM(), args=GD),
             r"`DDPM` is stochastic"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_refusals(case):
    fn, match = BAD[case]
    with pytest.raises(ValueError, match=match):
        fn()
