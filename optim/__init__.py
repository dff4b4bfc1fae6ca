"""optim: optax-style learning-rate-free and consensus-based optimizers.

Every optimizer is a function returning an ``optax.GradientTransformation`` (or
``GradientTransformationExtraArgs``) with a ``NamedTuple`` state; all compose with
``optax.chain``. Pass ``axis_name`` to make global reductions exact under
``shard_map``/``pmap``.
"""

# --- learning-rate-free optimizers ---
from optim.dadapt import (  # noqa: F401
    DADAPT_ADAM_PRESETS,
    DADAPT_SGD_PRESETS,
    DAdaptAdaGradState,
    DAdaptAdamState,
    DAdaptLionState,
    DAdaptSGDState,
    dadapt_adagrad,
    dadapt_adam,
    dadapt_lion,
    dadapt_sgd,
)
from optim.prodigy import PRODIGY_PRESETS, ProdigyState, prodigy  # noqa: F401
from optim.mechanic import MECHANIC_PRESETS, MechanicState, mechanize  # noqa: F401
from optim.cocob import COCOBState, cocob  # noqa: F401
from optim.dog import (  # noqa: F401
    DOG_PRESETS,
    DOWG_PRESETS,
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
    ScheduleFreeState,
    schedule_free,
    schedule_free_adamw,
    schedule_free_eval_params,
    schedule_free_radam,
    schedule_free_sgd,
)

# --- consensus-based optimization ---
from optim.cbo import (  # noqa: F401
    CBOHistory,
    CBOResult,
    CBOState,
    cbo,
    cbo_minimize,
    cbs,
    consensus_point,
    ess_alpha,
    polar_cbo,
)
