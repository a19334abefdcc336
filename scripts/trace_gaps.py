#!/usr/bin/env python3
r"""Where a training step's GPU time goes, from a scripts/cupti_trace.c timeline.

    python3 scripts/trace_gaps.py trace.txt [kernels]     (kernels: how many of each stream's to list; 0: none)

Takes the last complete step (from one embedding kernel to the next: run `mosft bench` with at least
two steps) and prints its wall time, the time no stream had anything running, each stream's busy time
and the gaps between its consecutive operations (a gap under 20 us is the launch latency between two
queued operations or a wait on another stream; longer ones are the host not keeping up or a
synchronization), the stretches with no stream busy, the busiest stream's gaps by the operation after
them, how far the host's launch calls ran ahead of the kernels on the busiest stream (with
MOSFT_TRACE_API=1), the busiest stream's kernels alone against beside other streams' work, and each
stream's largest kernels.
"""
import collections
import sys


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 15
    ops, api = [], {}
    for line in open(sys.argv[1], errors="replace"):
        f = line.rstrip("\n").split(" ", 5)
        if f[0] in ("K", "M") and len(f) == 6:
            ops.append((int(f[1]), int(f[2]), int(f[3]), int(f[4]), f[5]))
        elif f[0] == "A" and len(f) >= 5:
            api[int(f[3])] = (int(f[1]), int(f[2]))
    ops.sort()
    starts = [o[0] for o in ops if "embedding" in o[4]]
    if len(starts) < 2:
        sys.exit(f"{sys.argv[1]}: fewer than two embedding kernels (run at least two steps)")
    t0, t1 = starts[-2], starts[-1]
    step = [o for o in ops if t0 <= o[0] < t1]
    busy, cur_s, cur_e = 0, None, None
    for s, e, *_ in step:
        if cur_e is None or s > cur_e:
            busy += 0 if cur_e is None else cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    print(f"step: {(t1 - t0) / 1e6:.2f} ms wall, {len(step)} operations, "
          f"no stream busy for {(t1 - t0 - busy) / 1e6:.2f} ms")
    idle, last = [], None  # (length, previous op, next op) of each time no stream ran, over 10 us
    for o in step:
        if last is not None and o[0] - last[1] > 10000:
            idle.append((o[0] - last[1], last[4][:60], o[4][:60]))
        if last is None or o[1] > last[1]:
            last = o
    for g, a, b in sorted(idle, reverse=True)[:8]:
        print(f"  idle {g / 1e3:8.1f} us after {a} | before {b}")
    streams = collections.defaultdict(list)
    for o in step:
        streams[o[2]].append(o)
    order = sorted(streams, key=lambda s: -sum(o[1] - o[0] for o in streams[s]))
    for sid in order:
        lst = streams[sid]
        gaps = [b[0] - a[1] for a, b in zip(lst, lst[1:])]
        short = sorted(g for g in gaps if 0 <= g < 20000)
        med = short[len(short) // 2] / 1e3 if short else 0.0
        print(f"stream {sid}: {len(lst)} operations, busy {sum(o[1] - o[0] for o in lst) / 1e6:.2f} ms; "
              f"{len(short)} gaps under 20 us: {sum(short) / 1e6:.2f} ms (median {med:.1f} us); "
              f"longer gaps: {sum(g for g in gaps if g >= 20000) / 1e6:.2f} ms")
    if api:
        lead = sorted(o[0] - api[o[3]][1] for o in streams[order[0]] if o[3] in api)
        if lead:
            print(f"stream {order[0]}: kernel start - its launch call's return: median {lead[len(lead) // 2] / 1e3:.1f} us, "
                  f"under 3 us (the host late) for {sum(1 for x in lead if x < 3000)} of {len(lead)}")
    main = streams[order[0]]
    by_next = collections.defaultdict(lambda: [0, 0])
    for a, b in zip(main, main[1:]):
        g = b[0] - a[1]
        if 0 <= g < 20000:
            by_next[b[4][:60]][0] += g
            by_next[b[4][:60]][1] += 1
    print(f"== stream {order[0]}: gaps under 20 us by the operation after them")
    for name, (g, n) in sorted(by_next.items(), key=lambda x: -x[1][0])[:top // 3 if top > 0 else 0]:
        print(f"{g / 1e6:9.3f} ms {n:6d}x  (mean {g / n / 1e3:.1f} us)  {name}")
    # the main stream's kernels by how much of their time other streams' operations ran beside them:
    # alone (< 10 %) against beside others (> 50 %), mean us each (what the other streams cost them)
    others = [(o[0], o[1]) for o in step if o[2] != order[0]]
    ovl = collections.defaultdict(lambda: {"alone": [], "beside": []})
    for o in main:
        d = o[1] - o[0]
        if d <= 0:
            continue
        f = sum(min(b, o[1]) - max(a, o[0]) for a, b in others if b > o[0] and a < o[1]) / d
        if f < 0.1 or f > 0.5:
            ovl[o[4][:60]]["alone" if f < 0.1 else "beside"].append(d)
    print(f"== stream {order[0]}: kernels alone / beside other streams (mean us, count)")
    for name, v in sorted(ovl.items(), key=lambda x: -sum(x[1]["alone"]) - sum(x[1]["beside"]))[:top // 3 if top > 0 else 0]:
        cell = lambda l: f"{sum(l) / len(l) / 1e3:8.1f} {len(l):4d}x" if l else f"{'-':>8} {0:4d}x"
        print(f"{cell(v['alone'])} | {cell(v['beside'])}  {name}")
    for sid in order if top > 0 else []:
        agg = collections.defaultdict(lambda: [0, 0])
        for o in streams[sid]:
            agg[o[4][:70]][0] += o[1] - o[0]
            agg[o[4][:70]][1] += 1
        print(f"== stream {sid}")
        for name, (t, n) in sorted(agg.items(), key=lambda x: -x[1][0])[:top]:
            print(f"{t / 1e6:9.2f} ms {n:6d}x  {name}")


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:  # piped into head
        pass
