"""eplb for vLLM 0.33.0: a ``worker_extension_cls``.

Launch vLLM with ``--enable-eplb`` (so that it builds its ``EplbState``: the maps and the router's
``expert_load_pass`` counter), its redundant slots (``--eplb-config '{"num_redundant_experts": N}'``)
and ``--worker-extension-cls eplb_client.adapters.vllm.EplbWorkerExtension``; then, once the
engine runs, ``llm.collective_rpc("eplb_attach", args=("<job>",))`` (docs/adapters.md). The
extension:

* builds this EP rank's region from ``model.expert_weights`` (the ``[E, -1]`` views vLLM's own
  mover moves, taken after ``process_weights_after_loading``), naming each after its parameter;
  the parameters vLLM never moves (``w13_input_scale``, ``w2_input_scale``,
  ``e_score_correction_bias``, ``hash_indices_table``) are listed as ``global``. The initial map is
  ``EplbModelState.physical_to_logical_map``;
* replaces ``EplbState.step`` (vLLM calls it after every forward pass, dummy passes included, on
  every rank): it snapshots ``expert_load_pass`` (this rank's view of every physical slot;
  nothing for a dummy pass, as vLLM) before zeroing it as vLLM does, then runs the boundary for
  the next pass; vLLM's own rearrangement never runs, and its record flag stays on;
* commits with vLLM's own per-layer map update, ``_commit_eplb_maps_for_layer``
  (``physical_to_logical_map``, ``logical_to_physical_map``, ``logical_replica_count``), after the
  layer's bytes landed.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

import numpy as np

from .core import AdapterError, Attachment, ExpertParam, attach_collectively, gloo_agree

log = logging.getLogger("eplb_client.adapters.vllm")

VLLM_VERSION = "0.33.0"
# What vLLM's RoutedExperts.get_expert_weights never moves (vllm/model_executor/layers/fused_moe/
# routed_experts.py, NON_EXPERT_WEIGHTS).
NON_EXPERT_WEIGHTS = ("e_score_correction_bias", "w13_input_scale", "w2_input_scale", "hash_indices_table")


def moe_layer_params(moe: Any, expert_weights: List[Any]) -> List[ExpertParam]:
    """The layer's tensors: each of vLLM's ``expert_weights`` views, named after the parameter
    whose memory it is; the parameters vLLM never moves as globals. Refuses (naming the parameter)
    a view that is no parameter's memory, a missing or extra parameter."""
    named = [(n, p) for n, p in moe.named_parameters()]
    movable = [(n, p) for n, p in named if n not in NON_EXPERT_WEIGHTS and p.dim() > 0]
    if len(movable) != len(expert_weights):
        raise AdapterError(f"{len(expert_weights)} tensors in expert_weights, {len(movable)} movable parameters "
                           f"({[n for n, _ in movable]})")
    out: List[ExpertParam] = []
    for (name, p), view in zip(movable, expert_weights):
        if view.data_ptr() != p.data_ptr() or view.numel() != p.numel():
            raise AdapterError(f"parameter {name!r}: expert_weights holds {tuple(view.shape)} at another address "
                               "(replaced after the list was taken?)")
        owner_path, _, attr = name.rpartition(".")
        owner = moe.get_submodule(owner_path) if owner_path else moe
        out.append(ExpertParam(name.replace(".", "_"), p, "expert", owner=owner, attr=attr, export=view))
    for name, p in named:
        if name in NON_EXPERT_WEIGHTS or p.dim() == 0:
            owner_path, _, attr = name.rpartition(".")
            owner = moe.get_submodule(owner_path) if owner_path else moe
            out.append(ExpertParam(name.replace(".", "_"), p, "global", owner=owner, attr=attr))
    return out


