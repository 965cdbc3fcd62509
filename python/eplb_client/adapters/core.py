"""What both engine adapters share: one :class:`Attachment` per engine rank.

An attachment owns the rank's contract-2 region (``counts="physical"``) made from the engine's own
expert tensors, and is driven by the engine at two points of every forward pass:

* :meth:`Attachment.begin_step` before the forward pass (the step boundary): records the previous
  step's counts into the load ring, then ``at_step_boundary`` (the engine ranks agree through the
  engine's CPU process group), applies a posted command in place and, only after the bytes have
  landed, calls the engine's ``commit(layers, phy2log)``, which updates the engine's own maps;
* :meth:`Attachment.end_step` after the forward pass: snapshots the engine's own per-pass physical
  counts ``[num_layers, num_physical]`` (vLLM's ``expert_load_pass``, SGLang's per-pass
  ``global_physical_count``) before the engine zeroes them. On a GPU the snapshot is an
  asynchronous device-to-host copy into pinned memory with an event; the next ``begin_step`` waits
  on that event, which the engine's own end-of-step synchronisation (it reads the sampled tokens)
  has already passed, so no host sync is added per pass (SGLang #32105).

Invariants (the reasons are the engines' shipped bugs, ../shared/ENGINES.md):

* Only routed rows ``[0, slots_per_rank)`` of a per-expert tensor are described as moving; rows
  after them (SGLang's fused shared expert) are in the region (host) or in the engine's memory
  (GPU) but never listed, so nothing writes them. Tensors that must not move (input scales) are
  listed as ``global``, so that the sidecar can prove them untouched.
* The engine's maps are committed after the layer's bytes are in place, from the one ``phy2log``.
* A parameter replaced after export (``process_weights_after_loading`` again, a reload) is seen at
  the next boundary with a pending command, before anything is applied: the attachment detaches
  (``engine_state`` failed, so the sidecar exits) and the engine keeps serving with the placement
  it last committed.
* An engine whose parameters do not match what the adapter expects gets :class:`AdapterError`
  naming the layer and parameter; the adapters catch it, log it and leave the engine untouched.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

log = logging.getLogger("eplb_client.adapters")

# torch dtype name -> the contract's dtype name (informational; bytes move as they are).
TORCH_DTYPES: Dict[str, str] = {
    "float64": "f64",
    "float32": "f32",
    "float16": "f16",
    "bfloat16": "bf16",
    "int64": "i64",
    "int32": "i32",
    "int16": "i16",
    "int8": "i8",
    "uint8": "u8",
    "float8_e4m3fn": "f8e4m3",
    "float8_e5m2": "f8e5m2",
    "float8_e8m0fnu": "e8m0",
    "float4_e2m1fn_x2": "fp4x2",
}
MAX_NAME_BYTES = 23


class AdapterError(RuntimeError):
    """The engine's parameters are not what the adapter expects; the message names the layer and
    the parameter. The engine keeps serving without eplb."""


@dataclass
class ExpertParam:
    """One tensor of one MoE layer as the engine holds it.

    ``tensor``: the engine's parameter (dim 0 = the rank's physical slots; a per-expert tensor
    may have more rows than ``slots_per_rank``: SGLang's fused shared-expert rows, never moved).
    ``kind``: ``"expert"`` (row ``s`` moves with slot ``s``) or ``"global"`` (never moved).
    ``owner``/``attr``: where the engine keeps it (``getattr(owner, attr)``), so that a parameter
    the engine replaces after export is detected; None when the caller has no module.
    """

    name: str
    tensor: Any
    kind: str = "expert"
    owner: Any = None
    attr: Optional[str] = None
    export: Any = None
    """The tensor handed over when it is not ``tensor`` itself: vLLM moves ``[E, -1]`` views of
    its parameters (a transposed scale made contiguous), and the region must describe exactly
    those bytes; the parameter is rebound onto the region with its own shape and strides."""

    def current(self) -> Any:
        return getattr(self.owner, self.attr) if self.owner is not None and self.attr else self.tensor


def _dtype_name(t: Any) -> Optional[str]:
    return TORCH_DTYPES.get(str(t.dtype).replace("torch.", ""))


def check_layers(layers: Sequence[Sequence[ExpertParam]], slots_per_rank: int) -> None:
    """Raises :class:`AdapterError` naming the layer and parameter when ``layers`` cannot be
    exported as contract-2 tensor tables: names (1 to 23 bytes, unique), kinds, dtypes, a per-expert
    tensor with fewer than ``slots_per_rank`` rows or rows that are not contiguous in themselves,
    one device for all, and the same names, kinds, dtypes and row shapes in every layer."""
    if not layers:
        raise AdapterError("no MoE layers to export")
    ref: List[Tuple[str, str, Any, Tuple[int, ...]]] = []
    device = None
    for layer, params in enumerate(layers):
        seen = set()
        sig = []
        for p in params:
            where = f"layer {layer} parameter {p.name!r}"
            t = p.export if p.export is not None else p.tensor
            raw = p.name.encode()
            if not 0 < len(raw) <= MAX_NAME_BYTES:
                raise AdapterError(f"{where}: the name must be 1 to {MAX_NAME_BYTES} UTF-8 bytes")
            if p.name in seen:
                raise AdapterError(f"{where}: listed twice")
            seen.add(p.name)
            if p.kind not in ("expert", "global"):
                raise AdapterError(f"{where}: kind {p.kind!r} is not 'expert' or 'global'")
            if t is None or not hasattr(t, "dtype"):
                raise AdapterError(f"{where}: missing (not a tensor)")
            if _dtype_name(t) is None:
                raise AdapterError(f"{where}: dtype {t.dtype} has no contract dtype name")
            if device is None:
                device = t.device
            elif t.device != device:
                raise AdapterError(f"{where}: on {t.device}, the other tensors on {device}")
            if p.kind == "expert":
                if t.dim() < 1 or t.shape[0] < slots_per_rank:
                    raise AdapterError(f"{where}: shape {tuple(t.shape)}, want dim 0 >= slots_per_rank {slots_per_rank} "
                                       "(the routed slots of this rank)")
                if t.dim() > 1 and not t[0].is_contiguous():
                    raise AdapterError(f"{where}: a row is not contiguous (strides {t.stride()}); "
                                       "each expert's row must be one block of memory")
                if t.dim() > 1 and t.stride(0) < t[0].numel():
                    raise AdapterError(f"{where}: rows overlap (stride {t.stride(0)} < row {t[0].numel()} elements)")
            elif t.dim() > 1 and not t[0].is_contiguous():
                raise AdapterError(f"{where}: a row of the global tensor is not contiguous (strides {t.stride()})")
            sig.append((p.name, p.kind, t.dtype, tuple(t.shape[1:]) if p.kind == "expert" else tuple(t.shape)))
        if not any(p.kind == "expert" for p in params):
            raise AdapterError(f"layer {layer}: no per-expert tensor")
        if layer == 0:
            ref = sig
        elif sig != ref:
            diff = next((s for s, r in zip(sig, ref) if s != r), None) or (sig[len(ref):] or ref[len(sig):])[0]
            raise AdapterError(f"layer {layer} parameter {diff[0]!r}: differs from layer 0 "
                               f"(name, kind, dtype, row shape {diff[1:]} vs {[r for r in ref if r[0] == diff[0]]})")


def gloo_agree(group: Any) -> Callable[[int], Tuple[int, int]]:
    """The boundary's agreement ``have -> (min, max)`` over the engine ranks, through a CPU (Gloo)
    process group of the engine: one all-reduce of two int64 per step, no device sync."""
    import torch
    import torch.distributed as dist

    buf = torch.zeros(2, dtype=torch.int64)

    def agree(have: int) -> Tuple[int, int]:
        buf[0] = have
        buf[1] = -have
        dist.all_reduce(buf, op=dist.ReduceOp.MIN, group=group)
        return int(buf[0]), -int(buf[1])

    return agree


class Attachment:
    """One engine rank attached to eplb. See the module docstring.

    ``layers[layer]``: the layer's :class:`ExpertParam` s in the engine's order (the table order);
    ``phy2log``: the engine's initial ``[num_layers, world_size * slots_per_rank]`` map;
    ``commit(layers, phy2log)``: the engine's own map update for ``layers`` from the region's
    ``phy2log`` (read-only ``[num_layers, num_physical]``), called after the bytes landed;
    ``agree``: :func:`gloo_agree` of the engine's CPU group (None only with one rank).

    Host (CPU) tensors: the client copies them into the region and the attachment rebinds every
    parameter's ``.data`` to its view in the region (same shape and strides), so the sidecar's
    staging and the apply work on the tensors the engine computes with. CUDA tensors stay where
    they are (``weights_kind`` 1): the attachment allocates one layer of staging and applies with
    ``index_copy_`` on the engine's current stream.
    """

    def __init__(
        self,
        name: str,
        rank: int,
        world_size: int,
        num_logical: int,
        slots_per_rank: int,
        layers: Sequence[Sequence[ExpertParam]],
        phy2log: Any,
        commit: Callable[[List[int], np.ndarray], None],
        agree: Optional[Callable[[int], Tuple[int, int]]],
        ring_len: int = 64,
    ) -> None:
        import torch

        from eplb_client import EngineRegion, LayerTensor

        check_layers(layers, slots_per_rank)
        self.num_layers = len(layers)
        self.slots_per_rank = slots_per_rank
        self.num_physical = world_size * slots_per_rank
        self.rank = rank
        self._layers = [list(ps) for ps in layers]
        self._commit = commit
        self._agree = agree
        self.step = 0
        self.detached = False
        self.applied_layers = 0
        p2l = np.ascontiguousarray(np.asarray(phy2log.cpu() if hasattr(phy2log, "cpu") else phy2log, dtype=np.int32))
        if p2l.shape != (self.num_layers, self.num_physical):
            raise AdapterError(f"physical_to_logical_map has shape {p2l.shape}, want ({self.num_layers}, {self.num_physical})")
        device = self._layers[0][0].tensor.device
        self.host = device.type == "cpu"

        def lt(p: ExpertParam) -> Any:
            return LayerTensor(p.name, _export(p), kind=p.kind, rows=slots_per_rank if p.kind == "expert" else None)

        kwargs: Dict[str, Any] = {}
        if not self.host:
            self._staging = {p.name: torch.empty_like(p.tensor.detach()[:slots_per_rank])
                             for p in self._layers[0] if p.kind == "expert"}
            # The client's default apply (cuda_ipc.torch_apply): index_copy_ per tensor, then a
            # stream synchronize, so the sidecar may stage again once the command is answered.
            kwargs = dict(staging=[LayerTensor(n, t, kind="expert", rows=slots_per_rank) for n, t in self._staging.items()])
        self.region = EngineRegion.create(
            name, rank, world_size, self.num_layers, slots_per_rank, num_logical,
            layers=[[lt(p) for p in ps] for ps in self._layers], phy2log=p2l, ring_len=ring_len,
            counts="physical", **kwargs)
        if self.host:
            self._rebind_to_region()
        # What the engine must still hold at every apply (a replaced parameter detaches).
        self._ptrs = [[p.current().data_ptr() for p in ps] for ps in self._layers]
        self._counts = np.zeros((self.num_layers, self.num_physical), dtype=np.int64)
        self._pinned: Optional[Any] = None
        self._event: Optional[Any] = None
        self._have_counts = False
        self._tokens = 0
        self._phase = "decode"
        self.region.publish()
        self.region.start_heartbeat()

    # ---- region views ----------------------------------------------------------------------

    def _rebind_to_region(self) -> None:
        """Host tensors: every parameter's storage becomes its view in the region (a broadcast
        global: the view of its one stored row, broadcast again)."""
        import torch

        for layer, ps in enumerate(self._layers):
            for p in ps:
                src = _export(p)
                t = torch.from_numpy(self.region.tensor(layer, p.name))
                if t.dtype != src.dtype:
                    t = t.view(src.dtype)
                if tuple(t.shape) != tuple(src.shape) or (t.dim() and t.stride() != src.stride()):
                    raise AdapterError(f"layer {layer} parameter {p.name!r}: the region's view has shape {tuple(t.shape)} "
                                       f"strides {t.stride()}, the engine's {tuple(src.shape)} {src.stride()}")
                if not torch.equal(_raw(t), _raw(src)):
                    raise AdapterError(f"layer {layer} parameter {p.name!r}: the region's copy differs from the engine's")
                if t.dtype != p.tensor.dtype:
                    t = t.view(p.tensor.dtype)
                if tuple(t.shape) != tuple(p.tensor.shape) or t.stride() != p.tensor.stride():
                    if p.kind == "global" and p.tensor.dim() >= 1 and p.tensor.stride(0) == 0:
                        t = t.expand(p.tensor.shape)  # a broadcast global: its one stored row
                    else:  # the same bytes in the parameter's own layout (vLLM's [E, -1] views)
                        t = t.as_strided(tuple(p.tensor.shape), p.tensor.stride(), t.storage_offset())
                p.tensor.data = t

    # ---- the step ----------------------------------------------------------------------------

    def end_step(self, counts: Any, tokens: int = 0, phase: str = "decode") -> None:
        """After the forward pass: snapshot the engine's per-pass physical counts
        ``[num_layers, num_physical]`` (any integer dtype, CPU or CUDA) before the engine zeroes
        them; they are recorded at the next :meth:`begin_step`. None: no counts this pass (zeros)."""
        if self.detached:
            return
        self._tokens, self._phase = tokens, phase
        if counts is None:
            self._counts.fill(0)
            self._have_counts = True
            return
        if counts.device.type == "cpu":
            np.copyto(self._counts, counts.numpy(), casting="unsafe")
        else:
            import torch

            if self._pinned is None:
                self._pinned = torch.empty(tuple(counts.shape), dtype=counts.dtype, pin_memory=True)
                self._event = torch.cuda.Event()
            self._pinned.copy_(counts, non_blocking=True)
            assert self._event is not None  # set with _pinned
            self._event.record()
        self._have_counts = True

    def begin_step(self) -> List[int]:
        """The step boundary before the forward pass: records the previous pass, agrees, applies a
        posted command in place and commits the engine's maps. Returns the layers switched."""
        if self.detached:
            return []
        region = self.region
        if self.step > 0:
            if self._pinned is not None and self._event is not None and self._have_counts:
                self._event.synchronize()  # already passed: the engine synced on the step's tokens
                np.copyto(self._counts, self._pinned.numpy(), casting="unsafe")
            elif not self._have_counts:
                self._counts.fill(0)
            region.record(self.step - 1, self._counts, phase=self._phase, tokens=self._tokens)
            self._have_counts = False
        if _command_pending(region) and not self._params_unchanged():
            return []
        placement = region.at_step_boundary(self.step, self._agree)
        self.step += 1
        if placement.applied:
            self.applied_layers += len(placement.applied)
            self._commit(list(placement.applied), placement.phy2log)
        return list(placement.applied)

    def _unbind_from_region(self) -> None:
        """Host tensors: before the region is unmapped, every parameter still on it gets a private
        copy with its own shape and strides (the engine keeps computing with the same values)."""
        import torch

        for layer, ps in enumerate(self._layers):
            for i, p in enumerate(ps):
                t = p.tensor.data
                if t.data_ptr() != self._ptrs[layer][i]:
                    continue  # replaced by the engine: not ours
                if t.dim() >= 1 and t.stride(0) == 0:
                    one = t.as_strided((1,) + tuple(t.shape[1:]), (max(1, t[0].numel()),) + tuple(t.stride()[1:]))
                    p.tensor.data = one.clone().expand(t.shape)
                else:
                    p.tensor.data = torch.empty_strided(tuple(t.shape), t.stride(), dtype=t.dtype).copy_(t)

    def _params_unchanged(self) -> bool:
        for layer, ps in enumerate(self._layers):
            for i, p in enumerate(ps):
                # The engine's attribute now names another tensor, or the parameter's storage was
                # swapped (``param.data = ...``): the region no longer describes what it computes with.
                if p.current() is not p.tensor or p.tensor.data_ptr() != self._ptrs[layer][i]:
                    log.error("eplb: layer %d parameter %r was replaced after export: detaching (the engine keeps "
                              "its last committed placement)", layer, p.name)
                    self.detach(failed=True)
                    return False
        return True

    def detach(self, failed: bool = False) -> None:
        """Stops using eplb: records the last pass, then the region is finished (or failed) and
        removed; the engine keeps its weights and its last committed maps."""
        if self.detached:
            return
        self.detached = True
        if self.host:
            self._unbind_from_region()
        try:
            if failed:
                self.region.fail()
                return
            if self._have_counts and self.step > 0:
                if self._event is not None:
                    self._event.synchronize()
                    assert self._pinned is not None  # set with _event
                    np.copyto(self._counts, self._pinned.numpy(), casting="unsafe")
                self.region.record(self.step - 1, self._counts, phase=self._phase, tokens=self._tokens)
            self.region.finish()
        except Exception:  # noqa: BLE001 - detaching never takes the engine down
            log.exception("eplb: detaching")


