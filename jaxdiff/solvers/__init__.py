"""Solvers: one file per family, all behind the protocol in ``jaxdiff.solvers.base``."""

from jaxdiff.solvers.base import Coefficients, Layout, Solver
from jaxdiff.solvers.ddim import DDIM, DDPM, Euler
from jaxdiff.solvers.deis import DEIS
from jaxdiff.solvers.dpm_solver import DPMSolver, DPMSolverPP
from jaxdiff.solvers.dpm_solver_v3 import EMS, DPMSolverV3, compute_ems
from jaxdiff.solvers.edm_sde import EDMStochastic
from jaxdiff.solvers.heun import Heun
from jaxdiff.solvers.pndm import PNDM
from jaxdiff.solvers.sde import DPMSolverPPSDE, DPMSolverSDE, EulerMaruyama
from jaxdiff.solvers.unipc import UniPC
from jaxdiff.solvers.ancestral import (DPMSolver2Ancestral, DPMSolverPP2SAncestral, DPMSolverPPSDESinglestep,
                                       EulerAncestral)
