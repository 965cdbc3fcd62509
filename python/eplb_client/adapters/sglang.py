"""eplb for SGLang 0.5.23: a general plugin (entry point ``sglang.srt.plugins``, name ``eplb``).

Enable it with ``SGLANG_PLUGINS=eplb`` and ``EPLB_NAME=<job>`` and launch SGLang with the expert
distribution recorder on (``--expert-distribution-recorder-mode stat``) and its redundant slots
(``--ep-num-redundant-experts N``); docs/adapters.md has the launch lines. Through SGLang's
``HookRegistry`` the plugin:

* after ``ModelRunner.initialize`` (the model is loaded and quantised): builds this EP rank's
  region from every MoE layer's ``mlp.experts`` parameters, selected exactly as SGLang's own
  ``get_moe_weights`` does (and checked against it): the routed rows of every parameter whose dim
  0 is the local expert count and that is not flagged ``_sglang_require_global_experts``; the
  fused shared-expert rows after them are never listed; every other parameter (the NVFP4 input
  scales) is listed as ``global``. The initial map is ``ExpertLocationMetadata``'s
  ``physical_to_logical_map`` of the MoE layers. SGLang's own ``EPLBManager`` is switched off;
* around ``ModelRunner.forward``: the boundary before the pass (records the previous pass, applies
  a posted command in place, commits the maps);
* around the recorder's ``_on_forward_pass_end``: snapshots the pass's ``global_physical_count``
  ``[num_layers, num_physical]`` (this rank's tokens, every physical slot) before it is reset:
  an asynchronous copy, no host sync per pass (SGLang #32105).

The commit is SGLang's own: ``ExpertLocationMetadata.init_by_mapping(model_config, new map)`` then
``metadata.update(new, update_layer_ids=<every layer>)``. Every layer, not only the switched one:
the static dispatch map (``logical_to_rank_dispatch_physical_map``) draws replicas from one
``random.Random(42)`` across layers, so a row computed from another full map would differ from
SGLang's own ``init_by_mapping`` of the final map; rewriting the rows of unchanged layers is safe
(every replica holds its expert's bytes, every rank computes the same rows).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .core import AdapterError, Attachment, ExpertParam, attach_collectively, gloo_agree

log = logging.getLogger("eplb_client.adapters.sglang")

SGLANG_VERSION = "0.5.23"
_RUNNER = "sglang.srt.model_executor.model_runner.ModelRunner"
_RECORDER = "sglang.srt.eplb.expert_distribution._ExpertDistributionRecorderReal"

# The attachment of this process (one model runner per process; draft workers never attach).
_STATE: Dict[str, Any] = {"attachment": None, "runner": None}


def register() -> None:
    """The plugin's entry point: registers the hooks (SGLang applies them before it starts)."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(f"{_RUNNER}.initialize", _after_initialize, HookType.AFTER)
    HookRegistry.register(f"{_RUNNER}.forward", _around_forward, HookType.AROUND)
    HookRegistry.register(f"{_RECORDER}._on_forward_pass_end", _around_pass_end, HookType.AROUND)


# ---- what the adapter takes from SGLang's objects (also used by the CPU tests) ---------------


