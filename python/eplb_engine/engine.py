"""The reference MoE engine: N processes, one per expert-parallel rank, in lock-step (mpi4py).

    mpirun -n 4 python -m eplb_engine --name demo --steps 200 \\
        --trace expert_freq_qwen_policy_datasets.csv --trace-dataset wikitext --report engine.json

Every step, every rank:

1. ``at_step_boundary``: the client reads the mailbox, the ranks agree (one MPI_Allreduce of 2
   integers), a command is applied in place or not at all, and the router gets the placement;
2. makes the step's tokens and, layer by layer: routes every token (top-k, following the load),
   maps each (token, expert) pair to the slot the placement and the replica rule choose, computes
   only the pairs of its own slots with the weights in the shared-memory region (each layer's
   tensors as vLLM and SGLang store them, ``--quant none|fp8-block|nvfp4``, dequantised exactly
   for the product: quant.py), all-gathers the
   pair results (MPI_Allgatherv), combines them in fixed top-k order, and checks the combined
   output of its share of the tokens bit for bit against the reference forward pass (every expert
   held once, weights generated from (seed, layer, expert));
3. records its per-slot counts in the load ring.

Rank 0 writes the report: steps, whether every output matched, the layer switches and whether
every rank switched each at the same step, bytes of applied weights (every per-expert tensor)
that were not the expert the placement names, bytes of the global tensors that changed (must
be 0), and the balancedness from the engine's own counts (live: the placements in
force; static: the initial placement on the same tokens).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from eplb_client import EngineRegion, LayerTensor, derive_log2phy, split

from . import loads, model, quant

log = logging.getLogger("eplb_engine")


def add_common_args(p: argparse.ArgumentParser, name: str, steps: int, shape: Dict[str, int]) -> None:
    """The flags both reference engines take (the CPU one here, the GPU one in ``gpu.py``);
    ``shape``: the defaults of num_layers, num_experts, tokens, top_k, hidden and ffn."""
    p.add_argument("--name", default=name, help="region name: /dev/shm/eplb-NAME-RANK")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--trace", help="load file: .npy [steps][layers][experts], the per-iteration CSV, or the Qwen3 "
                                   "recorder's JSON counts")
    p.add_argument("--trace-dataset", help="dataset of the per-iteration CSV (default: its first)")
    p.add_argument("--num-layers", type=int, default=shape["num_layers"], help="built-in load: layers")
    p.add_argument("--num-experts", type=int, default=shape["num_experts"], help="built-in load: experts")
    p.add_argument("--slots-per-rank", type=int, help="default: one redundant slot a rank, ceil((E + N) / N)")
    p.add_argument("--tokens", type=int, default=shape["tokens"], help="tokens a step, over all ranks")
    p.add_argument("--top-k", type=int, default=shape["top_k"])
    p.add_argument("--hidden", type=int, default=shape["hidden"])
    p.add_argument("--ffn", type=int, default=shape["ffn"], help="the expert's intermediate size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dispatch", choices=["even", "split"], default="even",
                   help="which replica computes a pair: even (replica (token + layer) %% count) or split "
                        "(eplb_client.split: the exact min-max quotas of the step's counts, filled in "
                        "(token, k) order; the output does not change, only where it is computed)")
    p.add_argument("--phase", choices=["decode", "prefill", "mixed"], default="decode", help="phase the ring marks")
    p.add_argument("--ring-len", type=int, default=64)
    p.add_argument("--wait-sidecar", type=float, default=0.0,
                   help="before step 0, wait up to this many seconds for a sidecar on every rank")
    p.add_argument("--report", help="JSON report from rank 0")
    p.add_argument("--log-every", type=int, default=0, help="progress line every N steps (rank 0)")
    p.add_argument("--quant", choices=quant.QUANTS, default="none",
                   help="the experts' tensors, as vLLM and SGLang store them: none (bf16 w13_weight, w2_weight), "
                        "fp8-block (fp8 e4m3 weights + fp32 *_weight_scale_inv blocks), nvfp4 (packed fp4 weights, fp8 "
                        "block scales, *_weight_scale_2, global *_input_scale)")
    p.add_argument("--fp8-block", type=int, default=quant.FP8_BLOCK,
                   help="fp8-block: the block edge of the weight scales (DeepSeek-V3: 128; smaller for small shapes)")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m eplb_engine", description=__doc__.split("\n\n")[0])
    add_common_args(p, "demo", 100, dict(num_layers=8, num_experts=64, tokens=1024, top_k=2, hidden=64, ffn=64))
    p.add_argument("--drift-steps", type=int, default=100, help="built-in load: steps of a full drift")
    p.add_argument("--router-noise", type=float, default=1.0,
                   help="std of the router's learned logit part around log(load); larger: flatter")
    p.add_argument("--step-delay-ms", type=float, default=0.0, help="sleep after every step (slower engine)")
    p.add_argument("--die-at-step", type=int, help="rank --die-rank SIGKILLs itself at this step's boundary")
    p.add_argument("--die-rank", type=int, default=0)
    p.add_argument("--client-step", choices=["one-call", "two-calls"], default="one-call",
                   help="one-call: after each forward pass EngineRegion.step_end records the step and runs the next "
                        "boundary (the compiled step where it is built); two-calls: at_step_boundary before the "
                        "forward pass, record after it")
    return p.parse_args(argv)


class Engine:
    """One rank of the reference engine."""

    def __init__(self, comm, args: argparse.Namespace):
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = comm
        self.args = args
        self.rank, self.world = comm.Get_rank(), comm.Get_size()
        if args.trace:
            self.load = loads.read_trace(args.trace, args.trace_dataset)
        else:
            self.load = loads.drifting_load(args.num_layers, args.num_experts, max(1, args.steps), args.drift_steps, args.seed)
        # Rank 0's log (np.log's last bit may differ between CPUs): every rank routes alike.
        self.log_p = comm.bcast(loads.log_probs(self.load) if self.rank == 0 else None, root=0)  # [iterations, L, E]
        _, L, E = self.load.shape
        self.shape = model.ModelShape(L, E, args.hidden, args.ffn, args.top_k)
        N = self.world
        self.S = args.slots_per_rank or -(-(E + N) // N)
        if self.S * N < E:
            raise SystemExit(f"error: {self.S} slots a rank x {N} ranks < {E} experts: raise --slots-per-rank")
        P = self.S * N
        self.phy2log0 = np.tile(np.arange(P, dtype=np.int32) % E, (L, 1))  # [L, P] trivial
        self.log2phy0, self.logcnt0 = derive_log2phy(self.phy2log0, E)
        self.gate_scale = self.shape.gate_scale
        self.noise = model.noise_scale_for(self.shape, args.router_noise)
        H, F = self.shape.hidden, self.shape.ffn
        self.quant, self.block = args.quant, args.fp8_block
        # Each layer: separate tensors with vLLM's / SGLang's names and shapes (quant.py).
        self.layout = quant.layout(self.quant, H, F, E, self.block)
        self.expert_layout = [t for t in self.layout if t.kind == "expert"]
        # The reference holds every expert once: dequantised [L, E, H, 2F] and [L, E, F, H] for
        # the reference forward pass, and every expert's tensors [E, ...] by name for the check of
        # applied bytes; the globals as created, for global_bytes_changed.
        self.w13 = np.empty((L, E, H, 2 * F), np.float32)
        self.w2 = np.empty((L, E, F, H), np.float32)
        self.ref: List[Dict[str, np.ndarray]] = []
        self.globals0 = [quant.global_tensors(self.quant, args.seed, layer, E) for layer in range(L)]
        for layer in range(L):
            ref = {t.name: np.empty((E,) + t.shape, t.np_dtype) for t in self.expert_layout}
            for e in range(E):
                tensors, self.w13[layer, e], self.w2[layer, e] = quant.expert_tensors(
                    self.quant, args.seed, layer, e, self.shape, self.block)
                for name, a in tensors.items():
                    ref[name][e] = a
            self.ref.append(ref)
        self.w_router = np.stack([model.router_weights(args.seed, layer, self.shape) for layer in range(L)])
        T = args.tokens
        self.tok_lo, self.tok_hi = T * self.rank // N, T * (self.rank + 1) // N
        layers = []
        for layer in range(L):
            experts = self.phy2log0[layer, self.rank * self.S : (self.rank + 1) * self.S]
            row_tensors: List[LayerTensor] = []
            for t in self.layout:
                if t.kind == "expert":
                    a = quant.alloc(t, self.S)  # padded rows where the layout says so
                    a[:] = self.ref[layer][t.name][experts]
                else:
                    a = self.globals0[layer][t.name].copy()
                row_tensors.append(layer_tensor(t, a))
            layers.append(row_tensors)
        self.region = EngineRegion.create(args.name, self.rank, N, L, self.S, E, layers=layers,
                                          phy2log=self.phy2log0, ring_len=args.ring_len)
        # From here on the engine computes with the region's views (the client copied the tensors
        # in, keeping their shapes and row strides).
        self.live = [{t.name: self.region.tensor(layer, t.name) for t in self.layout} for layer in range(L)]
        self.region.publish()
        self.region.start_heartbeat()

    # ---- collectives -----------------------------------------------------------------------

    def agree(self, have: int) -> Tuple[int, int]:
        """(min, max) of ``have`` over the engine ranks: one MPI_Allreduce of 2 integers."""
        t0 = time.perf_counter_ns()
        buf = np.array([have, -have], dtype=np.int64)
        out = np.empty_like(buf)
        self.comm.Allreduce(buf, out, op=self.MPI.MIN)
        self._agree_ns = time.perf_counter_ns() - t0
        return int(out[0]), int(-out[1])

    # ---- one layer -------------------------------------------------------------------------

    def moe_layer(self, layer: int, x: np.ndarray, placement, log_p: np.ndarray, counts: np.ndarray,
                  static_load: np.ndarray) -> Tuple[np.ndarray, bool]:
        """The EP forward pass of one layer, x [T, H] the whole batch (the same on every rank).

        Every rank routes every token (the same bits everywhere), picks each pair's physical slot
        with the placement and the replica rule, computes only the pairs of its own slots with the
        weights in the shared-memory region, and all-gathers the pair results (vLLM's
        allgather/reduce-scatter EP scheme, with the reduction done by every rank in the fixed
        top-k order, so it is exact). Returns (the combined output [T, H], whether this rank's
        tokens equal the reference forward pass bit for bit). Adds this rank's computed pairs to
        counts[slot] and the initial placement's per-rank pairs of this rank's tokens to
        static_load[rank]."""
        T, K, S, N, H = x.shape[0], self.shape.top_k, self.S, self.world, x.shape[1]
        ids, w = model.route(x, self.w_router[layer], log_p, self.noise, K)
        tok = np.arange(T)[:, None]
        if self.args.dispatch == "split":
            # Every rank routes the whole batch, so it has every rank's counts: the same quotas
            # everywhere, filled in (token, k) order (= by source rank, then position).
            row = placement.phy2log[layer]
            demand = np.bincount(ids.ravel(), minlength=self.logcnt0.shape[1])
            # split_layer takes arrays; its annotation says Sequence[int] (split.py is being reworked)
            quotas, _ = split.split_layer(demand, T * K, row, S)  # type: ignore[arg-type]
            slots = split.replica_slots(ids.ravel(), quotas, row)
        else:
            slots = placement.replica_slot(layer, ids, tok).ravel()  # [T * K] physical slots
        if np.any(slots < 0):
            raise RuntimeError(f"layer {layer}: an expert without a slot in the placement")
        lo, hi = self.tok_lo, self.tok_hi
        sl = self.log2phy0[layer, ids[lo:hi], (tok[lo:hi] + layer) % self.logcnt0[layer, ids[lo:hi]]]
        static_load += np.bincount((sl // S).ravel(), minlength=N)
        dest = slots // S
        order = np.argsort(dest, kind="stable")  # pairs grouped by the rank that computes them
        per_rank = np.bincount(dest, minlength=N)
        first = int(per_rank[: self.rank].sum())
        mine = order[first : first + int(per_rank[self.rank])]
        # Compute this rank's pairs, slot by slot, with the live tensors in the region,
        # dequantised (exactly) for the slots that have pairs.
        y_mine = np.empty((len(mine), H), np.float32)
        local = slots[mine] % S
        by_slot = np.argsort(local, kind="stable")
        present, starts = np.unique(local[by_slot], return_index=True)
        ends = np.append(starts[1:], len(by_slot))
        live = self.live[layer]
        w13, w2 = quant.dequant(self.quant, live, present, self.shape, self.block)
        in13, in2 = self.input_scales(layer, placement.phy2log[layer, self.rank * S + present])
        for i, (s_, a, b) in enumerate(zip(present, starts, ends)):
            rows = by_slot[a:b]
            y_mine[rows] = model.expert_forward(x[mine[rows] // K], w13[i], w2[i], self.gate_scale, in13[i], in2[i])
            counts[s_] += b - a
        gathered = np.empty((T * K, H), np.float32)
        sizes = per_rank * H
        displs = np.concatenate(([0], np.cumsum(sizes)[:-1]))
        self.comm.Allgatherv(y_mine, [gathered, (sizes, displs), self.MPI.FLOAT])
        y = np.empty_like(gathered)
        y[order] = gathered
        out = model.combine(y.reshape(T, K, H), w)
        ref = model.reference_layer(x[lo:hi], ids[lo:hi], w[lo:hi], self.w13[layer], self.w2[layer], self.gate_scale)
        return out, bool(np.array_equal(out[lo:hi].view(np.uint32), ref.view(np.uint32)))

    # ---- the run ---------------------------------------------------------------------------

    def wait_for_sidecar(self) -> bool:
        return wait_for_sidecar(self.region, self.comm, self.args.wait_sidecar)

    def input_scales(self, layer: int, experts: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """The activations' input scales of logical ``experts`` (nvfp4: the GLOBAL tensors, read
        by logical expert id, never moved; max over gate/up as vLLM takes it); 1.0 otherwise."""
        if self.quant != "nvfp4":
            one = np.ones(len(experts), np.float32)
            return one, one
        live = self.live[layer]
        return live["w13_input_scale"][experts].max(axis=1), live["w2_input_scale"][experts]

    def wrong_bytes(self, layer: int) -> int:
        """Bytes of ``layer``'s local live slots that differ from the experts phy2log names, over
        every per-expert tensor (the rows' own bytes, not the padding between them)."""
        experts = self.region.placement().phy2log[layer, self.rank * self.S : (self.rank + 1) * self.S]
        wrong = 0
        for t in self.expert_layout:
            a = np.ascontiguousarray(self.live[layer][t.name]).view(np.uint8).reshape(self.S, -1)
            b = np.ascontiguousarray(self.ref[layer][t.name][experts]).view(np.uint8).reshape(self.S, -1)
            wrong += int(np.count_nonzero(a != b))
        return wrong

    def global_bytes_changed(self) -> int:
        """Bytes of every layer's global tensors that differ from their initial values."""
        changed = 0
        for layer, g in enumerate(self.globals0):
            for name, a0 in g.items():
                a = np.ascontiguousarray(self.live[layer][name]).view(np.uint8)
                changed += int(np.count_nonzero(a != a0.view(np.uint8)))
        return changed

    def run(self) -> Dict:
        args, L, S, N = self.args, self.shape.num_layers, self.S, self.world
        steps = args.steps
        sidecar = self.wait_for_sidecar() if args.wait_sidecar > 0 else None
        iters = self.log_p.shape[0]
        live_counts = np.zeros((steps, L, S), np.int64)
        static_load = np.zeros((steps, L, N), np.int64)
        mismatched = np.zeros(steps, np.int64)
        boundary_ns = np.zeros(steps, np.int64)  # the client's part of the boundary (no collective)
        record_ns = np.zeros(steps, np.int64)
        apply_ns: List[int] = []
        commits: List[List[int]] = []  # [step, layer, epoch]
        wrong = 0
        # --client-step one-call: after each forward pass one call records the step and runs the
        # next boundary (EngineRegion.step_end); two-calls: at_step_boundary before, record after.
        counts_buf = np.zeros((L, S), np.int64)
        end = self.region.step_end(counts_buf, agree=self.agree) if args.client_step == "one-call" else None
        applied_next: List[int] = []

        def switched(t: int, applied: List[int], placement) -> int:
            for layer in applied:
                commits.append([t, layer, int(placement.epoch[layer])])
            return sum(self.wrong_bytes(layer) for layer in applied)

        for t in range(steps):
            if args.die_at_step is not None and t == args.die_at_step and self.rank == args.die_rank:
                os.kill(os.getpid(), signal.SIGKILL)
            if end is None or t == 0:
                self._agree_ns = 0
                t0 = time.perf_counter_ns()
                placement = self.region.at_step_boundary(t, agree=self.agree)
                boundary_ns[t] = time.perf_counter_ns() - t0 - self._agree_ns
                applied = placement.applied
                if applied:
                    apply_ns.append(int(boundary_ns[t]))
            else:
                placement, applied = self.region.placement(), applied_next  # the boundary ran in end(t - 1)
            wrong += switched(t, applied, placement)
            x = model.tokens(args.seed, t, args.tokens, self.shape)  # the whole batch, on every rank
            for layer in range(L):
                out, ok = self.moe_layer(layer, x, placement, self.log_p[t % iters, layer], live_counts[t, layer],
                                         static_load[t, layer])
                mismatched[t] += 0 if ok else 1
                x = model.residual(x, out)
            tokens = (self.tok_hi - self.tok_lo) * self.shape.top_k
            if end is None:
                t1 = time.perf_counter_ns()
                self.region.record(t, live_counts[t], phase=args.phase, tokens=tokens)
                record_ns[t] = time.perf_counter_ns() - t1
            else:
                counts_buf[:] = live_counts[t]  # the engine's counts buffer, bound to end
                self._agree_ns = 0
                t1 = time.perf_counter_ns()
                layer_applied = end(t, args.phase, tokens)  # record t + the boundary of t + 1
                record_ns[t] = time.perf_counter_ns() - t1 - self._agree_ns
                applied_next = [layer_applied] if layer_applied >= 0 else []
                if applied_next:
                    apply_ns.append(int(record_ns[t]))
            if args.log_every and self.rank == 0 and (t + 1) % args.log_every == 0:
                log.info("step %d/%d, %d layer switches so far", t + 1, steps, len(commits))
            if args.step_delay_ms:
                time.sleep(args.step_delay_ms / 1000.0)
        # one-call: the last end ran the boundary after the last step (every rank did).
        wrong += switched(steps, applied_next, self.region.placement())
        return self._report(sidecar, live_counts, static_load, mismatched, boundary_ns, record_ns, apply_ns, commits, wrong)

    def _report(self, sidecar, live_counts, static_load, mismatched, boundary_ns, record_ns, apply_ns, commits, wrong) -> Dict:
        comm, steps = self.comm, self.args.steps
        live_rank = live_counts.sum(axis=2)  # [steps, L] this rank's pairs
        all_live = comm.gather(live_rank, root=0)
        static_sum = np.zeros_like(static_load) if self.rank == 0 else None
        comm.Reduce(static_load, static_sum, op=self.MPI.SUM, root=0)
        gathered = comm.gather(dict(mismatched=mismatched, commits=commits, wrong=wrong, boundary_ns=boundary_ns,
                                    record_ns=record_ns, apply_ns=apply_ns, global_changed=self.global_bytes_changed(),
                                    phy2log=self.region.placement().phy2log.copy()), root=0)
        if self.rank != 0:
            return {}
        assert static_sum is not None  # rank 0 is the Reduce's root
        live = np.stack(all_live, axis=2)  # [steps, L, N]
        per_rank_commits = [{(c[1], c[2]): c[0] for c in g["commits"]} for g in gathered]
        keys = set().union(*per_rank_commits)
        disagreements = sum(1 for k in keys if len({d.get(k) for d in per_rank_commits}) != 1)
        client_us = (np.concatenate([g["boundary_ns"] + g["record_ns"] for g in gathered]) / 1000.0)
        boundary_us = np.concatenate([g["boundary_ns"] for g in gathered]) / 1000.0
        applied = np.concatenate([np.isin(np.arange(steps), [c[0] for c in g["commits"]]) for g in gathered])
        apply_us = np.array([a for g in gathered for a in g["apply_ns"]], dtype=np.float64) / 1000.0
        mism = np.sum([g["mismatched"] for g in gathered], axis=0)
        return {
            "engine_steps": steps,
            "world_size": self.world,
            "num_layers": self.shape.num_layers,
            "num_experts": self.shape.num_experts,
            "slots_per_rank": self.S,
            "tokens_per_step": self.args.tokens,
            "top_k": self.shape.top_k,
            "quant": self.quant,
            "client_step": self.args.client_step,
            "fp8_block": self.block if self.quant == "fp8-block" else None,
            "tensors_per_layer": len(self.layout),
            "tensors": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "kind": t.kind,
                         "row_bytes": t.row_bytes} for t in self.layout],
            "expert_bytes": quant.expert_bytes(self.layout),
            "trace": self.args.trace,
            "trace_dataset": self.args.trace_dataset,
            "sidecar_attached": sidecar,
            "outputs_match": bool(mism.sum() == 0),
            "mismatched_steps": [int(t) for t in np.flatnonzero(mism)],
            "layers_committed": len(keys),
            "commits": sorted([[int(d[k]), int(k[0]), int(k[1])] for k in keys for d in per_rank_commits[:1] if k in d]),
            "commit_step_disagreements": disagreements,
            # Each disagreeing (layer, epoch): the step every rank applied it at (None: never).
            "commit_step_disagreement_detail": [
                {"layer": int(k[0]), "epoch": int(k[1]), "steps": [d.get(k) for d in per_rank_commits]}
                for k in sorted(keys) if len({d.get(k) for d in per_rank_commits}) != 1],
            "placements_agree": all(np.array_equal(g["phy2log"], gathered[0]["phy2log"]) for g in gathered),
            "wrong_bytes": int(sum(g["wrong"] for g in gathered)),
            "global_bytes_changed": int(sum(g["global_changed"] for g in gathered)),
            "balancedness_static": _balancedness(static_sum),
            "balancedness_live": _balancedness(live),
            "client_us_median": float(np.median(client_us)) if len(client_us) else 0.0,
            "boundary_us": _stats(boundary_us),
            "boundary_us_no_apply": _stats(boundary_us[~applied]),
            "apply_us": _stats(apply_us),
            "record_us": _stats(np.concatenate([g["record_ns"] for g in gathered]) / 1000.0),
        }

    def close(self, ok: bool) -> None:
        if ok:
            self.region.finish()
        else:
            self.region.fail()


