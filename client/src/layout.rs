//! The byte layout of contract 2's shared-memory region (docs/engine-contract.md): the ONE
//! definition that the sidecar's reader (`eplb::engine::shm::region`), this library's writer and
//! the generated C header (`include/eplb_client.h`, by cbindgen) share; the Python client is
//! checked against it by the cross-language golden test.
//!
//! Every value is defined once, as a flat `EPLB_*` constant (what the C header shows); the
//! Rust-style modules below ([`off`], [`ack`], ...) are aliases of them, hidden from cbindgen.
//! The header and tensor-table offsets are asserted at compile time against the `#[repr(C)]`
//! structs [`Header`] and [`TableEntryRaw`] (`eplb_header`, `eplb_table_entry` in C): a field that
//! moves breaks the build. All integers are little-endian; the atomic fields are 8-byte aligned.

use std::mem::offset_of;

/// `EPLBSHM1`, little-endian (unchanged from version 1, so that a version-1 region is recognised
/// and refused by its version rather than by its magic).
pub const EPLB_MAGIC: u64 = 0x314d_4853_424c_5045;
/// The contract's major version: a reader refuses any other.
pub const EPLB_VERSION: u32 = 2;
/// The minor version of contract version 2 this side writes.
pub const EPLB_MINOR_VERSION: u32 = 0;
/// Bytes of the header (offset 0).
pub const EPLB_HEADER_BYTES: u32 = 4096;
/// Bytes of one tensor table entry.
pub const EPLB_TENSOR_ENTRY_BYTES: u32 = 64;
/// Tensors a layer: 1 to this many.
pub const EPLB_MAX_TENSORS: u32 = 64;
/// The fewest ring entries a region may have.
pub const EPLB_MIN_RING_LEN: u32 = 16;
/// The ring length an engine gets when it asks for 0.
pub const EPLB_DEFAULT_RING_LEN: u32 = 64;
/// Every section starts at a multiple of this.
pub const EPLB_ALIGN: u32 = 64;
/// Bytes of a tensor name in the table (NUL-padded; a name fills at most 23 of them in C strings).
pub const EPLB_NAME_BYTES: u32 = 24;
/// Bytes of a dtype name in the table (NUL-padded).
pub const EPLB_DTYPE_BYTES: u32 = 8;

