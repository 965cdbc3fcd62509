"""Engine side of the eplb engine contract, version 2 (docs/engine-contract.md): a shared-memory
region per engine rank with the load ring, the live placement, the command mailbox, the tensor
table and the expert tensors (host) or their CUDA IPC handles (GPU).

    from eplb_client import EngineRegion, LayerTensor
    layers = [[LayerTensor("w13_weight", w13[l]), LayerTensor("w2_weight", w2[l]),
               LayerTensor("w13_input_scale", s13[l], kind="global")] for l in range(num_layers)]
    region = EngineRegion.create("demo", rank, world_size, num_layers, slots_per_rank, num_logical,
                                 layers=layers, phy2log=initial, counts="local")
    w13 = region.tensor(0, "w13_weight")             # host: the region's copy, used from now on
    region.publish()                                  # rename into place: a sidecar may attach
    for step in range(steps):
        placement = region.at_step_boundary(step, agree=min_max_over_engine_ranks)
        counts = forward(placement)                   # [num_layers, slots_per_rank] integers
        region.record(step, counts, phase="decode")
    region.finish()                                   # engine_state = 2, unlink
"""

from .region import (
    ACK_APPLIED,
    ACK_CANCELLED,
    ACK_MISSED,
    ACK_REJECTED,
    MAX_COUNT,
    VERSION,
    ContractError,
    EngineRegion,
    LayerTensor,
    Placement,
    TableEntry,
    TensorSpec,
    check_name,
    check_phy2log,
    check_table,
    cleanup,
    derive_log2phy,
    region_path,
)

__all__ = [
    "ACK_APPLIED",
    "ACK_CANCELLED",
    "ACK_MISSED",
    "ACK_REJECTED",
    "MAX_COUNT",
    "VERSION",
    "ContractError",
    "EngineRegion",
    "LayerTensor",
    "Placement",
    "TableEntry",
    "TensorSpec",
    "check_name",
    "check_phy2log",
    "check_table",
    "cleanup",
    "derive_log2phy",
    "region_path",
]
