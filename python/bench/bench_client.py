"""The client's cost to the engine a step: record(counts) + at_step_boundary() with no command,
and the boundary that applies one layer in place, on one process (agree is the identity here: the
engine's own collective is not the client's cost).

    python python/bench/bench_client.py [--steps 20000] [--cold] [--layers 12] [--slots 16] [--experts 60]
                                        [--expert-bytes 49152] [--world 4] [--backend python|native|both]

``--backend both`` (the default) measures the pure-Python client and the client on the compiled
core (libeplb_client, issue 21) in the same run, interleaved step by step, so that both see the
same machine load; and, where ``eplb_client._fast`` is built, the compiled core's step in one call
(``EngineRegion.step_end``: record + the next boundary, "native step_end").
"""

import argparse
import os
import time

import numpy as np

from eplb_client import EngineRegion, LayerTensor
from eplb_client import region as R
from eplb_client.region import _fast


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--experts", type=int, default=60)
    p.add_argument("--expert-bytes", type=int, default=49152)
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--applies", type=int, default=200)
    p.add_argument("--cold", action="store_true",
                   help="before each step, stream 64 MiB and sleep 2 ms, as a forward pass would: cold caches")
    p.add_argument("--backend", choices=("python", "native", "both"), default="both")
    a = p.parse_args()
    P = a.world * a.slots
    phy2log = np.tile(np.arange(P, dtype=np.int32) % a.experts, (a.layers, 1))
    backends = ["python", "native"] if a.backend == "both" else [a.backend]
    regs = {b: EngineRegion.create(f"bench{os.getpid()}{b}", 0, a.world, a.layers, a.slots, a.experts,
                                   [[LayerTensor("w", np.zeros((a.slots, a.expert_bytes), np.uint8))]
                                    for _ in range(a.layers)], phy2log, ring_len=64, backend=b) for b in backends}
    for b, r in regs.items():
        assert r.backend == b, (b, r.backend)
        r.publish()
    counts = np.random.default_rng(0).integers(0, 500, (a.layers, a.slots))
    # One engine rank: no agreement (None); several: the identity stands for the engine's collective.
    agree = (lambda have: (have, have)) if a.world > 1 else None  # noqa: E731
    times = {b: ([], [], []) for b in backends}  # boundary, record, both
    end = None
    if "native" in backends and _fast is not None:
        step_reg = EngineRegion.create(f"bench{os.getpid()}step", 0, a.world, a.layers, a.slots, a.experts,
                                       [[LayerTensor("w", np.zeros((a.slots, a.expert_bytes), np.uint8))]
                                        for _ in range(a.layers)], phy2log, ring_len=64, backend="native")
        step_counts = counts.astype(np.int64)  # the engine's buffer, bound once
        end = step_reg.step_end(step_counts, agree, compiled=True)
        step_reg.at_step_boundary(0, agree)
        times["native step_end"] = ([], [], [])
    flush = np.ones(8 << 20) if a.cold else None
    for t in range(a.steps):
        for b in backends:  # interleaved: both backends see the same load
            reg = regs[b]
            bnd, rec, both = times[b]
            if flush is not None:
                flush *= 1.0
                time.sleep(0.002)
            t0 = time.perf_counter_ns()
            reg.at_step_boundary(t, agree)
            t1 = time.perf_counter_ns()
            reg.record(t, counts, phase="decode", tokens=256)
            t2 = time.perf_counter_ns()
            bnd.append(t1 - t0), rec.append(t2 - t1), both.append(t2 - t0)
        if end is not None:
            if flush is not None:
                flush *= 1.0
                time.sleep(0.002)
            t0 = time.perf_counter_ns()
            end(t, "decode", 256)  # record t + the boundary of t + 1
            times["native step_end"][2].append(time.perf_counter_ns() - t0)
    # Baseline: the least an engine does to hand its counts to anyone (a copy into a buffer and a
    # clock read), without the ring's sequence lock or the mailbox.
    buf = np.zeros((64, a.layers, a.slots), np.uint64)
    base = []
    for t in range(a.steps):
        if flush is not None:
            flush *= 1.0
            time.sleep(0.002)
        t0 = time.perf_counter_ns()
        np.copyto(buf[t % 64], counts, casting="unsafe")
        time.monotonic_ns()
        base.append(time.perf_counter_ns() - t0)
    # Applies: a command for the next boundary that swaps the experts of two local slots and
    # re-copies every local slot (the worst case: the whole layer's local slots staged).
    apply_times = {b: apply_bench(regs[b], a, counts, agree) for b in backends}
    for r in regs.values():
        r.finish()
    if end is not None:
        step_reg.finish()
    us = lambda v: np.array(v) / 1000.0  # noqa: E731
    print(f"# client cost, {a.layers} layers x {a.slots} slots, world {a.world}, {a.steps} steps"
          f"{', cold caches' if a.cold else ''}")
    rows = [(f"{b}: record + boundary", times[b][2]) for b in backends]
    if end is not None:
        rows += [("native step_end (one call)", times["native step_end"][2])]
    rows += [(f"{b}: boundary (no command)", times[b][0]) for b in backends]
    rows += [(f"{b}: record", times[b][1]) for b in backends]
    rows += [("baseline: copy + clock", base)]
    for label, v in rows:
        v = us(v)
        print(f"{label:>32}: median {np.median(v):7.2f} us  p99 {np.percentile(v, 99):8.2f} us  max {v.max():9.2f} us")
    mib = a.slots * a.expert_bytes / 2**20
    for b in backends:
        v = us(apply_times[b])
        print(f"{b + ': boundary + apply':>32}: median {np.median(v):7.2f} us  p99 {np.percentile(v, 99):8.2f} us  "
              f"max {v.max():9.2f} us  ({a.slots} slots x {a.expert_bytes} B = {mib:.2f} MiB copied)")


def apply_bench(reg, a, counts, agree):
    h = reg._h
    apply_ns = []
    for i in range(a.applies):
        t = reg.engine_step
        layer = i % a.layers
        row = reg.placement().phy2log[layer].copy()
        row[0], row[1] = row[1], row[0]
        seq = int(h[R._W_CMD_SEQ])
        h[R._W_CMD_SEQ] = seq + 1
        h[R._W_CMD_ID], h[R._W_CMD_LAYER], h[R._W_CMD_APPLY_STEP] = i + 1, layer, t
        h[R._W_CMD_EPOCH] = int(reg.placement().epoch[layer]) + 1
        reg._cmd_row[:] = row
        reg._cmd_mask[:] = 1
        h[R._W_CMD_SEQ] = seq + 2
        t0 = time.perf_counter_ns()
        placement = reg.at_step_boundary(t, agree)
        apply_ns.append(time.perf_counter_ns() - t0)
        assert placement.applied == [layer]
        reg.record(t, counts)
    return apply_ns


if __name__ == "__main__":
    main()
