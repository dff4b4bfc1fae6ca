"""Solvers: one file per family, all behind the protocol in ``jaxdiff.solvers.base``."""

from jaxdiff.solvers.base import Coefficients, Layout, Solver
from jaxdiff.solvers.ddim import DDIM, DDPM
from jaxdiff.solvers.dpm_solver import DPMSolver, DPMSolverPP
from jaxdiff.solvers.unipc import UniPC
