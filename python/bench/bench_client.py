"""The client's cost to the engine a step: record(counts) + at_step_boundary() with no command,
and the boundary that applies one layer in place, on one process (agree is the identity here: the
engine's own collective is not the client's cost).

    python python/bench/bench_client.py [--steps 20000] [--cold] [--layers 12] [--slots 16] [--experts 60]
                                        [--expert-bytes 49152] [--world 4]
"""

import argparse
import os
import time

import numpy as np

from eplb_client import EngineRegion, LayerTensor
from eplb_client import region as R


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
    a = p.parse_args()
    P = a.world * a.slots
    phy2log = np.tile(np.arange(P, dtype=np.int32) % a.experts, (a.layers, 1))
    reg = EngineRegion.create(f"bench{os.getpid()}", 0, a.world, a.layers, a.slots, a.experts,
                              [[LayerTensor("w", np.zeros((a.slots, a.expert_bytes), np.uint8))] for _ in range(a.layers)],
                              phy2log, ring_len=64)
    reg.publish()
    counts = np.random.default_rng(0).integers(0, 500, (a.layers, a.slots))
    agree = lambda have: (have, have)  # noqa: E731
    rec, bnd, both = [], [], []
    flush = np.ones(8 << 20) if a.cold else None
    for t in range(a.steps):
        if flush is not None:
            flush *= 1.0
            time.sleep(0.002)
        t0 = time.perf_counter_ns()
        reg.at_step_boundary(t, agree)
        t1 = time.perf_counter_ns()
        reg.record(t, counts, phase="decode", tokens=256)
        t2 = time.perf_counter_ns()
        bnd.append(t1 - t0), rec.append(t2 - t1), both.append(t2 - t0)
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
    reg.finish()
    us = lambda v: np.array(v) / 1000.0  # noqa: E731
    print(f"# client cost, {a.layers} layers x {a.slots} slots, world {a.world}, {a.steps} steps"
          f"{', cold caches' if a.cold else ''}")
    for label, v in (("record + boundary", both), ("boundary (no command)", bnd), ("record", rec),
                     ("baseline: copy + clock", base)):
        v = us(v)
        print(f"{label:>24}: median {np.median(v):7.2f} us  p99 {np.percentile(v, 99):8.2f} us  max {v.max():9.2f} us")
    v = us(apply_ns)
    mib = a.slots * a.expert_bytes / 2**20
    print(f"{'boundary + apply':>24}: median {np.median(v):7.2f} us  p99 {np.percentile(v, 99):8.2f} us  max {v.max():9.2f} us"
          f"  ({a.slots} slots x {a.expert_bytes} B = {mib:.2f} MiB copied)")


if __name__ == "__main__":
    main()
