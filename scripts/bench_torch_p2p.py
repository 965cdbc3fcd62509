#!/usr/bin/env python3
"""Baselines for eplb's GPU executor, on the identical transfer pattern.

The pattern comes from `eplb-worker bench-migrate --pattern-out PATTERN.json`: per direction,
a list of [src_rank, src_slot, dst_rank, dst_slot] transfers of one expert each, in the global
order. Each timed iteration runs one direction (forward, backward, forward, ...), like the Rust
benchmark, moving every layer's transfers once.

Modes:
  nccl  PyTorch `torch.distributed.batch_isend_irecv` (how vLLM and SGLang move experts):
        one process per GPU, e.g. `torchrun --nproc-per-node 2 bench_torch_p2p.py nccl PATTERN.json`
  peer  the cudaMemcpyPeer ceiling: one process drives all GPUs, every transfer is a
        `copy_` from the source GPU into the destination GPU's staging buffer (copy engines),
        issued both ways: pulled on a stream of the destination, and pushed on a stream per
        (source, destination) pair; the faster of the two is reported per size and rank.
        `python3 bench_torch_p2p.py peer PATTERN.json`

Prints one row per (expert size, rank): experts and MiB received, median time, GB/s.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["nccl", "peer"])
    p.add_argument("pattern", help="JSON written by eplb-worker bench-migrate --pattern-out")
    p.add_argument("--expert-mib", default="4,16,44,64", help="comma-separated expert sizes in MiB")
    p.add_argument("--layers", type=int, default=1, help="layers moved per iteration, one after the other")
    p.add_argument("--iters", type=int, default=10, help="timed iterations per size (after one warm-up)")
    p.add_argument("--json", help="write the results to this file (rank 0)")
    return p.parse_args()


def expert_bytes(mib):
    return int(mib * (1 << 20)) // 8 * 8


def received(pattern, direction, rank):
    return sum(1 for t in pattern[direction] if t[2] == rank)


def run_nccl(args, pattern, sizes):
    import torch.distributed as dist

    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == pattern["num_ranks"], f"pattern is for {pattern['num_ranks']} ranks, got {world}"
    local = int(os.environ.get("LOCAL_RANK", rank))
    torch.cuda.set_device(local)
    dev = torch.device("cuda", local)
    spr = pattern["slots_per_rank"]
    rows = []
    for mib in sizes:
        nbytes = expert_bytes(mib)
        live = [torch.randint(0, 255, (spr, nbytes), dtype=torch.uint8, device=dev) for _ in range(args.layers)]
        staging = torch.empty((spr, nbytes), dtype=torch.uint8, device=dev)
        times, gbs, recv = [], [], []
        for it in range(args.iters + 1):
            direction = "forward" if it % 2 == 0 else "backward"
            dist.barrier()
            torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            for layer in range(args.layers):
                ops = []
                for src, src_slot, dst, dst_slot in pattern[direction]:
                    if dst == rank:
                        ops.append(dist.P2POp(dist.irecv, staging[dst_slot], src))
                    if src == rank:
                        ops.append(dist.P2POp(dist.isend, live[layer][src_slot], dst))
                if ops:
                    for req in dist.batch_isend_irecv(ops):
                        req.wait()
                torch.cuda.synchronize(dev)
            if it > 0:
                t = (time.perf_counter() - t0) / args.layers
                n = received(pattern, direction, rank)
                times.append(t)
                recv.append(n)
                gbs.append(n * nbytes / t / 1e9)
        rows.append(row(mib, rank, recv, nbytes, times, gbs))
        del live, staging
        torch.cuda.empty_cache()
    gathered = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        report([r for rs in gathered for r in rs], "torch batch_isend_irecv (NCCL)", args)
    dist.destroy_process_group()


def run_peer(args, pattern, sizes):
    world = pattern["num_ranks"]
    assert torch.cuda.device_count() >= world, f"needs {world} GPUs"
    devs = [torch.device("cuda", r) for r in range(world)]
    per_dst = [torch.cuda.Stream(device=d) for d in devs]
    pull = {(s, d): per_dst[d] for s in range(world) for d in range(world)}
    push = {(s, d): torch.cuda.Stream(device=devs[s]) for s in range(world) for d in range(world)}
    rows = []
    for variant, streams in (("pull", pull), ("push", push)):
        rows.extend(peer_variant(args, pattern, sizes, devs, streams, variant))
    best = {}
    for r in rows:
        key = (r["expert_mib"], r["rank"])
        if key not in best or r["gb_per_s"] > best[key]["gb_per_s"]:
            best[key] = r
    report(sorted(best.values(), key=lambda r: (r["expert_mib"], r["rank"])),
           "cudaMemcpyPeer ceiling (torch copy_ between GPUs, best of pull/push)", args)


def peer_variant(args, pattern, sizes, devs, streams, variant):
    world = len(devs)
    spr = pattern["slots_per_rank"]
    rows = []
    for mib in sizes:
        nbytes = expert_bytes(mib)
        live = [[torch.randint(0, 255, (spr, nbytes), dtype=torch.uint8, device=d) for d in devs] for _ in range(args.layers)]
        staging = [torch.empty((spr, nbytes), dtype=torch.uint8, device=d) for d in devs]
        per_rank = [([], [], []) for _ in range(world)]
        for it in range(args.iters + 1):
            direction = "forward" if it % 2 == 0 else "backward"
            for d in devs:
                torch.cuda.synchronize(d)
            t0 = time.perf_counter()
            for layer in range(args.layers):
                for src, src_slot, dst, dst_slot in pattern[direction]:
                    with torch.cuda.device(streams[(src, dst)].device), torch.cuda.stream(streams[(src, dst)]):
                        staging[dst][dst_slot].copy_(live[layer][src][src_slot], non_blocking=True)
                for d in devs:
                    torch.cuda.synchronize(d)
            if it > 0:
                t = (time.perf_counter() - t0) / args.layers
                for r in range(world):
                    n = received(pattern, direction, r)
                    per_rank[r][0].append(t)
                    per_rank[r][1].append(n)
                    per_rank[r][2].append(n * nbytes / t / 1e9)
        for r in range(world):
            times, recv, gbs = per_rank[r]
            rows.append(dict(row(mib, r, recv, nbytes, times, gbs), variant=variant))
        del live, staging
        torch.cuda.empty_cache()
    return rows


def row(mib, rank, recv, nbytes, times, gbs):
    n = sum(recv) / len(recv)
    return {"expert_mib": mib, "rank": rank, "recv_experts": n, "recv_bytes": n * nbytes,
            "time_ms_median": statistics.median(times) * 1e3, "gb_per_s": statistics.median(gbs)}


def report(rows, what, args):
    print(f"# {what}: {args.layers} layer(s) per iteration, {args.iters} iterations, median")
    print(f"# {'expert_MiB':>10} {'rank':>5} {'recv':>6} {'recv_MiB':>10} {'time_ms':>9} {'GB/s':>8}")
    for r in rows:
        print(f"  {r['expert_mib']:>10.1f} {r['rank']:>5} {r['recv_experts']:>6.1f} {r['recv_bytes'] / (1 << 20):>10.1f} "
              f"{r['time_ms_median']:>9.3f} {r['gb_per_s']:>8.1f}")
    sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"baseline": what, "results": rows}, f)


def main():
    args = parse()
    with open(args.pattern) as f:
        pattern = json.load(f)
    sizes = [float(x) for x in args.expert_mib.split(",")]
    (run_nccl if args.mode == "nccl" else run_peer)(args, pattern, sizes)


if __name__ == "__main__":
    main()
