#!/usr/bin/env python3
"""Prints the criterion results under target/criterion as a Markdown table (BENCHMARKS.md).

Median of the per-iteration sample times, the median absolute deviation (MAD) and the 95%
confidence interval of the median, from each benchmark's `new/estimates.json`.
Usage: scripts/criterion-table.py [target/criterion]
"""
import json
import pathlib
import sys


def fmt(ns):
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.3g} {unit}"
    return f"{ns:.3g} ns"


root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "target/criterion")
print("| benchmark | median | MAD | 95% CI of the median |")
print("| --- | ---: | ---: | --- |")
for est in sorted(root.glob("**/new/estimates.json")):
    bench = json.loads((est.parent / "benchmark.json").read_text())
    e = json.loads(est.read_text())
    med, mad = e["median"], e["median_abs_dev"]["point_estimate"]
    ci = med["confidence_interval"]
    print(
        f"| `{bench['full_id']}` | {fmt(med['point_estimate'])} | {fmt(mad)} "
        f"| {fmt(ci['lower_bound'])} – {fmt(ci['upper_bound'])} |"
    )