def moe_layer_params(mlp: Any) -> Tuple[List[ExpertParam], int]:
    """The layer's tensors as SGLang holds them: ``(params, routed slots of this rank)``.

    Per-expert: every ``mlp.experts`` parameter SGLang's ``get_moe_weights`` moves (same filter);
    global: every other parameter except ``correction_bias`` (the router's). Refuses
    (:class:`AdapterError` naming the parameter) when the selection does not give exactly the
    tensors of ``mlp.get_moe_weights()``."""
    from sglang.srt.layers.moe.utils import filter_moe_weight_param_global_expert

    experts = getattr(mlp, "experts", None)
    if experts is None or not hasattr(experts, "num_local_experts"):
        raise AdapterError(f"{type(mlp).__name__}: no experts module with num_local_experts")
    n_local = int(experts.num_local_experts)
    routed = n_local - int(getattr(mlp, "num_fused_shared_experts", 0) or 0)
    params: List[ExpertParam] = []
    for name, x in experts.named_parameters():
        if name in ("correction_bias",):
            continue
        owner_path, _, attr = name.rpartition(".")
        owner = experts.get_submodule(owner_path) if owner_path else experts
        kind = "expert" if filter_moe_weight_param_global_expert(name, x, n_local) else "global"
        params.append(ExpertParam(attr if not owner_path else name.replace(".", "_"), x, kind, owner=owner, attr=attr))
    own = list(mlp.get_moe_weights())
    mine = [p for p in params if p.kind == "expert"]
    if len(own) != len(mine):
        raise AdapterError(f"get_moe_weights gives {len(own)} tensors, the parameters {len(mine)} "
                           f"({[p.name for p in mine]})")
    for p, t in zip(mine, own):
        if t.data_ptr() != p.tensor.data_ptr() or tuple(t.shape) != (routed,) + tuple(p.tensor.shape[1:]):
            raise AdapterError(f"parameter {p.name!r}: get_moe_weights holds shape {tuple(t.shape)} at another "
                               f"address than the parameter's routed rows {(routed,) + tuple(p.tensor.shape[1:])}")
    return params, routed


def moe_layers(model: Any) -> Dict[int, Any]:
    """``{model layer id: mlp}`` of the MoE layers SGLang's EPLB moves
    (``routed_experts_weights_of_layer``'s keys)."""
    ids = sorted(model.routed_experts_weights_of_layer.keys())
    if not ids:
        raise AdapterError("the model has no MoE layer in routed_experts_weights_of_layer")
    return {i: model.model.layers[i].mlp for i in ids}


class SglangAttachment:
    """One SGLang EP rank attached: the region, the commit through ``ExpertLocationMetadata``."""

    def __init__(self, name: str, model: Any, model_config: Any, metadata: Any, ep_rank: int, ep_size: int,
                 cpu_group: Any, ring_len: int = 64) -> None:
        from sglang.srt.eplb.expert_location import ExpertLocationMetadata

        self.metadata = metadata
        self.model_config = model_config
        self.ep_rank = ep_rank
        self._init_by_mapping = ExpertLocationMetadata.init_by_mapping
        mlps = moe_layers(model)
        self.layer_ids = list(mlps)
        layers, routed = [], None
        for i, mlp in mlps.items():
            try:
                ps, r = moe_layer_params(mlp)
            except AdapterError as e:
                raise AdapterError(f"model layer {i}: {e}") from None
            if routed is not None and r != routed:
                raise AdapterError(f"model layer {i}: {r} routed slots, layer {self.layer_ids[0]} {routed}")
            routed = r
            layers.append(ps)
        if routed != metadata.num_local_physical_experts or metadata.ep_size != ep_size:
            raise AdapterError(f"{routed} routed slots a rank and ep_size {ep_size}, but ExpertLocationMetadata has "
                               f"{metadata.num_local_physical_experts} and ep_size {metadata.ep_size}")
        assert routed is not None  # moe_layers found at least one layer
        p2l = metadata.physical_to_logical_map_cpu[self.layer_ids]
        self.attachment = Attachment(name, ep_rank, ep_size, metadata.num_logical_experts, routed, layers, p2l,
                                     commit=self._commit, agree=gloo_agree(cpu_group) if ep_size > 1 else None,
                                     ring_len=ring_len)

    def _commit(self, layers: List[int], phy2log: np.ndarray) -> None:
        """SGLang's own map update, after the layer's bytes landed (see the module docstring)."""
        import torch

        full = self.metadata.physical_to_logical_map_cpu.clone()
        full[self.layer_ids] = torch.from_numpy(np.array(phy2log)).to(full.dtype)
        new = self._init_by_mapping(self.model_config, full, moe_ep_rank=self.ep_rank)
        self.metadata.update(new, update_layer_ids=list(range(self.metadata.num_layers)))

    def counts_of(self, global_physical_count: Any) -> Any:
        """The recorder's ``[model layers, num_physical]`` counts -> the region's MoE layers."""
        return global_physical_count[self.layer_ids]


