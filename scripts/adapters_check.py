#!/usr/bin/env python3
"""The adapters against the engines' real code, on CPU: one engine, one quant scheme, 4 ranks
over Gloo (scripts/test_adapters.sh runs it in the engine's own virtual environment).

A small DeepSeek-like MoE: 4 MoE layers x 64 experts, 2 redundant slots a rank (18 slots a rank,
72 physical), the engine's own parameter names and shapes (bf16, fp8-block, nvfp4; SGLang: a
fused shared-expert row after each rank's routed rows, model layer 0 dense). Every rank:

1. builds its tensors (the bytes of each logical expert are the same on every rank), keeps a
   copy for the engine's own mover and a snapshot of the shared rows and globals;
2. attaches the adapter (region, maps from the engine's own objects) and runs ``--steps`` steps
   beside the sidecar (``eplb-worker run --engine shm:NAME``, launched by rank 0's parent), each
   step routing 64 tokens x top-8 (skewed to experts 40..47) through the engine's own maps into
   the engine's own counter, fed to the adapter's load path;
3. compares, per step, the logical load the sidecar gets from the ring (the contract's rule:
   sum over ranks of the physical counts, through that step's ``phy2log``) with the engine's own
   logical count (SGLang ``_convert_global_physical_count_to_logical_count`` + all-reduce; vLLM the
   scatter_add of ``EplbState.rearrange``, quoted below);
4. after the run applies the placement the sidecar committed (initial -> final ``phy2log``) with
   the engine's own mover to the copy (SGLang ``update_expert_weights_single_layer``; vLLM
   ``rearrange_expert_weights_inplace`` with a Gloo ``EplbCommunicator``) and compares bytes,
   shared rows and globals, and the engine's map tensors (SGLang: the six ``ExpertLocationMetadata``
   tensors against ``init_by_mapping(final)``; vLLM: the three maps against ``_commit_eplb_maps``).

Writes one JSON object (``--out``) with the report keys.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import traceback
import types
from typing import Any, Dict, List, Tuple

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "python"))

W = 4  # ranks
L = 4  # MoE layers
E = 64  # logical experts
S = E // W + 2  # slots a rank (2 redundant)
P = W * S
H, I = 256, 128  # hidden, intermediate (per partition)
TOKENS, TOPK = 64, 8
HOT = list(range(40, 48))


def tensor_specs(engine: str, quant: str) -> List[Tuple[str, str, Tuple[int, ...], str]]:
    """(name, torch dtype name, row shape, kind) in the engine's parameter order. Global rows:
    the whole shape. ``row shape ()`` is a per-expert scalar ``[E]`` tensor."""
    if quant == "bf16":
        return [("w13_weight", "bfloat16", (2 * I, H), "expert"), ("w2_weight", "bfloat16", (H, I), "expert")]
    if quant == "fp8":
        return [("w13_weight", "float8_e4m3fn", (2 * I, H), "expert"), ("w2_weight", "float8_e4m3fn", (H, I), "expert"),
                ("w13_weight_scale_inv", "float32", (2 * I // 128, H // 128), "expert"),
                ("w2_weight_scale_inv", "float32", (H // 128, I // 128), "expert")]
    assert quant == "nvfp4"
    common = [("w13_weight", "uint8", (2 * I, H // 2), "expert"), ("w2_weight", "uint8", (H, I // 2), "expert"),
              ("w13_weight_scale", "float8_e4m3fn", (2 * I, H // 16), "expert"),
              ("w2_weight_scale", "float8_e4m3fn", (H, I // 16), "expert")]
    if engine == "sglang":  # SGLang ModelOptNvFp4FusedMoEMethod: 12 tensors, the input scales global
        return common + [("w13_weight_scale_2", "float32", (2,), "expert"), ("w2_weight_scale_2", "float32", (), "expert"),
                         ("w13_input_scale", "float32", (E, 2), "global"), ("w2_input_scale", "float32", (E,), "global"),
                         ("g1_alphas", "float32", (), "expert"), ("g2_alphas", "float32", (), "expert"),
                         ("w13_blockscale_swizzled", "float8_e4m3fn", (2 * I, H // 16), "expert"),
                         ("w2_blockscale_swizzled", "float8_e4m3fn", (H, I // 16), "expert")]
    # vLLM ModelOptNvFp4FusedMoE after process_weights_after_loading: scale_2 one per expert, the
    # input scales broadcast views (stride 0) of one scalar, never moved.
    return common + [("w13_weight_scale_2", "float32", (), "expert"), ("w2_weight_scale_2", "float32", (), "expert"),
                     ("w13_input_scale", "float32", (S,), "global_bcast"), ("w2_input_scale", "float32", (S,), "global_bcast"),
                     ("g1_alphas", "float32", (), "expert"), ("g2_alphas", "float32", (), "expert")]


def _tdtype(torch: Any, name: str) -> Any:
    return getattr(torch, name)


def _raw(torch: Any, t: Any) -> Any:
    t = t.reshape(1) if t.dim() == 0 else t
    return t.contiguous().view(torch.uint8)


def build_layers(torch: Any, engine: str, quant: str, rank: int, p2l: np.ndarray, shared_rows: int) -> List[Dict[str, Any]]:
    """Per MoE layer ``{name: tensor}``: row s of a per-expert tensor = the bytes of logical expert
    ``p2l[layer, rank * S + s]`` (the same on every rank); rows after S (shared) and globals:
    random bytes of this rank."""
    out = []
    for layer in range(L):
        d = {}
        for i, (name, dt, shape, kind) in enumerate(tensor_specs(engine, quant)):
            dtype = _tdtype(torch, dt)
            item = torch.empty((), dtype=dtype).element_size()
            if kind == "expert":
                row = int(np.prod(shape)) * item
                g = torch.Generator().manual_seed(1000 * layer + i)
                bank = torch.randint(0, 256, (E, row), generator=g, dtype=torch.uint8)
                rows = bank[torch.from_numpy(p2l[layer, rank * S:(rank + 1) * S].astype(np.int64))]
                if shared_rows:
                    g2 = torch.Generator().manual_seed(99991 + 7919 * rank + 1000 * layer + i)
                    rows = torch.cat([rows, torch.randint(0, 256, (shared_rows, row), generator=g2, dtype=torch.uint8)])
                d[name] = rows.view(dtype).reshape((rows.shape[0],) + shape)
            elif kind == "global":
                g = torch.Generator().manual_seed(55555 + 1000 * layer + i)
                d[name] = torch.rand(shape, generator=g).to(dtype)
            else:  # a broadcast view of one scalar
                d[name] = torch.tensor([0.0125 * (layer + 1)], dtype=dtype).expand(shape)
        out.append(d)
    return out


def expected_rows(torch: Any, engine: str, quant: str, layer: int, name: str, experts: np.ndarray) -> Any:
    for i, (n, dt, shape, kind) in enumerate(tensor_specs(engine, quant)):
        if n == name:
            item = torch.empty((), dtype=_tdtype(torch, dt)).element_size()
            g = torch.Generator().manual_seed(1000 * layer + i)
            bank = torch.randint(0, 256, (E, int(np.prod(shape)) * item), generator=g, dtype=torch.uint8)
            return bank[torch.from_numpy(experts.astype(np.int64))]
    raise KeyError(name)


def routing(rng: np.random.Generator) -> np.ndarray:
    """[L, TOKENS, TOPK] logical experts of this rank's tokens (distinct per token), skewed."""
    w = np.ones(E)
    w[HOT] = 12.0
    w /= w.sum()
    out = np.empty((L, TOKENS, TOPK), np.int64)
    for layer in range(L):
        for t in range(TOKENS):
            out[layer, t] = rng.choice(E, TOPK, replace=False, p=w)
    return out