// ---- header field offsets (asserted below against `Header`) ----
pub const EPLB_OFF_MAGIC: u32 = 0;
pub const EPLB_OFF_VERSION: u32 = 8;
pub const EPLB_OFF_HEADER_BYTES: u32 = 12;
pub const EPLB_OFF_NUM_LAYERS: u32 = 16;
pub const EPLB_OFF_SLOTS_PER_RANK: u32 = 20;
pub const EPLB_OFF_NUM_LOGICAL: u32 = 24;
pub const EPLB_OFF_WORLD_SIZE: u32 = 28;
pub const EPLB_OFF_RANK: u32 = 32;
pub const EPLB_OFF_RING_LEN: u32 = 36;
pub const EPLB_OFF_EXPERT_BYTES: u32 = 40;
pub const EPLB_OFF_NUM_TENSORS: u32 = 48;
pub const EPLB_OFF_WEIGHTS_KIND: u32 = 52;
pub const EPLB_OFF_TOTAL_BYTES: u32 = 56;
pub const EPLB_OFF_RING_OFFSET: u32 = 64;
pub const EPLB_OFF_RING_ENTRY_BYTES: u32 = 72;
pub const EPLB_OFF_PLACEMENT_OFFSET: u32 = 80;
pub const EPLB_OFF_EPOCHS_OFFSET: u32 = 88;
pub const EPLB_OFF_COMMAND_OFFSET: u32 = 96;
pub const EPLB_OFF_TABLE_OFFSET: u32 = 104;
pub const EPLB_OFF_IPC_OFFSET: u32 = 112;
pub const EPLB_OFF_ENGINE_PID: u32 = 120;
/// Atomic.
pub const EPLB_OFF_ENGINE_STEP: u32 = 128;
/// Atomic.
pub const EPLB_OFF_ENGINE_HEARTBEAT_NS: u32 = 136;
/// Atomic.
pub const EPLB_OFF_ENGINE_STATE: u32 = 144;
/// Atomic.
pub const EPLB_OFF_SIDECAR_PID: u32 = 152;
/// Atomic.
pub const EPLB_OFF_SIDECAR_HEARTBEAT_NS: u32 = 160;
/// Atomic.
pub const EPLB_OFF_SIDECAR_STATE: u32 = 168;
pub const EPLB_OFF_MINOR_VERSION: u32 = 176;
pub const EPLB_OFF_COUNTS_KIND: u32 = 180;
pub const EPLB_OFF_NUM_HANDLES: u32 = 184;
/// Atomic: 0, or `1 + i` when the engine found table entry `i` re-allocated.
pub const EPLB_OFF_TABLE_FAULT: u32 = 192;
// ---- the mailbox, inside the header (all atomic u64) ----
/// The command's sequence word: odd while the sidecar writes a command.
pub const EPLB_OFF_CMD_SEQ: u32 = 256;
pub const EPLB_OFF_CMD_ID: u32 = 264;
pub const EPLB_OFF_CMD_LAYER: u32 = 272;
pub const EPLB_OFF_CMD_APPLY_STEP: u32 = 280;
pub const EPLB_OFF_CMD_EPOCH: u32 = 288;
/// Written last by the engine (release): the answer's result and step belong to it or a later one.
pub const EPLB_OFF_ACK_ID: u32 = 320;
pub const EPLB_OFF_ACK_RESULT: u32 = 328;
pub const EPLB_OFF_ACK_STEP: u32 = 336;
// ---- inside a ring entry (all u64; the sequence word atomic) ----
pub const EPLB_ENTRY_SEQ: u32 = 0;
pub const EPLB_ENTRY_STEP: u32 = 8;
pub const EPLB_ENTRY_PHASE: u32 = 16;
pub const EPLB_ENTRY_TOKENS: u32 = 24;
/// The step's MoE time on this rank in ns (0: not measured).
pub const EPLB_ENTRY_MOE_NS: u32 = 32;
/// `counts [num_layers][count_cols]` u64.
pub const EPLB_ENTRY_COUNTS: u32 = 64;

// ---- weights_kind ----
/// The tensors are in the region (host memory).
pub const EPLB_WEIGHTS_HOST: u32 = 0;
/// They are in the engine's GPU memory, shared with CUDA IPC handles (the IPC section).
pub const EPLB_WEIGHTS_CUDA_IPC: u32 = 1;
// ---- counts_kind ----
/// `counts[layer][s]`, `s < slots_per_rank`: the pairs this rank computed in its local slot `s`.
pub const EPLB_COUNTS_LOCAL: u32 = 0;
/// `counts[layer][p]`, `p < num_physical`: the pairs this rank routed to physical slot `p`.
pub const EPLB_COUNTS_PHYSICAL: u32 = 1;
// ---- tensor kinds ----
/// Moves with its expert: row `s` belongs to local slot `s`.
pub const EPLB_KIND_EXPERT: u32 = 1;
/// Never moved, never written by the sidecar; listed so that it can be proven untouched.
pub const EPLB_KIND_GLOBAL: u32 = 2;
// ---- engine_state ----
pub const EPLB_ENGINE_STARTING: u64 = 0;
pub const EPLB_ENGINE_RUNNING: u64 = 1;
pub const EPLB_ENGINE_FINISHED: u64 = 2;
pub const EPLB_ENGINE_FAILED: u64 = 3;
// ---- sidecar_state ----
pub const EPLB_SIDECAR_NONE: u64 = 0;
pub const EPLB_SIDECAR_ATTACHED: u64 = 1;
pub const EPLB_SIDECAR_EXITED_OK: u64 = 2;
pub const EPLB_SIDECAR_FAILED: u64 = 3;
// ---- ack_result ----
pub const EPLB_ACK_APPLIED: u64 = 1;
pub const EPLB_ACK_CANCELLED: u64 = 2;
pub const EPLB_ACK_MISSED: u64 = 3;
pub const EPLB_ACK_REJECTED: u64 = 4;
// ---- a ring entry's phase ----
pub const EPLB_PHASE_PREFILL: u32 = 1;
pub const EPLB_PHASE_DECODE: u32 = 2;
pub const EPLB_PHASE_MIXED: u32 = 3;
// ---- the CUDA IPC section (weights_kind 1), at ipc_offset ----
/// `pci_bus_id[16]`: the engine GPU's `cuDeviceGetPCIBusId`, ASCII, NUL-padded.
pub const EPLB_IPC_PCI_BUS_ID: u32 = 0;
/// `uuid[16]`: the engine GPU's `cuDeviceGetUuid` bytes (all zero: not checked).
pub const EPLB_IPC_UUID: u32 = 16;
/// The handle table: `num_handles` entries of [`EPLB_IPC_ENTRY_BYTES`].
pub const EPLB_IPC_HANDLES: u32 = 64;
pub const EPLB_IPC_ENTRY_BYTES: u32 = 128;
/// Bytes of a `cudaIpcMemHandle_t`, at the start of a handle entry.
pub const EPLB_IPC_HANDLE_BYTES: u32 = 64;
/// `bytes: u64` inside a handle entry: the allocation's size.
pub const EPLB_IPC_ENTRY_SIZE: u32 = 64;
pub const EPLB_IPC_MAX_HANDLES: u32 = 4096;

