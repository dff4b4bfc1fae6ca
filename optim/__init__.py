"""optim: optax-style learning-rate-free and consensus-based optimizers.

Every optimizer is a function returning an ``optax.GradientTransformationExtraArgs`` with a
``NamedTuple`` state; all compose with ``optax.chain``. Pass ``axis_name`` to make global
reductions exact under ``shard_map``/``pmap``.

Drop-in for ``optax.contrib``: ``prodigy``, ``dadapt_adamw``, ``dog``, ``dowg``, ``cocob``,
``mechanize``, ``schedule_free``, ``schedule_free_sgd``, ``schedule_free_adamw`` and
``schedule_free_eval_params`` have optax.contrib's names and positional argument order (options
optax lacks are keyword-only); where a default or a detail of the algorithm differs, the function's
docstring says so, and ``tests/optim/test_optax_dropin.py`` measures it.

Named settings of every learning-rate-free transform, including ``"calibrated"`` (one setting
chosen across a workload library), are ``optim.PRESETS[name]`` (``optim.presets``).
"""

from optim.presets import PRESETS  # noqa: F401

# --- learning-rate-free optimizers ---
from optim.dadapt import (  # noqa: F401
    DADAPT_ADAM_PRESETS,
    DAdaptAdamState,
    DAdaptLionState,
    dadapt_adam,
    dadapt_adamw,
    dadapt_lion,
)
from optim.dadapt_dual import DADAPT_SGD_PRESETS, DAdaptAdaGradState, DAdaptSGDState, dadapt_adagrad, dadapt_sgd  # noqa
from optim.prodigy import PRODIGY_PRESETS, ProdigyState, prodigy  # noqa: F401
from optim.mechanic import MECHANIC_PRESETS, MechanicState, mechanize  # noqa: F401
from optim.cocob import COCOBState, cocob  # noqa: F401
from optim.dog import (  # noqa: F401
    DOG_PRESETS,
    DOWG_PRESETS,
    LDOG_PRESETS,
    DoGState,
    PolynomialDecayAveragingState,
    averaged_params,
    dog,
    dowg,
    ldog,
    polynomial_decay_averaging,
)
from optim.schedule_free import (  # noqa: F401
    SCHEDULE_FREE_ADAMW_PRESETS,
    SCHEDULE_FREE_RADAM_PRESETS,
    SCHEDULE_FREE_SGD_PRESETS,
    ScheduleFreeState,
    schedule_free_adamw,
    schedule_free_eval_params,
    schedule_free_radam,
    schedule_free_sgd,
)
from optim.schedule_free_wrapper import schedule_free  # noqa: F401

# --- consensus-based optimization ---
from optim._cbo_base import CBOState  # noqa: F401
from optim._cbo_driver import CBOHistory, CBOResult, cbo_minimize  # noqa: F401
from optim._consensus import consensus_point, ess_alpha  # noqa: F401
from optim.cbo import cbo, polar_cbo  # noqa: F401
from optim.cbs import cbs  # noqa: F401