# ---- SGLang ----------------------------------------------------------------------------------


def sglang_shim(torch: Any) -> Dict[str, Any]:
    """SGLang's expert-location code reads its process-wide runtime context (published by the
    launcher from ServerArgs). Here, without a server, the module's context getters are pointed at
    plain namespaces with the values of a 4-rank EP job (one node, DeepEP a2a, static dispatch);
    every function called is SGLang's own."""
    import sglang.srt.eplb.expert_location as el

    moe = types.SimpleNamespace(ep_num_redundant_experts=P - E, moe_a2a_backend="deepep", ep_dispatch_algorithm="static",
                                ep_join_mode="none", eplb_algorithm="auto", init_expert_location="trivial")
    exec_ = types.SimpleNamespace(moe=moe)
    parallel = types.SimpleNamespace(ep_size=W, nnodes=1, elastic_ep_initial_size=None, tp_size=W, ep_join_rank_offset=0)
    device = types.SimpleNamespace(device="cpu")
    el.get_exec = lambda: exec_
    el.get_parallel = lambda: parallel
    el.get_device = lambda: device
    el._prefer_same_node_experts = lambda: True
    cfg = el.ModelConfigForExpertLocation(num_layers=L + 1, num_logical_experts=E, num_groups=8)
    el.ModelConfigForExpertLocation.from_model_config = staticmethod(lambda model_config: cfg)
    return {"el": el}


