"""Every benchmark in quick mode (a smoke run of the whole set): ``python -m benchmarks.run_all``.

Quick runs are too short for numbers worth keeping, so their result files go to ``--out`` (default
``bench-quick/``, git-ignored), never over the committed ``benchmarks/results``. Full runs: run each module
without ``--quick`` (see the README for the commands). Exits non-zero if any benchmark fails.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

BENCHMARKS = (
    "sampler_speed",
    "digits_quality",
    "dpm_solver_v3",
    "adjoint_memory",
    "adjoint_vs_diffrax",
    "fkc_accuracy",
    "fkc_overhead",
    "optim_step",
    "optim_usefulness",
    "cbo_speed",
    "cbo_parity",
    "optim_calibration",
)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-quick", help="folder for the quick runs' result files")
    parser.add_argument("--only", nargs="*", default=None, help="run only these benchmarks")
    opts = parser.parse_args(argv)
    env = dict(os.environ, JAXDIFF_BENCH_RESULTS=os.path.abspath(opts.out))
    failed = []
    for name in opts.only or BENCHMARKS:
        start = time.perf_counter()
        print(f"== benchmarks.{name} --quick", flush=True)
        code = subprocess.call([sys.executable, "-m", f"benchmarks.{name}", "--quick"], env=env)
        print(f"== benchmarks.{name}: {'ok' if code == 0 else f'FAILED ({code})'} in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        if code:
            failed.append(name)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
