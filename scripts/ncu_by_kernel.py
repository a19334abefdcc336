#!/usr/bin/env python3
r"""Sum an ncu CSV (--metrics gpu__time_duration.sum --csv) by kernel name, largest first.

    MOSFT_CUDA_PROFILE_STEP=2 ncu --profile-from-start off --clock-control none \
        --metrics gpu__time_duration.sum --csv build/mosft bench --model DIR ... > step.csv
    python3 scripts/ncu_by_kernel.py step.csv [rows]
"""
import collections
import csv
import sys


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    rows = list(csv.reader(open(sys.argv[1], newline="")))
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 30
    head = next((i for i, r in enumerate(rows) if "Kernel Name" in r), None)
    if head is None:
        sys.exit(f"{sys.argv[1]}: no 'Kernel Name' column (not an ncu --csv file?)")
    h = rows[head]
    kn, mv, mu = h.index("Kernel Name"), h.index("Metric Value"), h.index("Metric Unit")
    scale = {"nsecond": 1e6, "usecond": 1e3, "msecond": 1.0}
    agg = collections.defaultdict(lambda: [0, 0.0])
    for r in rows[head + 1:]:
        if len(r) <= mv:
            continue
        try:
            v = float(r[mv].replace(",", "")) / scale.get(r[mu], 1e6)
        except ValueError:
            continue
        name = r[kn].split("(")[0][:72]
        agg[name][0] += 1
        agg[name][1] += v
    total = sum(v for _, v in agg.values())
    print(f"total {total:.3f} ms over {sum(n for n, _ in agg.values())} kernels")
    for name, (n, v) in sorted(agg.items(), key=lambda x: -x[1][1])[:top]:
        print(f"{v:9.3f} ms {100 * v / total:5.1f}% {n:5d}x  {name}")


if __name__ == "__main__":
    main()
