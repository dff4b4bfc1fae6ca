"""jaxdiff: pure-JAX ODE/SDE samplers for diffusion models.

    import jaxdiff as jd
    s = jd.VPLinear()
    den = jd.Denoiser(fn, s, prediction="epsilon")
    x0 = jd.sample(den, x_T, jd.timesteps(s, 10), solver=jd.DPMSolverPP(order=2))
"""

from jaxdiff import losses, smc, testing
from jaxdiff import hub, nets
from jaxdiff import metrics, pretrained
from jaxdiff import ode
from jaxdiff.adaptive import AdaptiveStats, sample_adaptive
from jaxdiff.hub import load_diffusers, save_diffusers
from jaxdiff.adjoint import AdjointDPM, Backprop
from jaxdiff.brownian import BrownianNoise
from jaxdiff._checks import check_grid
from jaxdiff.models import CFG, PREDICTIONS, Denoiser, DynamicThreshold
from jaxdiff.sample import integrate, invert, nfe, sample
from jaxdiff.schedules import EDM, VE, RectifiedFlow, Schedule, VPCosine, VPDiscrete, VPLinear
from jaxdiff.solvers import (
    DDIM,
    DDPM,
    DEIS,
    PNDM,
    Coefficients,
    DPMSolver,
    DPMSolverPP,
    DPMSolverPPSDE,
    DPMSolverSDE,
    DPMSolver2Ancestral,
    DPMSolverPP2SAncestral,
    DPMSolverPPSDESinglestep,
    EDMStochastic,
    EulerAncestral,
    DPMSolverV3,
    EMS,
    Euler,
    EulerMaruyama,
    Heun,
    Layout,
    Solver,
    UniPC,
    compute_ems,
)
from jaxdiff.smc import fkc
from jaxdiff.timesteps import flow_shift, timesteps

__version__ = "0.1.0"