def _stats(a: np.ndarray) -> Dict[str, float]:
    if len(a) == 0:
        return {"count": 0}
    return {"count": int(len(a)), "median": float(np.median(a)), "p99": float(np.percentile(a, 99)), "max": float(a.max())}


_balancedness = loads.balancedness


def wait_for_sidecar(region: EngineRegion, comm, seconds: float, running: bool = False) -> bool:
    """Waits up to ``seconds`` for a sidecar to attach to this rank's region (``running``: and
    to beat its heartbeat, which it does once its set-up, NCCL included, is done and its loop
    reads the ring); whether one did on every engine rank (collective). Demos and tests only: an
    engine never waits for its sidecar."""
    from mpi4py import MPI

    ready = lambda: region.sidecar_pid != 0 and (not running or region.sidecar_heartbeat_ns != 0)  # noqa: E731
    deadline = time.monotonic() + seconds
    while not ready() and time.monotonic() < deadline:
        time.sleep(0.01)
    attached = np.array([1 if ready() else 0], np.int64)
    every = np.empty_like(attached)
    comm.Allreduce(attached, every, op=MPI.MIN)
    return bool(every[0])


def run_ranks(args: argparse.Namespace, make_engine: Callable, summarize: Callable[[Dict], None],
              exit_code: Callable[[Dict], int], indent: Optional[int] = 1) -> int:
    """The main of a reference engine rank: builds it (``make_engine(comm, args)``), runs it,
    marks its region finished or failed, and on rank 0 prints the summary and writes the report;
    every rank returns rank 0's exit code (2: bad input)."""
    # mpirun ends the other ranks with SIGTERM when one dies: exit through Python, so that the
    # region is marked failed and unlinked.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    try:
        engine = make_engine(comm, args)
    except (loads.LoadError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ok = False
    try:
        report = engine.run()
        ok = True
    finally:
        engine.close(ok)
    code = 0
    if comm.Get_rank() == 0:
        summarize(report)
        if args.report:
            with open(args.report, "w") as f:
                json.dump(report, f, indent=indent)
        code = exit_code(report)
    return int(comm.bcast(code, root=0))


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="# %(message)s")
    return run_ranks(args, Engine, _print_summary, lambda r: 0 if r["outputs_match"] and r["commit_step_disagreements"] == 0
                     and r["wrong_bytes"] == 0 and r["global_bytes_changed"] == 0 else 1)


