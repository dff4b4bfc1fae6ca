"""Named hyperparameter settings of every learning-rate-free transform, in one place, each with its source.

``PRESETS[name][preset]`` is a dict of keyword arguments for ``optim.<name>``:
``optim.prodigy(**optim.PRESETS["prodigy"]["calibrated"])``. Every transform has

* ``"paper"`` (or ``"reference"`` for the schedule-free methods): the published defaults of the
  reference implementation, which are also the factory defaults here (``{}`` where nothing differs);
* ``"calibrated"``: one setting per transform chosen once across the workload library of
  ``benchmarks/workloads`` (a digits U-Net diffusion model, a digits CNN, a character transformer,
  logistic regression, an ill-conditioned quadratic) by ``benchmarks/optim_calibration.py``, the
  procedure of Kasimbeg et al. (2025): each candidate runs on every workload and the one with the
  best score across all of them (not per workload) is kept. The table behind each choice and the
  leave-one-workload-out check are in ``benchmarks/results/optim_calibration.md``; none of them has
  a schedule. Each grid is the published default and three neighbours: the learning-rate multiplier (1
  or 0.5; schedule-free AdamW/RAdam: 0.0025 or 0.01) times one more knob (beta2, momentum, DoG's
  ``reps_rel``, COCOB's alpha, Mechanic's weight decay and ``s_init``).

and some have more (``"optax"``: the behaviour of the ``optax.contrib`` function of the same
algorithm; ``"diffusion"``, ``"batchnorm"``, ``"momentum"``, ``"algoperf"``: advice from the
reference's README or a competition entry, sources below).

References:
  Kasimbeg, Roulet, Agarwal, Medapati, Pedregosa, Agarwala, Dahl, `How far away are truly
  hyperparameter-free learning algorithms? <https://arxiv.org/abs/2505.24005>`_, 2025.
"""

from __future__ import annotations

from typing import Any

#: The choices of ``benchmarks/optim_calibration.py`` (run of 2026-12-08 on a shared 2-core CPU,
#: 2 seeds; workloads quadratic, digits_logreg, text_lm, digits_cnn;
#: the table: ``benchmarks/results/optim_calibration.md``).
_CALIBRATED: dict[str, dict[str, Any]] = {
    "prodigy": {"learning_rate": 1.0, "betas": (0.9, 0.99)},
    "dadapt_adam": {"learning_rate": 1.0, "betas": (0.9, 0.99)},
    "dadapt_sgd": {"learning_rate": 1.0, "momentum": 0.9},
    "dadapt_adagrad": {"learning_rate": 1.0, "momentum": 0.9},
    "dadapt_lion": {"learning_rate": 0.5, "betas": (0.9, 0.99)},
    "dog": {"learning_rate": 1.0, "reps_rel": 0.0001},
    "ldog": {"learning_rate": 1.0, "reps_rel": 0.0001},
    "dowg": {"learning_rate": 1.0, "reps_rel": 0.0001},
    "cocob": {"learning_rate": 1.0, "alpha": 10.0},
    "mechanize": {"weight_decay": 0.0, "s_init": 1e-06},
    "schedule_free_sgd": {"learning_rate": 1.0, "b1": 0.9},
    "schedule_free_adamw": {"learning_rate": 0.01, "b2": 0.995},
    "schedule_free_radam": {"learning_rate": 0.01, "b2": 0.995},
}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # prodigyopt 1.1.2 defaults; its README for diffusion models; optax.contrib.prodigy (bias correction always on)
    "prodigy": {
        "paper": {},
        "diffusion": {"safeguard_warmup": True, "use_bias_correction": True, "weight_decay": 0.01},
        "optax": {"use_bias_correction": True},
    },
    # dadaptation 3.2 DAdaptAdam defaults (coupled decay, no bias correction); optax.contrib.dadapt_adamw
    "dadapt_adam": {
        "paper": {},
        "optax": {"use_bias_correction": True, "decouple": True},
    },
    # dadaptation 3.2 DAdaptSGD defaults (momentum 0 diverges on small tanh networks in PyTorch itself);
    # momentum 0.9, the usual SGD momentum, is stable on the same networks
    "dadapt_sgd": {
        "paper": {},
        "momentum": {"momentum": 0.9},
    },
    "dadapt_adagrad": {"paper": {}},  # dadaptation 3.2 DAdaptAdaGrad
    "dadapt_lion": {"paper": {}},  # dadaptation 3.2 DAdaptLion (marked experimental there)
    # Ivgi et al. (2023) and dog-optimizer 1.0.3: reps_rel 1e-6; its README: 1e-4 with batch normalisation
    "dog": {
        "paper": {"reps_rel": 1e-6, "eps": 1e-8},
        "batchnorm": {"reps_rel": 1e-4, "eps": 1e-8},
    },
    "ldog": {
        "paper": {"reps_rel": 1e-6, "eps": 1e-8},
        "batchnorm": {"reps_rel": 1e-4, "eps": 1e-8},
    },
    # Khaled et al. (2023), Algorithm 1, with DoG's relative r_eps; optax.contrib.dowg: eps = 1e-4 is both the
    # initial squared distance and the denominator guard
    "dowg": {
        "paper": {"reps_rel": 1e-6, "eps": 1e-8},
        "optax": {"init_estim_sq_dist": 1e-4, "eps": 1e-4},
    },
    "cocob": {"paper": {}},  # Orabona & Tommasi (2017), alpha = 100; the authors' TensorFlow code: L_0 = 1e-8
    # mechanic-pytorch defaults (s_init 1e-8); optax.contrib.mechanize's s_init (its clamping of h is not reproduced)
    "mechanize": {
        "paper": {},
        "optax": {"s_init": 1e-6},
    },
    # schedulefree 1.4.1 defaults
    "schedule_free_sgd": {"reference": {"learning_rate": 1.0, "b1": 0.9, "weight_decay": 0.0}},
    "schedule_free_adamw": {
        "reference": {"learning_rate": 0.0025, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 0.0, "r": 0.0,
                      "weight_lr_power": 2.0},
        # the AlgoPerf 2024 self-tuning winner (schedulefree/algoperf/self_tuning/schedule_free_adamw/submission.py);
        # it also warms up over 2% of the run: add warmup_steps=int(0.02 * total_steps)
        "algoperf": {"learning_rate": 0.0025, "b1": 0.9, "b2": 0.9955159689799007, "eps": 1e-8,
                     "weight_decay": 0.08121616522670176, "r": 0.75, "weight_lr_power": 2.0},
    },
    "schedule_free_radam": {"reference": {"learning_rate": 0.0025, "b1": 0.9, "b2": 0.999, "weight_decay": 0.0}},
}

for _name, _settings in _CALIBRATED.items():
    PRESETS[_name]["calibrated"] = _settings