def _export(p: ExpertParam) -> Any:
    """The tensor handed to the client: the parameter, or for a broadcast global (stride 0 in dim
    0, vLLM's expanded input scales) its one stored row."""
    t = (p.export if p.export is not None else p.tensor).detach()
    if p.kind == "global" and t.dim() >= 1 and t.stride(0) == 0:
        # One row of the same storage (same address), with a row stride the contract accepts.
        t = t.as_strided((1,) + tuple(t.shape[1:]), (max(1, t[0].numel()),) + tuple(t.stride()[1:]))
    return t


def _raw(t: Any) -> Any:
    """Bytes of ``t`` for bitwise comparison (uint8, last dim widened)."""
    import torch

    t = t.reshape(1) if t.dim() == 0 else t
    return t.contiguous().view(torch.uint8)


def _command_pending(region: Any) -> bool:
    """Whether the mailbox may hold a command not yet answered (cheap: two header words; a
    command being written counts as pending, so the parameters are checked)."""
    pending = getattr(region, "command_pending", None)
    if pending is not None:
        return bool(pending())
    h = region._h  # contract: cmd_seq at 256, cmd_id at 264, ack_id at 320
    return int(h[32]) % 2 == 1 or int(h[33]) != int(h[40])


def timed(fn: Callable[[], Any], repeat: int) -> List[float]:
    """Per-call wall times in µs (for the adapters' benchmarks)."""
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - t0) / 1e3)
    return out


def attach_collectively(make: Callable[[], "Attachment"], group: Any, engine: str) -> Optional["Attachment"]:
    """Every engine rank builds its attachment with ``make``; all of them attach only if all of
    them could (one all-reduce over the engine's CPU group), so that no rank waits at a boundary
    for ranks that refused. A refusal is logged with its reason (the parameter it names) and the
    engine serves on without eplb."""
    import torch
    import torch.distributed as dist

    from eplb_client import ContractError

    att: Optional[Attachment] = None
    err: Optional[str] = None
    try:
        att = make()
    except (AdapterError, ContractError) as e:
        err = str(e)
    flag = torch.tensor([0 if err else 1], dtype=torch.int64)
    if group is not None:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    if int(flag[0]) == 0:
        if att is not None:
            att.detach(failed=True)
        log.error("eplb: %s is served without eplb: %s", engine, err or "another engine rank refused to attach")
        return None
    return att