/// The header: 4096 bytes at offset 0, little-endian. The struct is the layout's definition (its
/// offsets are asserted below against the `EPLB_OFF_*` table); regions are read and written
/// through byte offsets, never by casting a mapping another process writes.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Header {
    pub magic: u64,
    pub version: u32,
    pub header_bytes: u32,
    pub num_layers: u32,
    pub slots_per_rank: u32,
    pub num_logical: u32,
    pub world_size: u32,
    pub rank: u32,
    pub ring_len: u32,
    /// Σ `row_bytes` over the per-expert tensors of one layer: the bytes that move with an expert.
    pub expert_bytes: u64,
    pub num_tensors: u32,
    pub weights_kind: u32,
    pub total_bytes: u64,
    pub ring_offset: u64,
    pub ring_entry_bytes: u64,
    pub placement_offset: u64,
    pub epochs_offset: u64,
    pub command_offset: u64,
    pub table_offset: u64,
    pub ipc_offset: u64,
    pub engine_pid: u64,
    /// Atomic.
    pub engine_step: u64,
    pub engine_heartbeat_ns: u64,
    pub engine_state: u64,
    pub sidecar_pid: u64,
    pub sidecar_heartbeat_ns: u64,
    pub sidecar_state: u64,
    pub minor_version: u32,
    pub counts_kind: u32,
    pub num_handles: u32,
    pub reserved0: u32,
    /// Atomic: 0, or `1 + i` when the engine found table entry `i` re-allocated.
    pub table_fault: u64,
}

/// One entry of the tensor table (64 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct TableEntryRaw {
    pub name: [u8; 24],
    pub dtype: [u8; 8],
    pub offset: u64,
    pub row_stride: u64,
    pub row_bytes: u64,
    pub rows: u32,
    pub kind: u8,
    pub reserved: u8,
    pub handle: u16,
}