def sglang_model(torch: Any, layers: List[Dict[str, Any]], quant: str) -> Any:
    """DeepSeek-V2's MoE block as SGLang holds it: ``model.model.layers[i].mlp.experts`` with
    the parameters, ``num_fused_shared_experts``, and SGLang's own ``get_moe_weights``."""
    nn = torch.nn
    try:
        from sglang.srt.models.deepseek_v2 import DeepseekV2MoE
        get_moe_weights = DeepseekV2MoE.get_moe_weights
        source = "sglang.srt.models.deepseek_v2.DeepseekV2MoE.get_moe_weights"
    except Exception as e:  # noqa: BLE001 - loaded by path below
        get_moe_weights, source = _sglang_get_moe_weights_by_path(), f"DeepseekV2MoE.get_moe_weights by path ({type(e).__name__})"

    class Experts(nn.Module):
        pass

    class Mlp(nn.Module):
        pass

    mlps = []
    for d in layers:
        ex = Experts()
        ex.num_local_experts = S + 1
        for name, t in d.items():
            p = nn.Parameter(t, requires_grad=False)
            if name in ("w13_input_scale", "w2_input_scale"):
                p._sglang_require_global_experts = True
            ex.register_parameter(name, p)
        m = Mlp()
        m.experts = ex
        m.num_fused_shared_experts = 1
        m.get_moe_weights = types.MethodType(get_moe_weights, m)
        mlps.append(m)
    dense = Mlp()
    model = types.SimpleNamespace(model=types.SimpleNamespace(layers=[types.SimpleNamespace(mlp=dense)] +
                                                              [types.SimpleNamespace(mlp=m) for m in mlps]))
    model.routed_experts_weights_of_layer = {i + 1: m.get_moe_weights() for i, m in enumerate(mlps)}
    model.get_moe_weights_source = source
    return model


def _sglang_get_moe_weights_by_path() -> Any:
    import ast
    import importlib.util

    spec = importlib.util.find_spec("sglang")
    path = os.path.join(os.path.dirname(spec.origin), "srt", "models", "deepseek_v2.py")
    src = open(path).read()
    tree = ast.parse(src)
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "get_moe_weights":
            code = ast.get_source_segment(src, node)
            ns: Dict[str, Any] = {}
            from sglang.srt.layers.moe.utils import filter_moe_weight_param_global_expert

            exec("\n".join(line[4:] for line in code.splitlines()), {"filter_moe_weight_param_global_expert":
                                                                      filter_moe_weight_param_global_expert}, ns)
            return ns["get_moe_weights"]
    raise RuntimeError(f"no get_moe_weights in {path}")


# ---- vLLM ------------------------------------------------------------------------------------


def vllm_model(torch: Any, layers: List[Dict[str, Any]]) -> Any:
    """vLLM's MoE layers as the MixtureOfExperts interface holds them: ``model.moe_layers`` and
    ``model.expert_weights`` from vLLM's own ``RoutedExperts.get_expert_weights``."""
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    nn = torch.nn

    class Moe(nn.Module):
        pass

    moes = []
    for d in layers:
        m = Moe()
        m.local_num_experts = S
        for name, t in d.items():
            m.register_parameter(name, nn.Parameter(t, requires_grad=False))
        moes.append(m)
    model = types.SimpleNamespace(moe_layers=moes)
    model.expert_weights = [list(RoutedExperts.get_expert_weights(m)) for m in moes]
    return model


def vllm_maps(torch: Any, p2l: np.ndarray) -> Any:
    """An ``EplbModelState``'s map fields as ``EplbState.add_model`` builds them (vLLM's own
    compute_logical_maps, padded to num_redundant + 1 replicas)."""
    from vllm.distributed.eplb.eplb_state import compute_logical_maps

    phy = torch.from_numpy(p2l.astype(np.int64))
    l2p, cnt = compute_logical_maps(phy.clone(), E)
    l2p = torch.nn.functional.pad(l2p, (0, P - E + 1 - l2p.shape[-1]), value=-1)
    return types.SimpleNamespace(physical_to_logical_map=phy.clone(), physical_to_logical_map_buffer=phy.clone(),
                                 logical_to_physical_map=l2p, logical_replica_count=cnt,
                                 expert_load_pass=torch.zeros(L, P, dtype=torch.int32))


