"""Sequential Monte Carlo for diffusion sampling: resampling schemes and Feynman-Kac correctors.

    from jaxdiff.smc import fkc, resampling
    res = fkc.sample(fkc.Anneal(den, beta=2.0), x_T, ts, key)
"""

from jaxdiff.smc import fkc, resampling
from jaxdiff.smc.resampling import ess, log_normalize, multinomial, residual, stratified, systematic

__all__ = ["fkc", "resampling", "ess", "log_normalize", "multinomial", "residual", "stratified", "systematic"]
