#!/usr/bin/env bash
# One short GPU check (run from the repo root on a CUDA machine that has jax, flax, optax, diffrax):
# the jitted sampler's overhead, DPM-Solver-v3's overhead, one optimizer step on a 10M-parameter tree,
# the CBO anchor.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 -c "import jax; print(jax.__version__, jax.devices())"
python3 -m benchmarks.sampler_speed --quick --name sampler_speed_gpu
python3 -m benchmarks.dpm_solver_v3 --quick
python3 -m benchmarks.optim_step --quick
python3 - <<'PY'
import time, numpy as np
from benchmarks.cbo_speed import ANCHOR, initial_ensembles, make_jax_runner, successes
x0 = initial_ensembles(ANCHOR["runs"], ANCHOR["n"], ANCHOR["d"], ANCHOR["box"])
run = make_jax_runner("rastrigin", 0.0, ANCHOR, "anisotropic")
t = time.perf_counter(); c = run(x0, 0); first = time.perf_counter() - t
t = time.perf_counter(); c = run(x0, 1); again = time.perf_counter() - t
print(f"CBO anchor on GPU (100 runs x 5000 steps, float32): first call {first:.2f} s, run {again:.2f} s, "
      f"successes {successes(c, 0.0, ANCHOR['tol'])}/100")
PY