def gloo_communicator(torch: Any) -> Any:
    """vLLM's EplbCommunicator interface over torch.distributed (Gloo): vLLM's own Gloo
    communicator needs CUDA (pinned staging, a stream sync)."""
    import torch.distributed as dist
    from vllm.distributed.eplb.eplb_communicator import EplbCommunicator

    class GlooCommunicator(EplbCommunicator):
        def __init__(self) -> None:
            self.ops: List[Any] = []

        def add_send(self, tensors, dst_rank, expert_id) -> None:  # noqa: ANN001
            self.ops += [dist.P2POp(dist.isend, t, dst_rank) for t in tensors]

        def add_recv(self, tensors, src_rank, expert_id) -> None:  # noqa: ANN001
            self.ops += [dist.P2POp(dist.irecv, t, src_rank) for t in tensors]

        def execute(self) -> None:
            if self.ops:
                for r in dist.batch_isend_irecv(self.ops):
                    r.wait()
            self.ops = []

    return GlooCommunicator()


# ---- one rank --------------------------------------------------------------------------------


def sidecar_cmd(args: argparse.Namespace, name: str, work: str) -> List[str]:
    if args.sidecar == "worker":
        return ["mpirun", "-n", str(W), "--oversubscribe", args.worker, "run", "--engine", f"shm:{name}",
                "--steps", str(args.steps + 1), "--eplb-update-interval-steps", str(args.interval),
                "--transport", "host", "--engine-wait", "300", "--report", os.path.join(work, "worker.json")]
    return [sys.executable, os.path.join(ROOT, "python", "tests", "fake_sidecar.py"), "--name", name,
            "--ranks", str(W), "--every", str(args.interval), "--attach-timeout", "900", "--engine-timeout", "60"]


def rank_main(rank: int, args: argparse.Namespace, port: int, root_work: str) -> None:
    """One engine rank: every quant scheme in turn (the engine is imported once); rank 0 starts
    the sidecar of each before the regions exist and collects its exit code."""
    import logging

    import torch
    import torch.distributed as dist

    logging.basicConfig(level=logging.INFO, format=f"rank{rank} %(name)s: %(message)s")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=W)
    for quant in args.quants:
        work = os.path.join(root_work, f"{args.engine}-{quant}")
        os.makedirs(work, exist_ok=True)
        args.quant = quant
        args.name = f"adapters-{args.engine}-{quant}-{os.getppid()}"
        side = None
        if rank == 0:
            for f in os.listdir(work):
                os.unlink(os.path.join(work, f))
            env = dict(os.environ)
            if os.geteuid() == 0:
                env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
            cmd = sidecar_cmd(args, args.name, work)
            with open(os.path.join(work, "sidecar.cmd"), "w") as f:
                f.write(" ".join(cmd) + "\n")
            with open(os.path.join(work, "sidecar.log"), "w") as log:
                side = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        dist.barrier()
        t0 = time.monotonic()
        res: Dict[str, Any] = {"rank": rank}
        try:
            res.update(run_rank(torch, dist, rank, args))
        except Exception as e:  # noqa: BLE001 - reported
            res["error"] = f"{type(e).__name__}: {e}"
            res["traceback"] = traceback.format_exc()
        res["seconds"] = round(time.monotonic() - t0, 1)
        if side is not None:
            try:
                res["sidecar_rc"] = side.wait(timeout=120)
            except subprocess.TimeoutExpired:
                side.kill()
                res["sidecar_rc"] = -9
        with open(os.path.join(work, f"rank{rank}.json"), "w") as f:
            json.dump(res, f)
        if "error" in res:
            from eplb_client.region import _LIVE_REGIONS

            for reg in list(_LIVE_REGIONS):  # os._exit skips atexit: fail (and unlink) this rank's region
                reg.fail()
            os._exit(1)  # the others may wait in a collective: the parent reports
        dist.barrier()
    dist.destroy_process_group()