// The contract's table, checked at compile time: a field that moves breaks the build.
const _: () = {
    macro_rules! at {
        ($field:ident, $c:expr) => {
            assert!(offset_of!(Header, $field) == $c as usize);
        };
    }
    at!(magic, EPLB_OFF_MAGIC);
    at!(version, EPLB_OFF_VERSION);
    at!(header_bytes, EPLB_OFF_HEADER_BYTES);
    at!(num_layers, EPLB_OFF_NUM_LAYERS);
    at!(slots_per_rank, EPLB_OFF_SLOTS_PER_RANK);
    at!(num_logical, EPLB_OFF_NUM_LOGICAL);
    at!(world_size, EPLB_OFF_WORLD_SIZE);
    at!(rank, EPLB_OFF_RANK);
    at!(ring_len, EPLB_OFF_RING_LEN);
    at!(expert_bytes, EPLB_OFF_EXPERT_BYTES);
    at!(num_tensors, EPLB_OFF_NUM_TENSORS);
    at!(weights_kind, EPLB_OFF_WEIGHTS_KIND);
    at!(total_bytes, EPLB_OFF_TOTAL_BYTES);
    at!(ring_offset, EPLB_OFF_RING_OFFSET);
    at!(ring_entry_bytes, EPLB_OFF_RING_ENTRY_BYTES);
    at!(placement_offset, EPLB_OFF_PLACEMENT_OFFSET);
    at!(epochs_offset, EPLB_OFF_EPOCHS_OFFSET);
    at!(command_offset, EPLB_OFF_COMMAND_OFFSET);
    at!(table_offset, EPLB_OFF_TABLE_OFFSET);
    at!(ipc_offset, EPLB_OFF_IPC_OFFSET);
    at!(engine_pid, EPLB_OFF_ENGINE_PID);
    at!(engine_step, EPLB_OFF_ENGINE_STEP);
    at!(engine_heartbeat_ns, EPLB_OFF_ENGINE_HEARTBEAT_NS);
    at!(engine_state, EPLB_OFF_ENGINE_STATE);
    at!(sidecar_pid, EPLB_OFF_SIDECAR_PID);
    at!(sidecar_heartbeat_ns, EPLB_OFF_SIDECAR_HEARTBEAT_NS);
    at!(sidecar_state, EPLB_OFF_SIDECAR_STATE);
    at!(minor_version, EPLB_OFF_MINOR_VERSION);
    at!(counts_kind, EPLB_OFF_COUNTS_KIND);
    at!(num_handles, EPLB_OFF_NUM_HANDLES);
    at!(table_fault, EPLB_OFF_TABLE_FAULT);
    assert!(std::mem::size_of::<Header>() == 200 && std::mem::size_of::<Header>() <= EPLB_OFF_CMD_SEQ as usize);
    assert!(EPLB_OFF_ACK_STEP + 8 <= EPLB_HEADER_BYTES);
    assert!(std::mem::size_of::<TableEntryRaw>() == EPLB_TENSOR_ENTRY_BYTES as usize);
    assert!(offset_of!(TableEntryRaw, dtype) == EPLB_NAME_BYTES as usize);
    assert!(offset_of!(TableEntryRaw, offset) == 32 && offset_of!(TableEntryRaw, row_stride) == 40);
    assert!(offset_of!(TableEntryRaw, row_bytes) == 48 && offset_of!(TableEntryRaw, rows) == 56);
    assert!(offset_of!(TableEntryRaw, kind) == 60 && offset_of!(TableEntryRaw, handle) == 62);
};

/// `EPLBSHM1`, little-endian.
/// cbindgen:ignore
pub const MAGIC: u64 = EPLB_MAGIC;
/// cbindgen:ignore
pub const VERSION: u32 = EPLB_VERSION;
/// The minor version of contract version 2 this side writes.
/// cbindgen:ignore
pub const MINOR_VERSION: u32 = EPLB_MINOR_VERSION;
/// cbindgen:ignore
pub const HEADER_BYTES: usize = EPLB_HEADER_BYTES as usize;
/// Bytes of one tensor table entry.
/// cbindgen:ignore
pub const TENSOR_ENTRY_BYTES: usize = EPLB_TENSOR_ENTRY_BYTES as usize;
/// Tensors a layer: 1 to this many.
/// cbindgen:ignore
pub const MAX_TENSORS: usize = EPLB_MAX_TENSORS as usize;
/// cbindgen:ignore
pub const MIN_RING_LEN: usize = EPLB_MIN_RING_LEN as usize;

/// The dtypes the contract names (informational: rows move as opaque bytes).
/// cbindgen:ignore
pub const DTYPES: [&str; 13] =
    ["f64", "f32", "f16", "bf16", "i64", "i32", "i16", "i8", "u8", "f8e4m3", "f8e5m2", "e8m0", "fp4x2"];