# ---- the hooks -------------------------------------------------------------------------------


def _after_initialize(result: Any, runner: Any, *args: Any, **kwargs: Any) -> None:
    if getattr(runner, "is_draft_worker", False) or _STATE["attachment"] is not None:
        return None
    try:
        _attach(runner)
    except Exception:  # noqa: BLE001 - the engine serves on without eplb
        log.exception("eplb: attaching to SGLang failed; serving without eplb")
    return None


def _attach(runner: Any) -> None:
    import torch.distributed as dist
    from sglang.srt.eplb.expert_distribution import get_global_expert_distribution_recorder
    from sglang.srt.eplb.expert_location import get_global_expert_location_metadata

    name = os.environ.get("EPLB_NAME", "sglang")
    metadata = get_global_expert_location_metadata()
    group = _cpu_group()
    ep_rank = dist.get_rank(group=group) if group is not None else 0
    ep_size = dist.get_world_size(group=group) if group is not None else 1

    def make() -> Attachment:
        if metadata is None:
            raise AdapterError("SGLang has no ExpertLocationMetadata (a model without EPLB support)")
        recorder = get_global_expert_distribution_recorder()
        if type(recorder).__name__ != "_ExpertDistributionRecorderReal":
            raise AdapterError("the expert distribution recorder is off: launch with "
                               "--expert-distribution-recorder-mode stat")
        s = SglangAttachment(name, runner.model, runner.model_config, metadata, ep_rank, ep_size, group,
                             ring_len=int(os.environ.get("EPLB_RING_LEN", "64")))
        _STATE["sglang"] = s
        return s.attachment

    att = attach_collectively(make, group, "SGLang")
    if att is None:
        return
    recorder = get_global_expert_distribution_recorder()
    if not recorder.recording:
        recorder.start_record()
    if getattr(runner, "eplb_manager", None) is not None:
        log.info("eplb: SGLang's own EPLB rebalancing is off while eplb is attached")
        runner.eplb_manager = None
    _STATE["attachment"], _STATE["runner"] = att, runner
    log.info("eplb: attached rank %d of %d to /dev/shm/eplb-%s-%d (%d MoE layers)", ep_rank, ep_size, name, ep_rank,
             att.num_layers)


def _cpu_group() -> Any:
    """The MoE EP group's Gloo group (the boundary's agreement needs no GPU sync)."""
    try:
        from sglang.srt.distributed import parallel_state as ps

        for getter in ("get_moe_ep_group", "get_tp_group"):
            g = getattr(ps, getter, None)
            if g is not None:
                try:
                    return g().cpu_group
                except (AssertionError, AttributeError):
                    continue
    except ImportError:
        pass
    return None


def _around_forward(original: Any, runner: Any, *args: Any, **kwargs: Any) -> Any:
    att: Optional[Attachment] = _STATE["attachment"]
    if att is None or runner is not _STATE["runner"]:
        return original(runner, *args, **kwargs)
    att.begin_step()
    try:
        return original(runner, *args, **kwargs)
    finally:
        if not att._have_counts:  # the recorder skipped the pass: no load
            att.end_step(None)


def _around_pass_end(original: Any, recorder: Any, forward_pass_id: int, outputs: Any) -> Any:
    att: Optional[Attachment] = _STATE["attachment"]
    s = _STATE.get("sglang")
    if att is not None and s is not None and recorder._recording and recorder._record_current_pass:
        gatherer = next(iter(recorder._single_pass_gatherers.values()))
        att.end_step(s.counts_of(gatherer.collect()["global_physical_count"]))
    return original(recorder, forward_pass_id, outputs)