def run_rank(torch: Any, dist: Any, rank: int, args: argparse.Namespace) -> Dict[str, Any]:
    engine, quant = args.engine, args.quant
    p2l0 = np.tile(np.arange(P) % E, (L, 1)).astype(np.int64)
    shared = 1 if engine == "sglang" else 0
    layers = build_layers(torch, engine, quant, rank, p2l0, shared)
    own = [{n: t.clone() for n, t in d.items()} for d in layers]  # the engine's own mover's copy
    snap = [{n: t.clone() for n, t in d.items()} for d in layers]
    notes: List[str] = []
    group = dist.group.WORLD

    if engine == "sglang":
        import sglang

        from eplb_client.adapters.sglang import SglangAttachment

        version = sglang.__version__
        shim = sglang_shim(torch)
        el = shim["el"]
        model = sglang_model(torch, layers, quant)
        notes.append(f"get_moe_weights: {model.get_moe_weights_source}")
        model_config = types.SimpleNamespace(hf_config=None)
        full0 = torch.from_numpy(np.vstack([np.arange(P) % E, p2l0]))
        metadata = el.ExpertLocationMetadata.init_by_mapping(model_config, full0, moe_ep_rank=rank)
        sa = SglangAttachment(args.name, model, model_config, metadata, rank, W, group, ring_len=64)
        att = sa.attachment
        params = {i: [p for p in ps] for i, ps in enumerate(att._layers)}
        from sglang.srt.eplb.expert_distribution import _convert_global_physical_count_to_logical_count

        def engine_map() -> np.ndarray:
            return metadata.physical_to_logical_map_cpu[sa.layer_ids].numpy().copy()

        def route(logical: np.ndarray) -> np.ndarray:
            """SGLang's static dispatch: logical_to_rank_dispatch_physical_map of this rank."""
            disp = metadata.logical_to_rank_dispatch_physical_map.numpy()
            counts = np.zeros((L + 1, P), np.int64)
            for layer in range(L):
                np.add.at(counts[layer + 1], disp[layer + 1][logical[layer].ravel()], 1)
            return counts

        def feed(counts: np.ndarray) -> List[int]:
            att.end_step(sa.counts_of(torch.from_numpy(counts).to(torch.int32)))
            return []

        def own_logical(counts: np.ndarray) -> np.ndarray:
            lc = _convert_global_physical_count_to_logical_count(
                torch.from_numpy(counts).to(torch.int32)[None], num_layers=L + 1, num_logical_experts=E,
                physical_to_logical_map=metadata.physical_to_logical_map)
            dist.all_reduce(lc, op=dist.ReduceOp.SUM)
            return lc[0, 1:].numpy().astype(np.int64)
    else:
        import vllm

        from eplb_client.adapters.vllm import VllmAttachment, install_step

        version = vllm.__version__
        import vllm.distributed.eplb.eplb_state as es

        if es.PIN_MEMORY and not torch.cuda.is_available():
            es.PIN_MEMORY = False  # vLLM decides it once at import from the platform; no driver here
            notes.append("vllm.distributed.eplb.eplb_state.PIN_MEMORY set False (no NVIDIA driver on this machine)")
        model = vllm_model(torch, layers)
        ms = vllm_maps(torch, p2l0)
        va = VllmAttachment(args.name, model, ms, rank, W, group, ring_len=64)
        att = va.attachment
        state = types.SimpleNamespace(step=lambda *a, **k: None, should_record_tensor=torch.zeros(1, dtype=torch.bool))
        install_step(state, va)
        if not bool(state.should_record_tensor.item()):
            raise AssertionError("the adapter left vLLM's record flag off")

        def engine_map() -> np.ndarray:
            return ms.physical_to_logical_map.numpy().copy()

        def route(logical: np.ndarray) -> np.ndarray:
            """vLLM's router: replica (token index) % logical_replica_count of logical_to_physical_map."""
            l2p, cnt = ms.logical_to_physical_map.numpy(), ms.logical_replica_count.numpy()
            counts = np.zeros((L, P), np.int64)
            tok = np.repeat(np.arange(TOKENS), TOPK)
            for layer in range(L):
                e = logical[layer].ravel()
                phys = l2p[layer, e, tok % cnt[layer, e]]
                np.add.at(counts[layer], phys, 1)
            return counts

        def feed(counts: np.ndarray) -> List[int]:
            ms.expert_load_pass += torch.from_numpy(counts).to(torch.int32)  # what the router kernel adds
            state.step(is_dummy=False, is_profile=False)  # vLLM calls it after the pass
            if int(ms.expert_load_pass.abs().sum()) != 0:
                raise AssertionError("expert_load_pass not zeroed after the step (vLLM zeroes it)")
            return list(va.last_applied)

        def own_logical(counts: np.ndarray) -> np.ndarray:
            # vLLM EplbState.rearrange: logical_expert_load_window.scatter_add_(dim=-1,
            #   index=physical_to_logical.masked_fill(physical_to_logical < 0, invalid_idx)..., src=window)
            # then [..., :-1] and an all-reduce over the EP group.
            window = torch.from_numpy(counts).to(torch.int32)[None]
            phy = ms.physical_to_logical_map
            out = torch.zeros(1, L, E + 1, dtype=window.dtype)
            out.scatter_add_(dim=-1, index=phy.masked_fill(phy < 0, E).unsqueeze(0).expand_as(window).long(), src=window)
            g = out[..., :-1].sum(dim=0)
            dist.all_reduce(g, op=dist.ReduceOp.SUM)
            return g.numpy().astype(np.int64)

        params = {i: [p for p in ps] for i, ps in enumerate(att._layers)}

    # Wait until every rank's sidecar runs (demos and tests only: an engine never waits).
    deadline = time.monotonic() + args.wait_sidecar
    region = att.region
    def ready() -> bool:  # the worker beats its heartbeat once its set-up is done; the fake one never does
        return region.sidecar_pid != 0 and (args.sidecar == "fake" or region.sidecar_heartbeat_ns != 0)

    while not ready() and time.monotonic() < deadline:
        time.sleep(0.01)
    ok = torch.tensor([1 if region.sidecar_pid else 0])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if not int(ok[0]):
        raise RuntimeError(f"no sidecar attached within {args.wait_sidecar} s")

    def read(step: int) -> np.ndarray:
        got = region.read_step(step)
        if got is None:
            raise RuntimeError(f"ring entry of step {step} lost (detached {att.detached}, "
                               f"engine_step {region.engine_step if not att.detached else '-'})")
        return got[2]

    last_applied: List[int] = []
    rng = np.random.default_rng(12345 + rank)
    steps = args.steps
    ring = np.zeros((steps, L, P), np.int64)
    maps = np.zeros((steps, L, P), np.int64)
    own_load = np.zeros((steps, L, E), np.int64)
    applied_total: List[List[int]] = []
    # SGLang: the boundary before each pass (around ModelRunner.forward); vLLM: inside the step
    # after each pass (EplbState.step), so the first boundary comes after a dummy pass.
    if engine == "vllm":
        state.step(is_dummy=True)
    for step in range(steps):
        applied = att.begin_step() if engine == "sglang" else last_applied
        if applied:
            applied_total.append([step] + applied)
        if engine == "sglang" and step > 0:
            ring[step - 1] = read(step - 1)
        maps[step] = engine_map()
        counts = route(routing(rng))
        own_load[step] = own_logical(counts)
        last_applied = feed(counts) or []
        if engine == "vllm":
            ring[step] = read(step)
        time.sleep(args.step_sleep)
    if engine == "sglang":
        att.begin_step()  # records the last step
        ring[steps - 1] = read(steps - 1)
    final = np.array(region.placement().phy2log, dtype=np.int64)
    if not np.array_equal(final, engine_map()):
        raise AssertionError("the engine's physical_to_logical_map differs from the region's phy2log")
    att.detach()

    # The contract's all-reduce: sum of every rank's physical counts, logical through phy2log.
    total = torch.from_numpy(ring.copy())
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    contract = np.zeros((steps, L, E), np.int64)
    for step in range(steps):
        for layer in range(L):
            np.add.at(contract[step, layer], maps[step, layer], total.numpy()[step, layer])
    loads_identical = bool(np.array_equal(contract, own_load)) and int(own_load.sum()) == steps * L * TOKENS * TOPK * W

    # The engine's own mover, initial -> final, on the copy.
    moved = [layer for layer in range(L) if not np.array_equal(final[layer], p2l0[layer])]
    mover_notes = engine_mover(torch, dist, engine, quant, rank, own, p2l0, final, moved, notes)

    bytes_ok, globals_ok, expect_ok = True, True, True
    diffs: List[str] = []
    for layer in range(L):
        for p in params[layer]:
            live = p.tensor.detach()
            if p.kind == "expert":
                a, b = _raw(torch, live[:S].reshape(S, -1)), _raw(torch, own[layer][p.name][:S].reshape(S, -1))
                if not torch.equal(a, b):
                    bytes_ok = False
                    diffs.append(f"layer {layer} {p.name}: adapter != engine mover")
                exp = expected_rows(torch, engine, quant, layer, p.name, final[layer, rank * S:(rank + 1) * S])
                if not torch.equal(a.reshape(S, -1), exp):
                    expect_ok = False
                    diffs.append(f"layer {layer} {p.name}: adapter != the experts phy2log names")
                if live.shape[0] > S and not torch.equal(_raw(torch, live[S:]), _raw(torch, snap[layer][p.name][S:])):
                    globals_ok = False
                    diffs.append(f"layer {layer} {p.name}: shared rows changed")
            else:
                if not torch.equal(_raw(torch, live), _raw(torch, snap[layer][p.name])):
                    globals_ok = False
                    diffs.append(f"layer {layer} {p.name}: global changed")

    if engine == "sglang":
        full = torch.from_numpy(np.vstack([np.arange(P) % E, final]))
        ref = el.ExpertLocationMetadata.init_by_mapping(model_config, full, moe_ep_rank=rank)
        fields = ["physical_to_logical_map", "physical_to_logical_map_cpu", "logical_to_all_physical_map",
                  "logical_to_all_physical_map_cpu", "logical_to_all_physical_map_num_valid",
                  "logical_to_rank_dispatch_physical_map"]
        bad = [f for f in fields if not torch.equal(getattr(metadata, f), getattr(ref, f))]
    else:
        from vllm.distributed.eplb.eplb_state import _commit_eplb_maps

        ref = vllm_maps(torch, p2l0)
        _commit_eplb_maps(ref, torch.from_numpy(final))
        fields = ["physical_to_logical_map", "logical_to_physical_map", "logical_replica_count"]
        bad = [f for f in fields if not torch.equal(getattr(ms, f), getattr(ref, f))]
    if bad:
        diffs.append(f"maps differ: {bad}")

    replicas0 = np.array([np.bincount(p2l0[layer], minlength=E) for layer in range(L)])
    replicas1 = np.array([np.bincount(final[layer], minlength=E) for layer in range(L)])
    cross = sum(int(np.sum(final[layer] != p2l0[layer])) for layer in range(L))
    return {
        "engine_version": version,
        "layers_moved": len(moved),
        "bytes_identical": bytes_ok and expect_ok and len(moved) > 0,
        "maps_identical": not bad,
        "globals_untouched": globals_ok,
        "loads_identical": loads_identical,
        "slots_changed": cross,
        "replica_counts_changed": int(np.sum(replicas0 != replicas1)),
        "applies": applied_total,
        "tensors": [p.name + ("" if p.kind == "expert" else " (global)") for p in params[0]],
        "notes": notes + mover_notes,
        "diffs": diffs[:20],
        "final_phy2log": final.tolist() if rank == 0 else None,
    }