/// Byte offsets of the header fields, of the mailbox, and inside a ring entry.
/// cbindgen:ignore
pub mod off {
    use super::*;
    pub const MAGIC: usize = EPLB_OFF_MAGIC as usize;
    pub const VERSION: usize = EPLB_OFF_VERSION as usize;
    pub const HEADER_BYTES: usize = EPLB_OFF_HEADER_BYTES as usize;
    pub const NUM_LAYERS: usize = EPLB_OFF_NUM_LAYERS as usize;
    pub const SLOTS_PER_RANK: usize = EPLB_OFF_SLOTS_PER_RANK as usize;
    pub const NUM_LOGICAL: usize = EPLB_OFF_NUM_LOGICAL as usize;
    pub const WORLD_SIZE: usize = EPLB_OFF_WORLD_SIZE as usize;
    pub const RANK: usize = EPLB_OFF_RANK as usize;
    pub const RING_LEN: usize = EPLB_OFF_RING_LEN as usize;
    pub const EXPERT_BYTES: usize = EPLB_OFF_EXPERT_BYTES as usize;
    pub const NUM_TENSORS: usize = EPLB_OFF_NUM_TENSORS as usize;
    pub const WEIGHTS_KIND: usize = EPLB_OFF_WEIGHTS_KIND as usize;
    pub const TOTAL_BYTES: usize = EPLB_OFF_TOTAL_BYTES as usize;
    pub const RING_OFFSET: usize = EPLB_OFF_RING_OFFSET as usize;
    pub const RING_ENTRY_BYTES: usize = EPLB_OFF_RING_ENTRY_BYTES as usize;
    pub const PLACEMENT_OFFSET: usize = EPLB_OFF_PLACEMENT_OFFSET as usize;
    pub const EPOCHS_OFFSET: usize = EPLB_OFF_EPOCHS_OFFSET as usize;
    pub const COMMAND_OFFSET: usize = EPLB_OFF_COMMAND_OFFSET as usize;
    pub const TABLE_OFFSET: usize = EPLB_OFF_TABLE_OFFSET as usize;
    pub const IPC_OFFSET: usize = EPLB_OFF_IPC_OFFSET as usize;
    pub const ENGINE_PID: usize = EPLB_OFF_ENGINE_PID as usize;
    pub const ENGINE_STEP: usize = EPLB_OFF_ENGINE_STEP as usize;
    pub const ENGINE_HEARTBEAT_NS: usize = EPLB_OFF_ENGINE_HEARTBEAT_NS as usize;
    pub const ENGINE_STATE: usize = EPLB_OFF_ENGINE_STATE as usize;
    pub const SIDECAR_PID: usize = EPLB_OFF_SIDECAR_PID as usize;
    pub const SIDECAR_HEARTBEAT_NS: usize = EPLB_OFF_SIDECAR_HEARTBEAT_NS as usize;
    pub const SIDECAR_STATE: usize = EPLB_OFF_SIDECAR_STATE as usize;
    pub const MINOR_VERSION: usize = EPLB_OFF_MINOR_VERSION as usize;
    pub const COUNTS_KIND: usize = EPLB_OFF_COUNTS_KIND as usize;
    pub const NUM_HANDLES: usize = EPLB_OFF_NUM_HANDLES as usize;
    pub const TABLE_FAULT: usize = EPLB_OFF_TABLE_FAULT as usize;
    pub const CMD_SEQ: usize = EPLB_OFF_CMD_SEQ as usize;
    pub const CMD_ID: usize = EPLB_OFF_CMD_ID as usize;
    pub const CMD_LAYER: usize = EPLB_OFF_CMD_LAYER as usize;
    pub const CMD_APPLY_STEP: usize = EPLB_OFF_CMD_APPLY_STEP as usize;
    pub const CMD_EPOCH: usize = EPLB_OFF_CMD_EPOCH as usize;
    pub const ACK_ID: usize = EPLB_OFF_ACK_ID as usize;
    pub const ACK_RESULT: usize = EPLB_OFF_ACK_RESULT as usize;
    pub const ACK_STEP: usize = EPLB_OFF_ACK_STEP as usize;
    /// Inside a ring entry.
    pub const ENTRY_SEQ: usize = EPLB_ENTRY_SEQ as usize;
    pub const ENTRY_STEP: usize = EPLB_ENTRY_STEP as usize;
    pub const ENTRY_PHASE: usize = EPLB_ENTRY_PHASE as usize;
    pub const ENTRY_TOKENS: usize = EPLB_ENTRY_TOKENS as usize;
    /// The step's MoE time on this rank in ns (0: not measured).
    pub const ENTRY_MOE_NS: usize = EPLB_ENTRY_MOE_NS as usize;
    pub const ENTRY_COUNTS: usize = EPLB_ENTRY_COUNTS as usize;
}

