"""Engine side of the eplb engine contract (docs/engine-contract.md): a shared-memory region per
engine rank with the load ring, the live placement, the command mailbox and the expert weights.

    from eplb_client import EngineRegion, TensorSpec
    region = EngineRegion.create("demo", rank, world_size, num_layers, slots_per_rank, num_logical,
                                 tensors=[TensorSpec("w13", "f32", (64, 128)), ...], phy2log=initial)
    region.weights(layer)["w13"][slot] = ...           # fill the local slots, then
    region.publish()                                    # rename into place: a sidecar may attach
    for step in range(steps):
        placement = region.at_step_boundary(step, agree=min_max_over_engine_ranks)
        counts = forward(placement)                     # [num_layers, slots_per_rank]
        region.record(step, counts, phase="decode")
    region.finish()                                     # engine_state = 2, unlink
"""

from .region import (
    ACK_APPLIED,
    ACK_CANCELLED,
    ACK_MISSED,
    ACK_REJECTED,
    ContractError,
    EngineRegion,
    IpcHandle,
    IpcWeights,
    Placement,
    TensorSpec,
    check_phy2log,
    cleanup,
    derive_log2phy,
    region_path,
)

__all__ = [
    "ACK_APPLIED",
    "ACK_CANCELLED",
    "ACK_MISSED",
    "ACK_REJECTED",
    "ContractError",
    "EngineRegion",
    "IpcHandle",
    "IpcWeights",
    "Placement",
    "TensorSpec",
    "check_phy2log",
    "cleanup",
    "derive_log2phy",
    "region_path",
]