def engine_mover(torch: Any, dist: Any, engine: str, quant: str, rank: int, own: List[Dict[str, Any]], p2l0: np.ndarray,
                 final: np.ndarray, moved: List[int], notes: List[str]) -> List[str]:
    """The engine's own mover on the copy ``own``: initial -> final for the layers that changed."""
    out: List[str] = []
    gloo_ok = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int32,
               torch.int64)

    def movable(t: Any) -> Any:
        if t.dtype in gloo_ok:
            return t
        msg = f"{t.dtype} moved as its uint8 view by the engine's mover here (Gloo has no {t.dtype}; NCCL on GPUs has)"
        if msg not in out:
            out.append(msg)
        return t.view(torch.uint8)

    if engine == "sglang":
        from sglang.srt.eplb.expert_location_updater import update_expert_weights_single_layer

        specs = [n for n, _, _, k in tensor_specs(engine, quant) if k == "expert"]
        for layer in moved:
            ws = [movable(own[layer][n][:S]) for n in specs]  # get_moe_weights' routed rows
            update_expert_weights_single_layer(
                routed_experts_weights=ws, temp_buffers=[torch.empty_like(w) for w in ws],
                old_physical_to_logical_map=p2l0[layer].tolist(), new_physical_to_logical_map=final[layer].tolist(),
                num_local_physical_experts=S, num_gpu_per_node=W, rank=rank, world_size=W)
    else:
        from vllm.distributed.eplb.rebalance_execute import rearrange_expert_weights_inplace
        from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

        nn = torch.nn
        weights = []
        for d in own:
            m = nn.Module()
            m.local_num_experts = S
            for n, t in d.items():
                m.register_parameter(n, nn.Parameter(t, requires_grad=False))
            weights.append([movable(w) for w in RoutedExperts.get_expert_weights(m)])
        rearrange_expert_weights_inplace(torch.from_numpy(p2l0), torch.from_numpy(final), weights,
                                         [torch.empty_like(w) for w in weights[0]], dist.group.WORLD,
                                         gloo_communicator(torch))
    return out


