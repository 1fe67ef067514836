"""Articulated-shape generation speed: samples per second, singles and pairs, at each size.

    python bench/articulated_data.py [--count 4000] [--sizes 28,32,64] [--reps 3] [--families ...]

`generate` in this process with its default options (4x4 supersampling,
silhouettes, jitter and rotation on). Each cell is the best of `--reps` runs of `--count` samples
(fewer at 64 px, see `--count-64`), timed in process CPU seconds so that other load on a shared
machine counts less; wall-clock rates are printed beside them. The ratio column is pairs against
singles at the same size, measured in this run.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from neuroplast.data.articulated import ALL_FAMILIES, FAMILIES, generate


def rates(count: int, reps: int, **options) -> tuple[float, float]:
    """Best samples per second over `reps` runs: (CPU time, wall clock)."""
    cpu = wall = 0.0
    for rep in range(reps):
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        generate(count, seed=rep, **options)
        cpu = max(cpu, count / (time.process_time() - start_cpu))
        wall = max(wall, count / (time.perf_counter() - start_wall))
    return cpu, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=4000, help="samples per timed run at 28 and 32 px")
    parser.add_argument("--count-64", type=int, default=1000, help="samples per timed run at 64 px")
    parser.add_argument("--sizes", default="28,32,64")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"from: {', '.join(ALL_FAMILIES)}")
    args = parser.parse_args()
    families = tuple(args.families.split(","))
    generate(50, families=families)  # warm-up: imports, first allocations

    print(f"numpy {np.__version__}, {platform.processor() or platform.machine()}, families {', '.join(families)}")
    print("| size | singles/s (cpu) | pairs/s (cpu) | pairs / singles | singles/s (wall) | pairs/s (wall) |")
    print("|---|---|---|---|---|---|")
    for size in map(int, args.sizes.split(",")):
        count = args.count_64 if size >= 64 else args.count
        single_cpu, single_wall = rates(count, args.reps, size=size, families=families)
        pair_cpu, pair_wall = rates(count, args.reps, size=size, families=families, pairs=True)
        print(
            f"| {size} | {single_cpu:,.0f} | {pair_cpu:,.0f} | {pair_cpu / single_cpu:.2f} "
            f"| {single_wall:,.0f} | {pair_wall:,.0f} |"
        )


if __name__ == "__main__":
    main()