/// `weights_kind` values.
/// cbindgen:ignore
pub mod weights_kind {
    /// The tensors are in the region (host memory).
    pub const HOST: u32 = super::EPLB_WEIGHTS_HOST;
    /// They are in the engine's GPU memory, shared with CUDA IPC handles (the IPC section).
    pub const CUDA_IPC: u32 = super::EPLB_WEIGHTS_CUDA_IPC;
}

/// `counts_kind` values: what a ring entry's counts are.
/// cbindgen:ignore
pub mod counts_kind {
    /// `counts[layer][s]`, `s < slots_per_rank`: the pairs this rank computed in its local slot `s`.
    pub const LOCAL: u32 = super::EPLB_COUNTS_LOCAL;
    /// `counts[layer][p]`, `p < num_physical`: the pairs this rank routed to physical slot `p`.
    pub const PHYSICAL: u32 = super::EPLB_COUNTS_PHYSICAL;
}

/// Tensor kinds of the table.
/// cbindgen:ignore
pub mod tensor_kind {
    /// Moves with its expert: row `s` belongs to local slot `s`.
    pub const EXPERT: u8 = super::EPLB_KIND_EXPERT as u8;
    /// Never moved, never written by the sidecar; listed so that it can be proven untouched.
    pub const GLOBAL: u8 = super::EPLB_KIND_GLOBAL as u8;
}

/// The CUDA IPC section (weights_kind 1), at `ipc_offset`.
/// cbindgen:ignore
pub mod ipc {
    use super::*;
    /// `pci_bus_id[16]`: the engine GPU's `cuDeviceGetPCIBusId`, ASCII, NUL-padded.
    pub const PCI_BUS_ID: usize = EPLB_IPC_PCI_BUS_ID as usize;
    /// `uuid[16]`: the engine GPU's `cuDeviceGetUuid` bytes (all zero: not checked).
    pub const UUID: usize = EPLB_IPC_UUID as usize;
    /// The handle table: `num_handles` entries of [`ENTRY_BYTES`].
    pub const HANDLES: usize = EPLB_IPC_HANDLES as usize;
    pub const ENTRY_BYTES: usize = EPLB_IPC_ENTRY_BYTES as usize;
    /// `bytes: u64` inside a handle entry: the allocation's size.
    pub const ENTRY_SIZE: usize = EPLB_IPC_ENTRY_SIZE as usize;
    pub const MAX_HANDLES: usize = EPLB_IPC_MAX_HANDLES as usize;
}

/// `engine_state` values.
/// cbindgen:ignore
pub mod engine_state {
    pub const STARTING: u64 = super::EPLB_ENGINE_STARTING;
    pub const RUNNING: u64 = super::EPLB_ENGINE_RUNNING;
    pub const FINISHED: u64 = super::EPLB_ENGINE_FINISHED;
    pub const FAILED: u64 = super::EPLB_ENGINE_FAILED;
}

/// `sidecar_state` values.
/// cbindgen:ignore
pub mod sidecar_state {
    pub const ATTACHED: u64 = super::EPLB_SIDECAR_ATTACHED;
    pub const EXITED_OK: u64 = super::EPLB_SIDECAR_EXITED_OK;
    pub const FAILED: u64 = super::EPLB_SIDECAR_FAILED;
}

/// `ack_result` values.
/// cbindgen:ignore
pub mod ack {
    pub const APPLIED: u64 = super::EPLB_ACK_APPLIED;
    pub const CANCELLED: u64 = super::EPLB_ACK_CANCELLED;
    pub const MISSED: u64 = super::EPLB_ACK_MISSED;
    pub const REJECTED: u64 = super::EPLB_ACK_REJECTED;
}

/// A step's phase in the load ring.
/// cbindgen:ignore
pub mod phase {
    pub const PREFILL: u64 = super::EPLB_PHASE_PREFILL as u64;
    pub const DECODE: u64 = super::EPLB_PHASE_DECODE as u64;
    pub const MIXED: u64 = super::EPLB_PHASE_MIXED as u64;
}

/// Rounds `x` up to a multiple of 64 (every section's alignment).
pub fn round64(x: u64) -> u64 {
    x.div_ceil(EPLB_ALIGN as u64) * EPLB_ALIGN as u64
}