# ---- the parent ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summarize(engine: str, quant: str, work: str, err: Any) -> Dict[str, Any]:
    parts = []
    for r in range(W):
        path = os.path.join(work, f"rank{r}.json")
        parts.append(json.load(open(path)) if os.path.exists(path) else {"rank": r, "error": "no result (a rank died)"})
    keys = ["bytes_identical", "maps_identical", "globals_untouched", "loads_identical"]
    errors = [f"rank {p['rank']}: {p['error']}" for p in parts if "error" in p]
    cmd = open(os.path.join(work, "sidecar.cmd")).read().strip() if os.path.exists(os.path.join(work, "sidecar.cmd")) else ""
    rep: Dict[str, Any] = {"engine": engine, "quant": quant, "sidecar": cmd, "sidecar_rc": parts[0].get("sidecar_rc"),
                           "seconds": parts[0].get("seconds")}
    if errors:
        rep.update({k: False for k in keys})
        rep["error"] = "; ".join(errors)
        rep["traceback"] = next((p["traceback"] for p in parts if "traceback" in p), None)
    else:
        rep["engine_version"] = parts[0]["engine_version"]
        rep["layers_moved"] = parts[0]["layers_moved"]
        for k in keys:
            rep[k] = all(bool(p[k]) for p in parts)
        for k in ("slots_changed", "replica_counts_changed", "applies", "tensors", "notes"):
            rep[k] = parts[0][k]
        rep["diffs"] = [d for p in parts for d in p["diffs"]][:20]
        if rep["sidecar_rc"] != 0:
            rep["error"] = f"the sidecar exited {rep['sidecar_rc']} (see {work}/sidecar.log)"
    wj = os.path.join(work, "worker.json")
    if os.path.exists(wj):
        try:
            w = json.load(open(wj))
            rep["worker"] = {k: w.get(k) for k in ("status", "steps", "layers_updated", "experts_moved", "bytes_moved",
                                                   "wrong_bytes", "lost_steps", "cancelled_applies", "error")}
        except ValueError:
            pass
    rep["ok"] = all(rep.get(k) is True for k in keys) and "error" not in rep and (rep.get("layers_moved") or 0) > 0
    return rep


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", choices=["sglang", "vllm"], required=True)
    ap.add_argument("--quants", default="bf16,fp8,nvfp4")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--sidecar", choices=["worker", "fake"], default="worker")
    ap.add_argument("--worker", default=os.path.join(ROOT, "target", "release", "eplb-worker"))
    ap.add_argument("--interval", type=int, default=25, help="sidecar: steps between rebalance rounds")
    ap.add_argument("--step-sleep", type=float, default=0.004)
    ap.add_argument("--wait-sidecar", type=float, default=300.0)
    ap.add_argument("--out", required=True, help="JSON: {quant: report}")
    ap.add_argument("--work", default=os.path.join(ROOT, "target", "adapters"))
    args = ap.parse_args()
    args.quants = [q for q in args.quants.split(",") if q]
    for q in args.quants:
        if q not in ("bf16", "fp8", "nvfp4"):
            ap.error(f"unknown quant {q}")
    import torch.multiprocessing as mp

    err = None
    try:
        mp.start_processes(rank_main, args=(args, free_port(), args.work), nprocs=W, join=True, start_method="spawn")
    except Exception as e:  # noqa: BLE001 - the ranks' files say more
        err = f"{type(e).__name__}: {e}"
    out = {q: summarize(args.engine, q, os.path.join(args.work, f"{args.engine}-{q}"), err) for q in args.quants}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    for q, rep in out.items():
        print(json.dumps({k: rep.get(k) for k in ("engine", "quant", "engine_version", "layers_moved", "bytes_identical",
                                                  "maps_identical", "globals_untouched", "loads_identical", "error")}))
    return 0 if all(r["ok"] for r in out.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
