"""Shared helpers for benchmarks: timing with medians, and result files (JSON + markdown)."""

from __future__ import annotations

import json
import os
import platform
import time

import jax

# the committed results; `make bench` (quick smoke runs) redirects them with JAXDIFF_BENCH_RESULTS
RESULTS = os.environ.get("JAXDIFF_BENCH_RESULTS") or os.path.join(os.path.dirname(__file__), "results")


def median_time(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` (which must block until done) over ``repeats`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def interleaved(fns: dict, repeats: int) -> dict:
    """Wall times of each ``fns[name]()`` (which must block), ``repeats`` rounds, the peers interleaved.

    Each round calls every peer once, the order rotated round by round, so all peers see the same
    machine load and none always finds the caches warmed by another. Returns ``{name: sorted times}``.
    """
    names = list(fns)
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: sorted(ts) for name, ts in times.items()}


def spread(times: list) -> dict:
    """Median and the interquartile range of sorted times."""
    n = len(times)
    return {"median": times[n // 2], "q25": times[n // 4], "q75": times[(3 * n) // 4], "min": times[0], "max": times[-1]}


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
    }


def write_results(name: str, record: dict, table_rows: list[dict], title: str, notes: str = "") -> str:
    """Write benchmarks/results/<name>.json and <name>.md; return the markdown."""
    os.makedirs(RESULTS, exist_ok=True)
    record = dict(record, machine=machine())
    with open(os.path.join(RESULTS, f"{name}.json"), "w") as f:
        json.dump(record, f, indent=2, default=float)
    cols = list(dict.fromkeys(c for r in table_rows for c in r))  # rows may have different columns
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = [f"# {title}", "", f"Machine: {record['machine']['platform']}, backend {record['machine']['backend']}, "
             f"{record['machine']['cpu_count']} CPUs, jax {record['machine']['jax']}.", ""]
    if notes:
        lines += [notes, ""]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in table_rows]
    md = "\n".join(lines) + "\n"
    with open(os.path.join(RESULTS, f"{name}.md"), "w") as f:
        f.write(md)
    return md
