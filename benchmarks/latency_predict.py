"""How cheap is `LatencyTable.predict`? Times a million predictions of random subnets.

    python benchmarks/latency_predict.py [TABLE.csv]

Prints microseconds per prediction, and what a measured table's end-to-end subnet timing
(from its sidecar) would cost for the same million candidates, side by side.
"""

from __future__ import annotations

import random
import sys
import time

from hwaware.latency import LatencyTable


def main(path: str = "latency_tables/cpu-onnxruntime-fp32-autoformer-t-timm-b1.csv", calls: int = 1_000_000) -> None:
    table = LatencyTable.load(path)
    space = table.space
    rng = random.Random(0)
    archs = [space.sample(rng) for _ in range(10_000)]
    predict = table.predict
    started = time.perf_counter()
    for i in range(calls):
        predict(archs[i % len(archs)])
    seconds = time.perf_counter() - started
    print(f"{path}: {calls:,} predictions in {seconds:.2f} s = {1e6 * seconds / calls:.2f} us each")
    timing = table.meta.get("timing")
    if timing:
        per_subnet = timing["seconds_per_subnet_end_to_end"]
        print(f"measuring instead: {per_subnet:.1f} s per subnet (export + timing) -> "
              f"{per_subnet * calls / 86400:.0f} days for {calls:,}; ratio {per_subnet * calls / seconds:.2e}x")


if __name__ == "__main__":
    main(*sys.argv[1:2])