def layer_tensor(t: "quant.TensorLayout", data) -> LayerTensor:
    """The client's LayerTensor of ``data`` (numpy or torch) for layout entry ``t``. bf16, fp8
    and packed fp4 have no numpy dtype: the contract's dtype name goes with them where the
    client takes one (it moves them as opaque bytes either way)."""
    kind = "expert" if t.kind == "expert" else "global"
    if _LT_DTYPE:
        return LayerTensor(t.name, data, kind=kind, dtype=t.dtype)
    return LayerTensor(t.name, data, kind=kind)


def _lt_takes_dtype() -> bool:
    import inspect

    try:
        return "dtype" in inspect.signature(LayerTensor).parameters
    except (TypeError, ValueError):
        return False


_LT_DTYPE = _lt_takes_dtype()


def _print_summary(r: Dict) -> None:
    print(f"# eplb_engine: {r['world_size']} ranks, {r['num_layers']} layers x {r['num_experts']} experts, "
          f"{r['slots_per_rank']} slots a rank, {r['tokens_per_step']} tokens a step, top-{r['top_k']}")
    print(f"# quant {r['quant']}: {r['tensors_per_layer']} tensors a layer, {r['expert_bytes']} bytes an expert")
    print(f"# steps {r['engine_steps']} | outputs match {r['outputs_match']} | layers committed {r['layers_committed']} "
          f"| commit step disagreements {r['commit_step_disagreements']} | wrong bytes {r['wrong_bytes']} "
          f"| global bytes changed {r['global_bytes_changed']}")
    print(f"# balancedness (mean over steps): static {r['balancedness_static']:.4f}, live {r['balancedness_live']:.4f}")
    b, a = r["boundary_us"], r["apply_us"]
    print(f"# client a step: median {r['client_us_median']:.1f} us | boundary max {b.get('max', 0):.1f} us "
          f"| apply of a layer: {a.get('count', 0)} times, max {a.get('max', 0):.1f} us")
    sys.stdout.flush()
