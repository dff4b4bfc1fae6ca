"""A small workload library for optimizers, in the AlgoPerf sense: a model, a training loss on
minibatches, a validation metric, a target for it and a step budget (``base.Workload``).

* ``digits_unet``: the digits diffusion U-Net of ``jaxdiff.pretrained.train_digits`` (its loss);
* ``digits_cnn``: a small CNN classifier on the same 8x8 digits;
* ``text_lm``: a character transformer on the standard library's ``pydoc_data.topics`` text;
* ``digits_logreg``: multinomial logistic regression on the digits, full batch;
* ``quadratic``: a quadratic with condition number 1e4.

Each is sized to train in seconds on 2 CPU cores (``scale="cpu"``); ``scale="gpu"`` gives the larger
models and budgets (the shipped U-Net, wider CNN and transformer), whose targets must be set again
(``benchmarks/optim_calibration.py --set-targets``). Targets: the validation value the tuned NadamW
baseline (best of a 7-point learning-rate grid, warmup-cosine) reaches at half the step budget,
median over the calibration seeds, so the tuned baseline hits them at about half the budget.
"""

from benchmarks.workloads.base import Group, Workload, step_time, steps_to_target, train, train_many  # noqa: F401
from benchmarks.workloads.digits_cnn import digits_cnn
from benchmarks.workloads.digits_unet import digits_unet
from benchmarks.workloads.simple import digits_logreg, quadratic
from benchmarks.workloads.text_lm import text_lm

WORKLOADS = {"digits_unet": digits_unet, "digits_cnn": digits_cnn, "text_lm": text_lm, "digits_logreg": digits_logreg,
             "quadratic": quadratic}


def make(name: str, scale: str = "cpu", **kw) -> Workload:
    """The workload ``name`` at ``scale`` ("cpu" or "gpu"); ``kw`` override its defaults (e.g. ``target``)."""
    if name not in WORKLOADS:
        raise ValueError(f"Unknown workload `{name}`; expected one of {sorted(WORKLOADS)}.")
    if scale not in ("cpu", "gpu"):
        raise ValueError(f"`scale` must be 'cpu' or 'gpu', got {scale!r}.")
    return WORKLOADS[name](scale, **kw)
