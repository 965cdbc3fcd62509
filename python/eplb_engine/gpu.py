"""The reference MoE engine on GPUs (PyTorch): one process per GPU, in lock-step (mpi4py for the
contract's agreement, torch.distributed NCCL for the activations), its expert weights in its own
GPU memory, shared with the sidecar through CUDA IPC (contract weights_kind 1).

    mpirun -n 2 -x NCCL_NVLS_ENABLE=0 python -m eplb_engine.gpu --name demo --steps 300 \\
        --trace counts235b_qwen3-235b-a22b-fp8.json --layers 24 --report engine.json

Model: bf16 SwiGLU experts of a realistic size (default Qwen3-235B's hidden 4096 x moe ffn 1536:
w13 [2F, H] then w2 [H, F] in one expert of 36 MiB), top-k routing that follows a trace
(Gumbel top-k on log p_t: every rank draws the same routing from (seed, step)), expert
parallelism as in real engines: rank r owns tokens [T r / N, T (r+1) / N), all-gathers the
layer's input, computes the pairs of its own slots with ONE grouped GEMM per projection
(``torch._grouped_mm`` over its local slots), and the combined outputs are reduce-scattered back.

Weights (``--quant none|fp8-block|nvfp4``, quant.py): every layer's tensors as vLLM and SGLang
store them, each its own PyTorch allocation (``w13_weight [S, 2F, H]``, ``w2_weight [S, H, F]``,
and the scheme's scales; nvfp4 adds global input scales that never move and a padded row
stride), handed to the client as a list of ``LayerTensor`` a layer; the client exports one CUDA
IPC handle per distinct allocation. ``none`` reads the bf16 tensors in place; the quantised
schemes dequantise a layer's slots to bf16 before its GEMMs (exactly). ``--deepseek-v3``: the
DeepSeek-V3 FP8 table on one GPU (58 layers x 4 tensors, 44,050,944 bytes an expert, 9 slots).

Bitwise mode (the only mode of the run loop): every weight is an integer in [-7, 7] and every
activation an integer in [-15, 15], so every fp32 accumulation inside the GEMMs is exact (sums
below 2^24 for hidden and ffn up to 16k) and the bf16 result of a product does not depend on the
kernel, its tiling, the batch a row is computed in, or the rank; the activation is the integer
hard-swish gate of the CPU engine (``model.py``), the combine sums integer products in int64 (an
exact, order-free reduce-scatter). So a run with migrations must give bit for bit the outputs of
the same run without them: every step records a 64-bit fingerprint of every layer's combined
output on every rank, and ``python -m eplb_engine.compare`` checks two runs step by step.
The real SiLU path (random real weights) is used only by the cross-check against transformers
(``--xcheck``), with a tolerance.

Timing: CUDA events around each layer's expert GEMMs (both projections and the activation) on
every rank; the wall time of every step; the apply stall at a boundary (the engine's in-place
device copy of the staged slots, waited for before it answers, since the sidecar may reuse the
staging area then). Pointers never change, so CUDA graphs of the forward pass would stay valid.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import socket
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from eplb_client import EngineRegion, cuda_ipc, derive_log2phy

from . import loads, quant

log = logging.getLogger("eplb_engine.gpu")

XMAX, WMAX = 15, 7
GATE_UNITS = 64


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    from .engine import add_common_args

    p = argparse.ArgumentParser(prog="python -m eplb_engine.gpu", description=__doc__.split("\n\n")[0])
    add_common_args(p, "gpu", 200, dict(num_layers=4, num_experts=64, tokens=4096, top_k=8, hidden=4096, ffn=1536))
    p.add_argument("--layers", type=int, default=0, help="the first N layers of the trace (0: all)")
    p.add_argument("--detach-wait", type=float, default=30.0,
                   help="at the end, wait up to this long for the sidecar to close its IPC mappings")
    p.add_argument("--no-check-applied", action="store_true",
                   help="skip regenerating every applied expert to count its wrong bytes")
    p.add_argument("--split-impl", choices=["kernel", "torch"], default="kernel",
                   help="--dispatch split: the quotas from the CUDA kernel (eplb_client.split_kernel: one launch, "
                        "layers not ok redone by the torch split) or from eplb_client.split.split_layers; the same "
                        "quotas either way")
    p.add_argument("--xcheck", action="store_true",
                   help="only cross-check the expert math against transformers' Qwen3-MoE block (one GPU)")
    p.add_argument("--deepseek-v3", action="store_true",
                   help="the DeepSeek-V3 FP8 table: --quant fp8-block --hidden 7168 --ffn 2048 --num-layers 58 "
                        "--num-experts 8 --slots-per-rank 9 (one GPU: 44,050,944 bytes an expert, 58 x 4 tensors, each "
                        "its own PyTorch allocation); flags given explicitly still win")
    return p.parse_args(argv)


DEEPSEEK_V3 = dict(quant="fp8-block", hidden=7168, ffn=2048, num_layers=58, num_experts=8, slots_per_rank=9,
                   fp8_block=128)


def apply_presets(args: argparse.Namespace, argv: Optional[List[str]]) -> argparse.Namespace:
    """--deepseek-v3: its shape, except for the flags given on the command line."""
    if getattr(args, "deepseek_v3", False):
        given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
        for k, v in DEEPSEEK_V3.items():
            if "--" + k.replace("_", "-") not in given:
                setattr(args, k, v)
    return args


# ---- expert math (shared by the engine and the cross-check) -----------------------------------


def grouped_mm(a, b_t, offs, counts: List[int]):
    """a [n, K] @ b_t[g] [K, N] for the rows of group g (``offs``: int32 cumulative ends on the
    GPU, ``counts``: the same on the host). One ``torch._grouped_mm`` (CUTLASS on Hopper); a
    per-group loop only when the grouped GEMM is not available (reported as such)."""
    import torch

    if GROUPED["ok"]:
        return torch._grouped_mm(a, b_t, offs=offs)
    out = a.new_empty((a.shape[0], b_t.shape[2]))
    start = 0
    for g, c in enumerate(counts):
        if c:
            torch.mm(a[start : start + c], b_t[g], out=out[start : start + c])
        start += c
    return out


GROUPED = {"ok": True, "why": ""}


def int_act(gu, ffn: int, gate_scale: int, h_shift: int):
    """The integer hard-swish gate on bf16 integer values gu [n, 2F] -> h [n, F] bf16 in [-15, 15]."""
    import torch

    g = gu[:, :ffn].to(torch.int64)
    u = gu[:, ffn:].to(torch.int64)
    s3 = 3 * gate_scale
    t = (g + s3).clamp_(0, 2 * s3)
    t.mul_(g).floor_divide_(2 * s3)
    t.mul_(u).add_(1 << (h_shift - 1)).bitwise_right_shift_(h_shift)
    return t.clamp_(-XMAX, XMAX).to(torch.bfloat16)


def silu_act(gu, ffn: int):
    import torch

    g, u = gu[:, :ffn].float(), gu[:, ffn:].float()
    return (torch.nn.functional.silu(g) * u).to(torch.bfloat16)


def experts_forward(a, w13_t, w2_t, offs, counts, act, scales=None):
    """The SwiGLU experts of one rank's slots on their pairs (rows of ``a`` sorted by slot):
    one grouped GEMM for w13, the gate, one grouped GEMM for w2.

    ``scales``: None, or the activations' input scales (nvfp4's global ``*_input_scale``)
    ``(in13 [S], in2 [S], in13 of each row [n], in2 of each row [n])``, powers of two: each
    GEMM's input rows are divided by their slot's scale and its weights multiplied by it (as a
    quantised engine folds the scales into its GEMMs); exact, so the result is the same bits."""
    if scales is not None:
        s13, s2, r13, r2 = scales
        a = a / r13[:, None].to(a.dtype)
        w13_t = w13_t * s13[:, None, None].to(w13_t.dtype)
    gu = grouped_mm(a, w13_t, offs, counts)
    h = act(gu)
    if scales is not None:
        h = h / r2[:, None].to(h.dtype)
        w2_t = w2_t * s2[:, None, None].to(w2_t.dtype)
    return grouped_mm(h, w2_t, offs, counts)


def uniform_std(m: int) -> float:
    return math.sqrt(((2 * m + 1) ** 2 - 1) / 12.0)


# ---- the experts' tensors in the engines' layout (torch; CPU or GPU) ----------------------------

TORCH_DTYPES = {"bf16": "bfloat16", "f8e4m3": "float8_e4m3fn", "fp4x2": "uint8", "f32": "float32", "u8": "uint8"}


class QuantExperts:
    """The experts of ``quant.layout`` as torch tensors on ``device``: every tensor its own
    allocation (as a model's parameters are), generated from (seed, layer, expert) with Philox
    on the device, and dequantised to bf16 for the GEMMs, exactly (every weight an integer in
    [-7, 7]; see quant.py for the scheme, the same as the CPU engine's with another generator).
    ``none`` draws the very weights of the contract-1 engine (one randint of w13 then w2)."""

    def __init__(self, quant_name: str, hidden: int, ffn: int, num_logical: int, seed: int, device,
                 block: int = quant.FP8_BLOCK):
        import torch

        self.torch, self.q, self.H, self.F, self.E, self.seed, self.dev = torch, quant_name, hidden, ffn, num_logical, seed, device
        self.block = block
        self.layout = quant.layout(quant_name, hidden, ffn, num_logical, block)
        self.expert_layout = [t for t in self.layout if t.kind == "expert"]
        self.expert_bytes = quant.expert_bytes(self.layout)
        H, F, B = hidden, ffn, block
        # fp8-block: each row's and column's block (gate and up halves blocked apart).
        self.r13 = torch.from_numpy(quant._block_index(2 * F, F, B)).to(device)
        self.c13 = torch.arange(H, device=device) // B
        self.r2 = torch.from_numpy(quant._block_index(H, H, B)).to(device)
        self.c2 = torch.arange(F, device=device) // B
        self.e2m1 = torch.from_numpy(quant.E2M1).to(device=device, dtype=torch.bfloat16)
        self.allowed = torch.from_numpy(quant._ALLOWED_T.astype(np.int64)).to(device)
        self.allowed_n = torch.from_numpy(quant._ALLOWED_N.astype(np.int64)).to(device)

    def tdtype(self, t: "quant.TensorLayout"):
        return getattr(self.torch, TORCH_DTYPES[t.dtype])

    def alloc(self, t: "quant.TensorLayout", rows: int):
        """A zeroed ``[rows, *shape]`` tensor, its own allocation; with ``pad``, a view of a padded
        one whose row stride exceeds the row (SGLang's padded rows)."""
        torch = self.torch
        n = int(np.prod(t.shape, dtype=np.int64))
        if not t.pad:
            return torch.zeros((rows,) + t.shape, dtype=self.tdtype(t), device=self.dev)
        buf = torch.zeros((rows, n + t.pad), dtype=self.tdtype(t), device=self.dev)
        return buf[:, :n].view((rows,) + t.shape)

    def _gen(self, *key: int):
        g = self.torch.Generator(device=self.dev)
        k = self.seed
        for x in key:
            k = (k * 1_000_003 + x) & ((1 << 62) - 1)
        g.manual_seed(k)
        return g

    def expert(self, layer: int, expert: int) -> Dict[str, Any]:
        """Expert (layer, expert)'s per-expert tensors by name (one slot's shape), a pure function
        of (quant, seed, layer, expert)."""
        torch, H, F = self.torch, self.H, self.F
        if self.q in ("none", "fp8-block"):
            # The contract-1 engine's key and draw: w13 [2F, H] then w2 [H, F] in one randint.
            g = torch.Generator(device=self.dev)
            g.manual_seed(((self.seed * 1_000_003 + layer) * 1_000_003 + expert) & ((1 << 62) - 1))
            w = torch.randint(-WMAX, WMAX + 1, (2 * F * H + H * F,), generator=g, device=self.dev, dtype=torch.int16)
            w13, w2 = w[: 2 * F * H].view(2 * F, H), w[2 * F * H :].view(H, F)
            if self.q == "none":
                return {"w13_weight": w13.to(torch.bfloat16), "w2_weight": w2.to(torch.bfloat16)}
            t13, t2 = self.expert_layout[2], self.expert_layout[3]
            g = self._gen(layer, expert, quant.SCALE_TAG)
            s13 = torch.exp2(torch.randint(-2, 3, t13.shape, generator=g, device=self.dev).float())
            s2 = torch.exp2(torch.randint(-2, 3, t2.shape, generator=g, device=self.dev).float())
            q13 = (w13.float() / s13[self.r13][:, self.c13]).to(torch.float8_e4m3fn)
            q2 = (w2.float() / s2[self.r2][:, self.c2]).to(torch.float8_e4m3fn)
            return {"w13_weight": q13, "w2_weight": q2, "w13_weight_scale_inv": s13, "w2_weight_scale_inv": s2}
        G = quant.NVFP4_GROUP
        g = self._gen(layer, expert, quant.NVFP4_TAG)
        k13 = torch.randint(-1, 2, (2,), generator=g, device=self.dev)
        k2 = torch.randint(-1, 2, (), generator=g, device=self.dev)
        out = {}
        for name, ksc2, (n, k) in (("w13", k13.repeat_interleave(F), (2 * F, H)), ("w2", k2.expand(H), (H, F))):
            kb = torch.randint(-1, 2, (n, k // G), generator=g, device=self.dev)
            p_idx = (kb.repeat_interleave(G, dim=1) + ksc2[:, None] + 2)  # log2(block scale x scale_2) + 2
            nallowed = self.allowed_n[p_idx]
            u = torch.rand((n, k), generator=g, device=self.dev, dtype=torch.float64)
            pick = torch.minimum((u * nallowed).long(), nallowed - 1)
            codes = self.allowed[p_idx, pick].to(torch.uint8)
            out[f"{name}_weight"] = codes[:, 0::2] | (codes[:, 1::2] << 4)
            out[f"{name}_weight_scale"] = torch.exp2(kb.float()).to(torch.float8_e4m3fn)
        out["w13_weight_scale_2"] = torch.exp2(k13.float())
        out["w2_weight_scale_2"] = torch.exp2(k2.float())
        return out

    def globals(self, layer: int) -> Dict[str, Any]:
        """The layer's global tensors (nvfp4: input scales of every logical expert), from (seed, layer)."""
        if self.q != "nvfp4":
            return {}
        torch = self.torch
        g = self._gen(layer, quant.INPUT_SCALE_TAG)
        return {"w13_input_scale": torch.exp2(torch.randint(-1, 2, (self.E, 2), generator=g, device=self.dev).float()),
                "w2_input_scale": torch.exp2(torch.randint(-1, 2, (self.E,), generator=g, device=self.dev).float())}

    def dequant(self, live: Dict[str, Any]):
        """(w13 [S, 2F, H], w2 [S, H, F]) bf16 of every local slot, exact (power-of-two scales
        times values of few significant bits)."""
        torch, F = self.torch, self.F
        if self.q == "none":
            return live["w13_weight"], live["w2_weight"]
        bf = torch.bfloat16
        if self.q == "fp8-block":
            s13 = live["w13_weight_scale_inv"].to(bf)[:, self.r13][:, :, self.c13]
            s2 = live["w2_weight_scale_inv"].to(bf)[:, self.r2][:, :, self.c2]
            return live["w13_weight"].to(bf) * s13, live["w2_weight"].to(bf) * s2
        G = quant.NVFP4_GROUP
        out = []
        for name, sc2 in (("w13", live["w13_weight_scale_2"].to(bf).repeat_interleave(F, dim=1)[:, :, None]),
                          ("w2", live["w2_weight_scale_2"].to(bf)[:, None, None])):
            q = live[f"{name}_weight"]
            codes = torch.stack((q & 15, q >> 4), dim=-1).flatten(-2).long()
            bs = live[f"{name}_weight_scale"].to(bf).repeat_interleave(G, dim=2)
            out.append(self.e2m1[codes] * bs * sc2)
        return out[0], out[1]


def raw_rows(t) -> Any:
    """``t`` viewed as raw integers of its item size (the same shape and strides)."""
    import torch

    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def row_bytes_of(t) -> Any:
    """A tensor row (one slot, contiguous in itself) as its bytes."""
    import torch

    return t.reshape(-1).view(torch.uint8)


# ---- the engine ---------------------------------------------------------------------------------


class GpuEngine:
    def __init__(self, comm, args: argparse.Namespace):
        import torch
        import torch.distributed as dist
        from mpi4py import MPI

        self.torch, self.dist, self.MPI = torch, dist, MPI
        self.comm, self.args = comm, args
        self.rank, self.world = comm.Get_rank(), comm.Get_size()
        cuda_ipc.check_alloc_conf()
        ndev = torch.cuda.device_count()
        if ndev == 0:
            raise ValueError("no GPU visible to this engine rank")
        self.local = self.rank % ndev
        torch.cuda.set_device(self.local)
        self.dev = torch.device("cuda", self.local)
        port = comm.bcast(_free_port() if self.rank == 0 else None, root=0)
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group("nccl", rank=self.rank, world_size=self.world, device_id=self.dev)

        if args.trace:
            load = loads.read_trace(args.trace, args.trace_dataset)
        else:
            load = loads.drifting_load(args.num_layers, args.num_experts, max(1, args.steps), 100, args.seed)
        if args.layers:
            load = load[:, : args.layers]
        self.log_p = comm.bcast(loads.log_probs(load).astype(np.float32) if self.rank == 0 else None, root=0)
        self.iters, L, E = self.log_p.shape
        N, H, F, K, T = self.world, args.hidden, args.ffn, args.top_k, args.tokens
        if T % N:
            raise ValueError(f"--tokens {T} must divide over {N} ranks")
        if max(H, F) * XMAX * WMAX >= 1 << 24:
            raise ValueError("hidden/ffn too large for exact fp32 accumulation of the integer weights")
        self.L, self.E, self.N, self.H, self.F, self.K, self.T = L, E, N, H, F, K, T
        self.S = args.slots_per_rank or -(-(E + N) // N)
        S = self.S
        if S * N < E:
            raise ValueError(f"{S} slots a rank x {N} ranks < {E} experts")
        self.P = S * N
        self.gate_scale = max(1, round(math.sqrt(H) * uniform_std(XMAX) * uniform_std(WMAX)))
        self.h_shift = max(1, round(math.log2(self.gate_scale**2 / 10.0)))
        self.out_shift = max(1, round(math.log2(GATE_UNITS * math.sqrt(F) * 5 * uniform_std(WMAX) / 4.0)))
        self.phy2log0 = np.tile(np.arange(self.P, dtype=np.int32) % E, (L, 1))

        # Weights: every layer's tensors in vLLM's / SGLang's names and shapes (--quant), each
        # its own PyTorch allocation (several small ones may share a caching-allocator segment,
        # and so an IPC handle), and one layer of staging (per-expert tensors only).
        self.qx = QuantExperts(args.quant, H, F, E, args.seed, self.dev, args.fp8_block)
        self.layout, self.eb = self.qx.layout, self.qx.expert_bytes
        need = (L + 1) * S * self.eb
        free, _ = torch.cuda.mem_get_info(self.dev)
        if need > free * 0.8:
            raise ValueError(f"the weights need {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free: lower --layers")
        t_gen = time.perf_counter()
        self.live: List[Dict[str, Any]] = []
        self.globals0: List[Dict[str, Any]] = []
        for layer in range(L):
            tensors: Dict[str, Any] = {}
            for t in self.layout:
                if t.kind == "expert":
                    tensors[t.name] = self.qx.alloc(t, S)
            for s in range(S):
                for name, v in self.qx.expert(layer, int(self.phy2log0[layer, self.rank * S + s])).items():
                    tensors[name][s].copy_(v)
            g0 = self.qx.globals(layer)
            for name, v in g0.items():
                tensors[name] = v.clone()  # its own allocation, as a parameter
            self.globals0.append(g0)
            self.live.append(tensors)
        self.staging = {t.name: self.qx.alloc(t, S) for t in self.qx.expert_layout}
        torch.cuda.synchronize()
        self.gen_s = time.perf_counter() - t_gen
        from eplb_client import LayerTensor

        layers = [[_layer_tensor(LayerTensor, t, self.live[layer][t.name]) for t in self.layout] for layer in range(L)]
        staging = [_layer_tensor(LayerTensor, t, self.staging[t.name]) for t in self.qx.expert_layout]
        # Attach: the region created (table written, one IPC handle exported per distinct
        # allocation) and published.
        t_attach = time.perf_counter()
        self.region = EngineRegion.create(args.name, self.rank, N, L, S, E, layers=layers, phy2log=self.phy2log0,
                                          ring_len=args.ring_len, staging=staging, apply=self._apply)
        self.region.publish()
        self.attach_s = time.perf_counter() - t_attach
        self.ipc_handles = num_handles(self.region)
        self.log2phy0, self.logcnt0 = derive_log2phy(self.phy2log0, E, max_replicas=self.P - E + 1)
        self._placement_to_gpu(self.region.placement())
        self.static_l2p = torch.from_numpy(self.log2phy0.astype(np.int64)).to(self.dev)
        self.static_cnt = torch.from_numpy(self.logcnt0.astype(np.int64)).to(self.dev)
        g = torch.Generator(device=self.dev)
        g.manual_seed(args.seed * 7919 + 17)
        self.fp_w = torch.randint(1, 1 << 30, (T // N, H), generator=g, device=self.dev, dtype=torch.int64) * 2 + 1
        self.apply_log: List[Dict] = []
        self._self_test()
        self.region.start_heartbeat()

    # ---- weights ----

    def weights_t(self, layer: int):
        """(w13 [S, H, 2F], w2 [S, F, H]) bf16 of ``layer``'s live slots as the GEMMs read them
        (b transposed); dequantised from the live tensors (none: views of them, read in place)."""
        w13, w2 = self.qx.dequant(self.live[layer])
        return w13.transpose(1, 2), w2.transpose(1, 2)

    def input_scales(self, layer: int, experts):
        """(in13, in2) [n] of logical ``experts`` (a GPU tensor): nvfp4's GLOBAL input scales, read
        by logical expert id (max over gate/up, as vLLM takes it); None otherwise."""
        if self.qx.q != "nvfp4":
            return None
        live = self.live[layer]
        return live["w13_input_scale"].max(dim=1).values[experts], live["w2_input_scale"][experts]

    def _placement_to_gpu(self, placement) -> None:
        torch = self.torch
        self.l2p = torch.from_numpy(np.ascontiguousarray(placement.log2phy).astype(np.int64)).to(self.dev)
        self.cnt = torch.from_numpy(np.ascontiguousarray(placement.logcnt).astype(np.int64)).to(self.dev)
        self._phy2log, self._phy2log_dev = placement.phy2log, None
        mine = placement.phy2log[:, self.rank * self.S : (self.rank + 1) * self.S]
        self.slot_expert = torch.from_numpy(np.ascontiguousarray(mine).astype(np.int64)).to(self.dev)  # [L, S]

    def _apply(self, layer: int, slots: np.ndarray) -> None:
        """The contract's apply, on the engine's stream: staging slot s -> live slot s of
        ``layer``, in place (the same pointers), waited for before the client answers."""
        torch = self.torch
        t0 = time.perf_counter_ns()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        live = self.live[layer]
        for a, b in slot_runs(slots):  # one device copy a run of consecutive slots, a tensor
            for t in self.qx.expert_layout:  # as raw integers of the item size (fp8: no copy kernel needed)
                raw_rows(live[t.name])[a:b].copy_(raw_rows(self.staging[t.name])[a:b])
        e1.record()
        e1.synchronize()
        self.apply_log.append(dict(layer=int(layer), slots=[int(s) for s in slots], stall_us=(time.perf_counter_ns() - t0) / 1e3,
                                   gpu_us=e0.elapsed_time(e1) * 1e3, bytes=int(len(slots) * self.eb)))

    def wrong_bytes(self, layer: int, slots: List[int], phy2log: np.ndarray) -> int:
        """Bytes of the applied slots that differ from the experts phy2log names (regenerated),
        over every per-expert tensor (the rows' own bytes, not the padding)."""
        wrong = 0
        for s in slots:
            e = int(phy2log[layer, self.rank * self.S + s])
            for name, v in self.qx.expert(layer, e).items():
                wrong += int(self.torch.count_nonzero(row_bytes_of(self.live[layer][name][s]) != row_bytes_of(v)))
        return wrong

    def global_bytes_changed(self) -> int:
        """Bytes of every layer's global tensors that differ from their initial values."""
        changed = 0
        for layer, g0 in enumerate(self.globals0):
            for name, v in g0.items():
                changed += int(self.torch.count_nonzero(row_bytes_of(self.live[layer][name]) != row_bytes_of(v)))
        return changed

    def _self_test(self) -> None:
        """The grouped GEMM against fp32 per-slot products on integer data (exact both ways), on
        layer 0's weights; falls back to per-slot GEMMs if the grouped one fails or differs."""
        torch = self.torch
        counts = [3, 0, 17, 5] + [0] * (self.S - 4) if self.S >= 4 else [4] * self.S
        n = sum(counts)
        g = torch.Generator(device=self.dev)
        g.manual_seed(5)
        a = torch.randint(-XMAX, XMAX + 1, (n, self.H), generator=g, device=self.dev).to(torch.bfloat16)
        offs = torch.tensor(np.cumsum(counts), dtype=torch.int32, device=self.dev)
        ref = torch.empty((n, 2 * self.F), dtype=torch.bfloat16, device=self.dev)
        start = 0
        w13_t = self.weights_t(0)[0]
        for s, c in enumerate(counts):
            ref[start : start + c] = (a[start : start + c].float() @ w13_t[s].float()).to(torch.bfloat16)
            start += c
        try:
            got = torch._grouped_mm(a, w13_t, offs=offs)
            same = bool(torch.equal(got, ref))
            why = "" if same else "differs from fp32 per-slot products"
        except Exception as e:  # noqa: BLE001 - any failure means: use the loop
            same, why = False, f"{type(e).__name__}: {e}"
        if not same:
            GROUPED.update(ok=False, why=why)
            log.warning("rank %d: torch._grouped_mm unusable (%s): per-slot GEMMs instead", self.rank, why)

    # ---- the step ----

    def agree(self, have: int) -> Tuple[int, int]:
        buf = np.array([have, -have], dtype=np.int64)
        out = np.empty_like(buf)
        self.comm.Allreduce(buf, out, op=self.MPI.MIN)
        return int(out[0]), int(-out[1])

    def routing(self, step: int):
        """(ids [L, T, K], combine weights [L, T, K] int64 in 64ths): Gumbel top-k on the trace's
        log p of iteration step % iters, the same bits on every rank (Philox from (seed, step))."""
        torch = self.torch
        g = torch.Generator(device=self.dev)
        g.manual_seed(self.args.seed * 1_000_003 + step + 1)
        u = torch.rand((self.L, self.T, self.E), generator=g, device=self.dev).clamp_(1e-12, 1 - 1e-7)
        logits = torch.from_numpy(self.log_p[step % self.iters]).to(self.dev)[:, None, :] - torch.log(-torch.log(u))
        top, ids = torch.topk(logits, self.K, dim=-1, sorted=True)
        r = 1.0 / (1.0 + (top[..., :1] - top))
        w = torch.floor(GATE_UNITS * r / r.sum(-1, keepdim=True) + 0.5).to(torch.int64)
        return ids, w

    def slots_of(self, ids, l2p, cnt):
        """Physical slot of every (token, choice) pair [L, T * K]: replica (token + layer) % logcnt."""
        torch = self.torch
        L, T, K = ids.shape
        lidx = torch.arange(L, device=self.dev)[:, None, None]
        tok = torch.arange(T, device=self.dev)[None, :, None]
        c = cnt[lidx, ids]
        rep = (tok + lidx) % c
        return l2p[lidx, ids, rep].reshape(L, T * K)

    def split_slots(self, ids):
        """Physical slot of every pair [L, T * K] under ``--dispatch split``: every rank routes the
        whole batch, so it has all counts; eplb_client.split's quotas (identical on every rank) are
        filled in (token, k) order. The quotas come from the CUDA kernel (``--split-impl kernel``,
        the default) or the PyTorch split (``torch``): the same integers."""
        torch = self.torch
        from eplb_client import split

        L, T, K = ids.shape
        flat = ids.reshape(L, T * K)
        E = self.cnt.shape[1]
        counts = torch.zeros((L, E), dtype=torch.int64, device=self.dev).scatter_add_(1, flat, torch.ones_like(flat))
        if self._phy2log_dev is None:
            self._phy2log_dev = torch.from_numpy(np.ascontiguousarray(self._phy2log).astype(np.int64)).to(self.dev)
        if getattr(self.args, "split_impl", "kernel") == "kernel" and counts.device.type == "cuda":
            from eplb_client import split_kernel

            quotas, _ = split_kernel.split_layers_cuda(counts, self._phy2log_dev, self.S)
        else:
            quotas, _ = split.split_layers(counts, self._phy2log_dev, self.S)
        return split.replica_slots_layers(flat, quotas, self._phy2log_dev, E)

    def run(self) -> Dict:
        torch, dist, args = self.torch, self.dist, self.args
        L, S, N, T, K, H, F = self.L, self.S, self.N, self.T, self.K, self.H, self.F
        r, steps = self.rank, args.steps
        sidecar = self.wait_for_sidecar() if args.wait_sidecar > 0 else None
        lo, hi = T * r // N, T * (r + 1) // N
        moe_ms = np.zeros((steps, L))
        step_ms = np.zeros(steps)
        pairs_live = np.zeros((steps, L, N), np.int64)
        pairs_static = np.zeros((steps, L, N), np.int64)
        fingerprints: List[int] = []
        commits: List[List[int]] = []
        applied_at: List[int] = []
        wrong = 0
        act = lambda gu: int_act(gu, F, self.gate_scale, self.h_shift)  # noqa: E731
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(L)]
        x_full = torch.empty((T, H), dtype=torch.bfloat16, device=self.dev)
        partial = torch.empty((T, H), dtype=torch.int64, device=self.dev)
        out_mine = torch.empty((T // N, H), dtype=torch.int64, device=self.dev)
        boundary_us: List[float] = []
        for t in range(steps):
            dist.barrier()
            torch.cuda.synchronize()
            t0 = time.perf_counter_ns()
            n_applied = len(self.apply_log)
            placement = self.region.at_step_boundary(t, agree=self.agree)
            if placement.applied:
                # The apply stall: the whole at_step_boundary that applied (agreement, the
                # device copies of every per-expert tensor, waited for, the answer).
                boundary_us.append((time.perf_counter_ns() - t0) / 1e3)
                self._placement_to_gpu(placement)
                applied_at.append(t)
            ids, w = self.routing(t)
            if args.dispatch == "split":  # the exact min-max quotas of this step's counts (issue 22)
                flat = self.split_slots(ids)
            else:
                flat = self.slots_of(ids, self.l2p, self.cnt)  # [L, T * K]
            order = torch.argsort(flat, dim=1, stable=True)
            counts = torch.zeros((L, self.P), dtype=torch.int64, device=self.dev)
            counts.scatter_add_(1, flat, torch.ones_like(flat))
            st = self.slots_of(ids, self.static_l2p, self.static_cnt) // S
            static = torch.zeros((L, N), dtype=torch.int64, device=self.dev)
            static.scatter_add_(1, st, torch.ones_like(st))
            mine = counts[:, r * S : (r + 1) * S]
            offs = torch.cumsum(mine, dim=1).to(torch.int32)
            counts_h = counts.cpu().numpy()  # the step's one host sync before the forward pass
            pairs_live[t] = counts_h.reshape(L, N, S).sum(axis=2)
            pairs_static[t] = static.cpu().numpy()
            g = torch.Generator(device=self.dev)
            g.manual_seed(self.args.seed * 1_000_003 + step_key(t))
            x = torch.randint(-XMAX, XMAX + 1, (T, H), generator=g, device=self.dev, dtype=torch.int16)[lo:hi]
            x = x.to(torch.bfloat16)
            wflat = w.reshape(L, T * K)
            fp = torch.zeros((), dtype=torch.int64, device=self.dev)
            for layer in range(L):
                dist.all_gather_into_tensor(x_full, x)
                start = int(counts_h[layer, : r * S].sum())
                n = int(counts_h[layer, r * S : (r + 1) * S].sum())
                pairs = order[layer, start : start + n]
                tok = pairs // K
                a = x_full.index_select(0, tok)
                e0, e1 = events[layer]
                e0.record()
                if n:
                    w13_t, w2_t = self.weights_t(layer)
                    scales = self.input_scales(layer, self.slot_expert[layer])
                    if scales is not None:  # per slot, and per pair row (the rows are sorted by slot)
                        scales = scales + tuple(v.repeat_interleave(mine[layer], output_size=n) for v in scales)
                    y = experts_forward(a, w13_t, w2_t, offs[layer], counts_h[layer, r * S : (r + 1) * S].tolist(), act,
                                        scales)
                e1.record()
                partial.zero_()
                if n:
                    partial.index_add_(0, tok, y.to(torch.int64) * wflat[layer].index_select(0, pairs)[:, None])
                dist.reduce_scatter_tensor(out_mine, partial)
                fp += (out_mine * self.fp_w).sum()
                x = (x.to(torch.int64) + ((out_mine + (1 << (self.out_shift - 1))) >> self.out_shift)).clamp_(-XMAX, XMAX)
                x = x.to(torch.bfloat16)
            fingerprints.append(int(fp.item()))  # syncs: the step is done
            step_ms[t] = (time.perf_counter_ns() - t0) / 1e6
            for layer in range(L):
                moe_ms[t, layer] = events[layer][0].elapsed_time(events[layer][1])
            for a in self.apply_log[n_applied:]:
                a["step"] = t
            for layer in placement.applied:
                commits.append([t, layer, int(placement.epoch[layer])])
                if not args.no_check_applied:
                    slots = next(a["slots"] for a in reversed(self.apply_log) if a["layer"] == layer)
                    wrong += self.wrong_bytes(layer, slots, placement.phy2log)
            # The step is all MoE layers, their collectives included (every rank waits for the
            # slowest one's experts): its wall time is the MoE time the sidecar's cost model reads.
            self.region.record(t, counts_h[:, r * S : (r + 1) * S], phase=args.phase, tokens=(hi - lo) * K,
                               moe_ns=int(step_ms[t] * 1e6))
            if args.log_every and r == 0 and (t + 1) % args.log_every == 0:
                log.info("step %d/%d: moe %.2f ms, step %.1f ms, %d layer switches so far", t + 1, steps,
                         moe_ms[t].sum(), step_ms[t], len(commits))
        self.boundary_apply_us = boundary_us
        return self._report(sidecar, moe_ms, step_ms, pairs_live, pairs_static, fingerprints, commits, wrong)

    def wait_for_sidecar(self) -> bool:
        from .engine import wait_for_sidecar

        # Until its loop runs: its NCCL set-up takes seconds, a whole small run here.
        return wait_for_sidecar(self.region, self.comm, self.args.wait_sidecar, running=True)

    def _report(self, sidecar, moe_ms, step_ms, pairs_live, pairs_static, fingerprints, commits, wrong) -> Dict:
        comm = self.comm
        g = comm.gather(dict(moe_ms=moe_ms, step_ms=step_ms, fingerprints=fingerprints, commits=commits, wrong=wrong,
                             apply=self.apply_log, phy2log=self.region.placement().phy2log.copy(),
                             global_changed=self.global_bytes_changed(), attach_s=self.attach_s, gen_s=self.gen_s,
                             ipc_handles=self.ipc_handles, boundary_apply_us=self.boundary_apply_us), root=0)
        if self.rank != 0:
            return {}
        moe = np.stack([x["moe_ms"] for x in g])  # [N, steps, L]
        per_rank = moe.sum(axis=2)  # [N, steps]
        keyed = [{(c[1], c[2]): c[0] for c in x["commits"]} for x in g]
        keys = set().union(*keyed)
        applies = [a for x in g for a in x["apply"]]
        return {
            "engine": "eplb_engine.gpu",
            "device": self.torch.cuda.get_device_name(self.dev),
            "world_size": self.N, "num_layers": self.L, "num_experts": self.E, "slots_per_rank": self.S,
            "hidden": self.H, "ffn": self.F, "expert_bytes": self.eb, "tokens_per_step": self.T, "top_k": self.K,
            "quant": self.qx.q, "fp8_block": self.qx.block if self.qx.q == "fp8-block" else None,
            "tensors_per_layer": len(self.layout),
            "tensors": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "kind": t.kind, "row_bytes": t.row_bytes,
                         "pad": t.pad} for t in self.layout],
            # One layer of staging: what the engine adds for eplb.
            "staging_bytes": int(self.S * self.eb),
            "ipc_handles": [x["ipc_handles"] for x in g],  # per rank: distinct allocations exported
            "client_backend": self.region.backend,  # rank 0's: "native" (libeplb_client) or "python"
            "ipc_tensors": self.L * len(self.layout) + len(self.qx.expert_layout),
            "attach_s": [x["attach_s"] for x in g],  # per rank: region created, handles exported, published
            "weights_generated_s": [x["gen_s"] for x in g],
            "global_bytes_changed": int(sum(x["global_changed"] for x in g)),
            "trace": self.args.trace, "trace_dataset": self.args.trace_dataset, "steps": self.args.steps,
            "grouped_gemm": GROUPED["ok"], "grouped_gemm_fallback_reason": GROUPED["why"],
            "sidecar_attached": sidecar,
            "moe_ms_slowest_rank": per_rank.max(axis=0).tolist(),  # [steps]: max over ranks of the sum over layers
            "moe_ms_sum_of_layer_max": moe.max(axis=0).sum(axis=1).tolist(),  # [steps]: what EP waits for
            "moe_ms_per_rank": per_rank.tolist(),
            "moe_ms_per_rank_layer": np.round(moe, 4).tolist(),  # [N, steps, L]
            "step_ms_rank0": g[0]["step_ms"].tolist(),
            "pairs_live": pairs_live.tolist(), "pairs_static": pairs_static.tolist(),
            "balancedness_live": loads.balancedness(pairs_live),
            "balancedness_static": loads.balancedness(pairs_static),
            "fingerprints": [x["fingerprints"] for x in g],  # [N][steps]
            "layers_committed": len(keys),
            "commits": sorted([[int(keyed[0][k]), int(k[0]), int(k[1])] for k in keys if k in keyed[0]]),
            "commit_step_disagreements": sum(1 for k in keys if len({d.get(k) for d in keyed}) != 1),
            "placements_agree": all(np.array_equal(x["phy2log"], g[0]["phy2log"]) for x in g),
            "wrong_bytes": int(sum(x["wrong"] for x in g)),
            "applied_bytes_checked": 0 if self.args.no_check_applied else int(sum(a["bytes"] for a in applies)),
            "applies": applies,
            # The apply stall a layer: the whole at_step_boundary that applied (every rank).
            "apply_stall_us": _stats_us([u for x in g for u in x["boundary_apply_us"]]),
        }

    def close(self, ok: bool) -> None:
        if ok:
            self.region.finish(wait_detach_s=self.args.detach_wait)
        else:
            self.region.fail()
        try:
            self.dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def _stats_us(a) -> Dict[str, float]:
    a = np.asarray(a, dtype=np.float64)
    if a.size == 0:
        return {"count": 0}
    return {"count": int(a.size), "median": float(np.median(a)), "p99": float(np.percentile(a, 99)), "max": float(a.max())}


def _layer_tensor(LayerTensor, t: "quant.TensorLayout", data):
    """The client's LayerTensor for layout entry ``t`` (the contract's dtype name with it where
    the client takes one: fp4x2 and f8e4m3 are opaque bytes to it either way)."""
    import inspect

    kind = "expert" if t.kind == "expert" else "global"
    try:
        takes_dtype = "dtype" in inspect.signature(LayerTensor).parameters
    except (TypeError, ValueError):
        takes_dtype = False
    return LayerTensor(t.name, data, kind=kind, dtype=t.dtype) if takes_dtype else LayerTensor(t.name, data, kind=kind)


def num_handles(region) -> int:
    """The IPC handles the client exported (header ``num_handles`` at byte 184)."""
    n = getattr(region, "num_handles", None)
    if n is not None:
        return int(n)
    import struct

    return int(struct.unpack_from("<I", region._mm, 184)[0])


def slot_runs(slots) -> List[Tuple[int, int]]:
    """[a, b) runs of consecutive slots of the ascending ``slots``: [0, 1, 2, 5] -> [(0, 3), (5, 6)]."""
    runs: List[Tuple[int, int]] = []
    for s in map(int, slots):
        if runs and runs[-1][1] == s:
            runs[-1] = (runs[-1][0], s + 1)
        else:
            runs.append((s, s + 1))
    return runs


def step_key(t: int) -> int:
    return (t + 1) * 7 + (1 << 40)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the cross-check against transformers ------------------------------------------------------


def xcheck(seed: int = 0) -> Dict:
    """Qwen3-MoE's sparse block from transformers (random weights from a small config, nothing
    downloaded) against this engine's expert path: the same router math (softmax, top-k,
    renormalised), the block's expert weights packed into the engine's expert layout
    (w13 = [gate; up] [2F, H], w2 = down [H, F]), one grouped GEMM per projection with SiLU.
    Real-valued bf16: compared with a tolerance, not bitwise."""
    import torch
    import transformers
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    torch.manual_seed(seed)
    H, F, E, K, T = 512, 384, 16, 4, 256
    cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=F, num_experts=E, num_experts_per_tok=K,
                         norm_topk_prob=True, intermediate_size=1024, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=4)
    block = Qwen3MoeSparseMoeBlock(cfg).to("cuda", torch.bfloat16).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.05)
    x = torch.randn(1, T, H, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref = block(x)
    ref = (ref[0] if isinstance(ref, tuple) else ref).reshape(T, H).float()
    gate_w = _router_weight(block)
    w13, w2 = _expert_weights(block, E, H, F)  # [E, 2F, H], [E, H, F]
    with torch.no_grad():
        xs = x.reshape(T, H)
        logits = torch.nn.functional.linear(xs, gate_w)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        top, ids = torch.topk(probs, K, dim=-1)
        top = (top / top.sum(-1, keepdim=True)).to(torch.bfloat16)
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=E)
        offs = torch.cumsum(counts, 0).to(torch.int32)
        a = xs.index_select(0, order // K)
        # The engine's layout: one expert = w13 then w2, bf16, contiguous; views read in place.
        packed = torch.cat([w13.reshape(E, -1), w2.reshape(E, -1)], dim=1).contiguous()
        w13_t = packed[:, : 2 * F * H].view(E, 2 * F, H).transpose(1, 2)
        w2_t = packed[:, 2 * F * H :].view(E, H, F).transpose(1, 2)
        y = experts_forward(a, w13_t, w2_t, offs, counts.tolist(), lambda gu: silu_act(gu, F))
        out = torch.zeros((T, H), dtype=torch.float32, device="cuda")
        out.index_add_(0, order // K, y.float() * top.reshape(-1)[order].float()[:, None])
    err = (out - ref).abs().max().item()
    scale = ref.abs().max().item()
    rel = err / max(scale, 1e-30)
    return {"transformers": transformers.__version__, "torch": torch.__version__, "block": "Qwen3MoeSparseMoeBlock",
            "hidden": H, "ffn": F, "experts": E, "top_k": K, "tokens": T, "grouped_gemm": GROUPED["ok"],
            "max_abs_err": err, "max_abs_ref": scale, "max_rel_err": rel, "tolerance": 2e-2, "ok": rel < 2e-2}


def _router_weight(block):
    gate = block.gate
    return gate.weight if hasattr(gate, "weight") else next(iter(gate.parameters()))


def _expert_weights(block, E: int, H: int, F: int):
    """(w13 [E, 2F, H] as [gate; up], w2 [E, H, F]) from either transformers layout: a ModuleList
    of MLPs (gate_proj, up_proj, down_proj) or fused 3-D parameters (gate_up_proj, down_proj)."""
    import torch

    ex = block.experts
    if isinstance(ex, torch.nn.ModuleList):
        w13 = torch.stack([torch.cat([m.gate_proj.weight, m.up_proj.weight], 0) for m in ex])
        w2 = torch.stack([m.down_proj.weight for m in ex])
        return w13, w2
    gu, dn = ex.gate_up_proj, ex.down_proj
    w13 = gu if tuple(gu.shape) == (E, 2 * F, H) else gu.transpose(1, 2)
    w2 = dn if tuple(dn.shape) == (E, H, F) else dn.transpose(1, 2)
    if tuple(w13.shape) != (E, 2 * F, H) or tuple(w2.shape) != (E, H, F):
        raise RuntimeError(f"unknown expert layout: gate_up_proj {tuple(gu.shape)}, down_proj {tuple(dn.shape)}")
    return w13, w2


def main(argv: Optional[List[str]] = None) -> int:
    args = apply_presets(parse_args(argv), argv)
    logging.basicConfig(level=logging.INFO, format="# %(message)s")
    if args.xcheck:
        r = xcheck(args.seed)
        print(json.dumps(r))
        if args.report:
            with open(args.report, "w") as f:
                json.dump(r, f, indent=1)
        return 0 if r["ok"] else 1
    from .engine import run_ranks

    return run_ranks(args, GpuEngine, summary,
                     lambda r: 0 if r["wrong_bytes"] == 0 and r["commit_step_disagreements"] == 0
                     and r["global_bytes_changed"] == 0 else 1, indent=None)


def summary(r: Dict) -> None:
    steps = len(r["moe_ms_sum_of_layer_max"])
    tail = slice(steps // 2, steps)
    moe = float(np.median(r["moe_ms_sum_of_layer_max"][tail])) if steps else 0.0
    print(f"# eplb_engine.gpu: {r['world_size']} x {r['device']}, {r['num_layers']} layers x {r['num_experts']} experts, "
          f"{r['slots_per_rank']} slots a rank, expert {r['hidden']}x{r['ffn']} {r['quant']} ({r['expert_bytes']} bytes), "
          f"{r['tokens_per_step']} tokens top-{r['top_k']}, grouped GEMM {r['grouped_gemm']}")
    print(f"# steps {steps} | layers committed {r['layers_committed']} | commit step disagreements "
          f"{r['commit_step_disagreements']} | wrong bytes {r['wrong_bytes']} of {r['applied_bytes_checked']} checked")
    st = r["apply_stall_us"]
    print(f"# quant {r['quant']}: {r['tensors_per_layer']} tensors a layer ({r['ipc_tensors']} tensors, "
          f"{r['ipc_handles'][0]} IPC handles on rank 0) | attach {max(r['attach_s']):.3f} s (slowest rank) | staging "
          f"{r['staging_bytes'] / 2**20:.1f} MiB | global bytes changed {r['global_bytes_changed']}")
    print(f"# apply stall a layer (at_step_boundary that applied): {st.get('count', 0)} times, median "
          f"{st.get('median', 0):.1f} us, max {st.get('max', 0):.1f} us")
    print(f"# balancedness static {r['balancedness_static']:.4f} live {r['balancedness_live']:.4f} | MoE ms a step "
          f"(the slowest rank of each layer), median of the second half: {moe:.3f}")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