class VllmAttachment:
    """One vLLM EP rank attached (see the module docstring)."""

    def __init__(self, name: str, model: Any, model_state: Any, ep_rank: int, ep_size: int, cpu_group: Any,
                 ring_len: int = 64) -> None:
        from vllm.distributed.eplb.eplb_state import _commit_eplb_maps_for_layer

        self._commit_layer = _commit_eplb_maps_for_layer
        self.last_applied: List[int] = []
        self.model_state = model_state
        moe_layers = list(getattr(model, "moe_layers", []))
        weights = list(model.expert_weights)
        if not weights or len(moe_layers) != len(weights):
            raise AdapterError(f"model.expert_weights has {len(weights)} layers, model.moe_layers {len(moe_layers)}")
        layers = []
        for i, (moe, ws) in enumerate(zip(moe_layers, weights)):
            try:
                layers.append(moe_layer_params(moe, list(ws)))
            except AdapterError as e:
                raise AdapterError(f"MoE layer {i}: {e}") from None
        p2l = model_state.physical_to_logical_map.cpu()
        num_physical = p2l.shape[1]
        if num_physical % ep_size:
            raise AdapterError(f"{num_physical} physical experts do not divide over {ep_size} EP ranks")
        slots = num_physical // ep_size
        num_logical = model_state.logical_to_physical_map.shape[1]
        self.attachment = Attachment(name, ep_rank, ep_size, num_logical, slots, layers, p2l, commit=self._commit,
                                     agree=gloo_agree(cpu_group) if ep_size > 1 else None, ring_len=ring_len)

    def _commit(self, layers: List[int], phy2log: np.ndarray) -> None:
        import torch

        dtype = self.model_state.physical_to_logical_map.dtype
        for layer in layers:
            self._commit_layer(self.model_state, torch.from_numpy(np.array(phy2log[layer])).to(dtype), layer)

    def step(self, is_dummy: bool = False) -> List[int]:
        """What replaces ``EplbState.step`` (not for the profile run): the pass's counts, then the
        boundary before the next pass (ring step k holds the pass after boundary k; the pass
        before the first boundary is not recorded). Returns the layers switched."""
        att = self.attachment
        load = self.model_state.expert_load_pass
        att.end_step(None if is_dummy else load)
        load.zero_()
        self.last_applied = att.begin_step()
        return self.last_applied


def install_step(eplb_state: Any, va: VllmAttachment) -> None:
    """Replaces ``eplb_state.step`` with the attachment's (the profile run still gets vLLM's), and
    keeps vLLM's record flag on."""
    original = eplb_state.step

    def step(is_dummy: bool = False, is_profile: bool = False, log_stats: bool = False) -> None:
        if is_profile:
            return original(is_dummy, is_profile, log_stats)
        if va.attachment.detached:  # the last committed placement stays; vLLM's rearrangement stays off
            va.model_state.expert_load_pass.zero_()
            return None
        va.step(is_dummy)
        return None

    eplb_state.step = step
    if getattr(eplb_state, "should_record_tensor", None) is not None:
        eplb_state.should_record_tensor.fill_(True)


class EplbWorkerExtension:
    """Mixed into every vLLM worker (``--worker-extension-cls``); call through ``collective_rpc``."""

    def eplb_attach(self, name: str = "vllm", ring_len: Any = 64) -> Optional[str]:
        """Attaches this worker (every worker must be called: the attach is collective). Returns
        None, or why eplb is off (the engine serves on without it). Arguments may be strings (the
        dev server's ``/collective_rpc`` passes only strings)."""
        ring_len = int(ring_len)
        import torch.distributed as dist
        from vllm.distributed.parallel_state import get_ep_group

        runner = self.model_runner  # type: ignore[attr-defined]
        state = getattr(runner, "eplb_state", None)
        group = get_ep_group().cpu_group
        holder: Dict[str, Any] = {}

        def make() -> Attachment:
            if state is None or not state.model_states:
                raise AdapterError("vLLM has no EplbState: launch with --enable-eplb")
            model_state = next(iter(state.model_states.values()))
            va = VllmAttachment(name, model_state.model, model_state, dist.get_rank(group), dist.get_world_size(group),
                                group, ring_len=ring_len)
            holder["va"] = va
            return va.attachment

        att = attach_collectively(make, group, "vLLM")
        if att is None:
            return "not attached (see the log)"
        install_step(state, holder["va"])
        self._eplb = holder["va"]
        return None

    def eplb_detach(self) -> None:
        va = getattr(self, "_eplb", None)
        if va is not None:
            va.attachment.detach()
