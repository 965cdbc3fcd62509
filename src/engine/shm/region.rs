//! The shared-memory region of one engine rank (docs/engine-contract.md, version 1): its byte
//! layout, the header check, and typed access for both sides (the sidecar here; the engine side
//! for tests and the Rust fake engine in [`super::writer`]).
//!
//! The file is mapped with `memmap2::MmapRaw` (shared, read-write: the sidecar writes the
//! mailbox, the staging area and its own header fields). Fields the contract marks atomic are
//! 8-byte aligned `u64`s accessed as [`AtomicU64`]; the other fields of a ring entry or a command
//! are read and written with volatile accesses between the loads and stores of their sequence
//! word, with acquire/release fences (a sequence lock).

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, AtomicU64, Ordering};

use memmap2::MmapRaw;
use thiserror::Error;

/// `EPLBSHM1`, little-endian.
pub const MAGIC: u64 = 0x314d_4853_424c_5045;
pub const VERSION: u32 = 1;
pub const HEADER_BYTES: usize = 4096;
/// Bytes of one tensor table entry, and the most entries.
pub const TENSOR_ENTRY_BYTES: usize = 64;
pub const MAX_TENSORS: usize = 16;
pub const MIN_RING_LEN: usize = 16;
const ALIGN: u64 = 64;
/// The minor version of contract version 1 this side writes: 1 added the CUDA IPC weights
/// (`weights_kind` 1; a reader of minor 0 refuses it, so it stays correct); 2 the measured MoE
/// time of a step in the ring entry (reserved and 0 before: "not measured" to every reader).
pub const MINOR_VERSION: u32 = 2;

/// `weights_kind` values.
pub mod weights_kind {
    /// The live weights and the staging area are in the region (host memory).
    pub const HOST: u32 = 0;
    /// They are in the engine's GPU memory, shared with CUDA IPC handles (the IPC section).
    pub const CUDA_IPC: u32 = 1;
}

/// The CUDA IPC section of the header (weights_kind 1), at [`ipc::OFFSET`].
pub mod ipc {
    pub const OFFSET: usize = 2048;
    /// `pci_bus_id[16]`: the engine GPU's `cudaDeviceGetPCIBusId`, ASCII, NUL-padded.
    pub const PCI_BUS_ID: usize = 2048;
    /// `uuid[16]`: the engine GPU's `cuDeviceGetUuid` bytes.
    pub const UUID: usize = 2064;
    /// u32: entries in the handle table (1 to [`MAX_HANDLES`]).
    pub const NUM_HANDLES: usize = 2080;
    /// The handle table: [`ENTRY_BYTES`] each.
    pub const HANDLES: usize = 2112;
    pub const ENTRY_BYTES: usize = 128;
    pub const MAX_HANDLES: usize = 15;
    /// Handle roles.
    pub const ROLE_LIVE: u32 = 1;
    pub const ROLE_STAGING: u32 = 2;
}

/// One CUDA IPC handle of the engine's GPU memory, and what lies behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpcHandle {
    /// The `cudaIpcMemHandle_t` (`cuIpcGetMemHandle`) of a whole allocation.
    pub handle: [u8; 64],
    /// [`ipc::ROLE_LIVE`]: live weights `[layers][slots_per_rank][expert_bytes]` of layers
    /// `first_layer..first_layer + bytes / (slots_per_rank * expert_bytes)`;
    /// [`ipc::ROLE_STAGING`]: the staging area `[slots_per_rank][expert_bytes]`.
    pub role: u32,
    pub first_layer: u32,
    /// Byte offset of the tensor inside the allocation.
    pub offset: u64,
    pub bytes: u64,
}

/// The IPC section: which GPU, and the handles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpcWeights {
    /// `0000:19:00.0`: the sidecar opens this very GPU, whatever its `CUDA_VISIBLE_DEVICES`.
    pub pci_bus_id: String,
    pub uuid: [u8; 16],
    pub handles: Vec<IpcHandle>,
}

impl IpcWeights {
    /// `(handle index, byte offset inside its allocation)` of `layer`'s live slots.
    pub fn live(&self, layer: usize, layer_bytes: u64) -> Option<(usize, u64)> {
        self.handles.iter().enumerate().find_map(|(i, h)| {
            let n = h.bytes.checked_div(layer_bytes).unwrap_or(0);
            let first = h.first_layer as usize;
            (h.role == ipc::ROLE_LIVE && layer >= first && ((layer - first) as u64) < n)
                .then(|| (i, h.offset + (layer - first) as u64 * layer_bytes))
        })
    }

    /// `(handle index, byte offset)` of the staging area.
    pub fn staging(&self) -> Option<(usize, u64)> {
        self.handles.iter().position(|h| h.role == ipc::ROLE_STAGING).map(|i| (i, self.handles[i].offset))
    }

    /// Checks the table against the shape: every layer in exactly one live handle, one staging
    /// handle of one layer's slots.
    fn check(&self, num_layers: usize, layer_bytes: u64) -> Result<(), String> {
        let mut covered = vec![0u32; num_layers];
        let mut staging = 0;
        for (i, h) in self.handles.iter().enumerate() {
            match h.role {
                ipc::ROLE_LIVE => {
                    if h.bytes == 0 || !h.bytes.is_multiple_of(layer_bytes) {
                        return Err(format!(
                            "IPC handle {i}: {} bytes is not a whole number of layers of {layer_bytes} bytes",
                            h.bytes
                        ));
                    }
                    let n = (h.bytes / layer_bytes) as usize;
                    let first = h.first_layer as usize;
                    if first + n > num_layers {
                        return Err(format!(
                            "IPC handle {i}: layers {first}..{} past num_layers {num_layers}",
                            first + n
                        ));
                    }
                    covered[first..first + n].iter_mut().for_each(|c| *c += 1);
                }
                ipc::ROLE_STAGING => {
                    if h.bytes != layer_bytes {
                        return Err(format!("IPC handle {i}: staging of {} bytes, want {layer_bytes}", h.bytes));
                    }
                    staging += 1;
                }
                r => return Err(format!("IPC handle {i}: unknown role {r}")),
            }
        }
        if let Some(l) = covered.iter().position(|&c| c != 1) {
            return Err(format!("layer {l} is in {} live IPC handles (want exactly 1)", covered[l]));
        }
        if staging != 1 {
            return Err(format!("{staging} staging IPC handles (want exactly 1)"));
        }
        if self.pci_bus_id.is_empty() {
            return Err("no pci_bus_id in the IPC section".into());
        }
        Ok(())
    }
}

/// Byte offsets of the header fields.
pub mod off {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 8;
    pub const HEADER_BYTES: usize = 12;
    pub const NUM_LAYERS: usize = 16;
    pub const SLOTS_PER_RANK: usize = 20;
    pub const NUM_LOGICAL: usize = 24;
    pub const WORLD_SIZE: usize = 28;
    pub const RANK: usize = 32;
    pub const RING_LEN: usize = 36;
    pub const EXPERT_BYTES: usize = 40;
    pub const NUM_TENSORS: usize = 48;
    pub const WEIGHTS_KIND: usize = 52;
    pub const TOTAL_BYTES: usize = 56;
    pub const RING_OFFSET: usize = 64;
    pub const RING_ENTRY_BYTES: usize = 72;
    pub const PLACEMENT_OFFSET: usize = 80;
    pub const EPOCHS_OFFSET: usize = 88;
    pub const COMMAND_OFFSET: usize = 96;
    pub const WEIGHTS_OFFSET: usize = 104;
    pub const STAGING_OFFSET: usize = 112;
    pub const ENGINE_PID: usize = 120;
    pub const ENGINE_STEP: usize = 128;
    pub const ENGINE_HEARTBEAT_NS: usize = 136;
    pub const ENGINE_STATE: usize = 144;
    pub const SIDECAR_PID: usize = 152;
    pub const SIDECAR_HEARTBEAT_NS: usize = 160;
    pub const SIDECAR_STATE: usize = 168;
    /// u32: the minor version of contract version 1 (0 before the CUDA IPC weights).
    pub const MINOR_VERSION: usize = 176;
    pub const CMD_SEQ: usize = 256;
    pub const CMD_ID: usize = 264;
    pub const CMD_LAYER: usize = 272;
    pub const CMD_APPLY_STEP: usize = 280;
    pub const CMD_EPOCH: usize = 288;
    pub const ACK_ID: usize = 320;
    pub const ACK_RESULT: usize = 328;
    pub const ACK_STEP: usize = 336;
    pub const TENSORS: usize = 1024;
    /// Inside a ring entry.
    pub const ENTRY_SEQ: usize = 0;
    pub const ENTRY_STEP: usize = 8;
    pub const ENTRY_PHASE: usize = 16;
    pub const ENTRY_TOKENS: usize = 24;
    /// The step's MoE time on this rank in ns (minor 2; 0: not measured).
    pub const ENTRY_MOE_NS: usize = 32;
    pub const ENTRY_COUNTS: usize = 64;
}

/// `engine_state` values.
pub mod engine_state {
    pub const STARTING: u64 = 0;
    pub const RUNNING: u64 = 1;
    pub const FINISHED: u64 = 2;
    pub const FAILED: u64 = 3;
}

/// `sidecar_state` values.
pub mod sidecar_state {
    pub const ATTACHED: u64 = 1;
    pub const EXITED_OK: u64 = 2;
    pub const FAILED: u64 = 3;
}

/// `ack_result` values.
pub mod ack {
    pub const APPLIED: u64 = 1;
    pub const CANCELLED: u64 = 2;
    pub const MISSED: u64 = 3;
    pub const REJECTED: u64 = 4;
}

/// A step's phase in the load ring.
pub mod phase {
    pub const PREFILL: u64 = 1;
    pub const DECODE: u64 = 2;
    pub const MIXED: u64 = 3;
}

/// Errors of a region: what is wrong with it, and where.
#[derive(Debug, Error)]
pub enum RegionError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {what}")]
    Bad { path: PathBuf, what: String },
}

/// Rounds `x` up to a multiple of 64.
pub fn round64(x: u64) -> u64 {
    x.div_ceil(ALIGN) * ALIGN
}

/// One tensor of an expert (a row of the tensor table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: String,
    /// Byte offset inside one expert (a multiple of 64).
    pub offset: u64,
    pub bytes: u64,
    /// 1 or 2 dimensions.
    pub dims: Vec<u32>,
}

/// Bytes of one element of `dtype`, if the contract knows it.
pub fn dtype_bytes(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "f64" => 8,
        "f32" | "i32" => 4,
        "f16" | "bf16" => 2,
        "i8" | "u8" | "f8e4m3" => 1,
        _ => return None,
    })
}

impl TensorSpec {
    /// A tensor of `dims` elements of `dtype` at `offset`.
    pub fn new(name: &str, dtype: &str, dims: &[u32], offset: u64) -> TensorSpec {
        let elems: u64 = dims.iter().map(|&d| d as u64).product();
        let bytes = elems * dtype_bytes(dtype).unwrap_or(1);
        TensorSpec { name: name.into(), dtype: dtype.into(), offset, bytes, dims: dims.to_vec() }
    }
}

/// Where everything is in a region: the header's numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub num_layers: usize,
    pub slots_per_rank: usize,
    pub num_logical: usize,
    pub world_size: usize,
    pub rank: usize,
    pub ring_len: usize,
    pub expert_bytes: usize,
    pub weights_kind: u32,
    /// The CUDA IPC section (`weights_kind` 1).
    pub ipc: Option<IpcWeights>,
    pub tensors: Vec<TensorSpec>,
    pub total_bytes: usize,
    pub ring_offset: usize,
    pub ring_entry_bytes: usize,
    pub placement_offset: usize,
    pub epochs_offset: usize,
    pub command_offset: usize,
    pub weights_offset: usize,
    pub staging_offset: usize,
}

impl Layout {
    /// The canonical packing (what the reference client writes): header, ring, placement,
    /// epochs, command, weights, staging, each at a multiple of 64. `tensors` are packed in order.
    #[allow(clippy::too_many_arguments)]
    pub fn packed(
        num_layers: usize,
        slots_per_rank: usize,
        num_logical: usize,
        world_size: usize,
        rank: usize,
        ring_len: usize,
        tensors: &[(&str, &str, &[u32])],
    ) -> Layout {
        let mut specs = Vec::new();
        let mut end = 0u64;
        for (name, dtype, dims) in tensors {
            let t = TensorSpec::new(name, dtype, dims, end);
            end = round64(t.offset + t.bytes);
            specs.push(t);
        }
        let expert_bytes = end as usize;
        let (l, s, p) = (num_layers as u64, slots_per_rank as u64, (world_size * slots_per_rank) as u64);
        let ring_entry_bytes = 64 + round64(8 * l * s);
        let ring_offset = HEADER_BYTES as u64;
        let placement_offset = ring_offset + ring_len as u64 * ring_entry_bytes;
        let epochs_offset = placement_offset + round64(4 * l * p);
        let command_offset = epochs_offset + round64(8 * l);
        let weights_offset = command_offset + round64(4 * p) + round64(s);
        let staging_offset = weights_offset + l * s * expert_bytes as u64;
        let total_bytes = staging_offset + s * expert_bytes as u64;
        Layout {
            num_layers,
            slots_per_rank,
            num_logical,
            world_size,
            rank,
            ring_len,
            expert_bytes,
            weights_kind: weights_kind::HOST,
            ipc: None,
            tensors: specs,
            total_bytes: total_bytes as usize,
            ring_offset: ring_offset as usize,
            ring_entry_bytes: ring_entry_bytes as usize,
            placement_offset: placement_offset as usize,
            epochs_offset: epochs_offset as usize,
            command_offset: command_offset as usize,
            weights_offset: weights_offset as usize,
            staging_offset: staging_offset as usize,
        }
    }

    pub fn num_physical(&self) -> usize {
        self.world_size * self.slots_per_rank
    }

    /// Offset of `copy_mask [slots_per_rank]` u8, after `new_row [num_physical]` i32.
    pub fn mask_offset(&self) -> usize {
        self.command_offset + round64(4 * self.num_physical() as u64) as usize
    }

    /// This layout with its weights in the engine's GPU memory behind `ipc` (weights_kind 1):
    /// the region loses its weights and staging sections.
    pub fn with_ipc(self, ipc: IpcWeights) -> Layout {
        let end = self.weights_offset;
        Layout {
            weights_kind: weights_kind::CUDA_IPC,
            ipc: Some(ipc),
            weights_offset: 0,
            staging_offset: 0,
            total_bytes: end,
            ..self
        }
    }

    /// Bytes of one layer's local slots.
    pub fn layer_bytes(&self) -> u64 {
        self.slots_per_rank as u64 * self.expert_bytes as u64
    }

    /// The sections as (name, offset, bytes).
    fn sections(&self) -> Vec<(&'static str, usize, u128)> {
        let (l, s, p, eb) = (
            self.num_layers as u128,
            self.slots_per_rank as u128,
            self.num_physical() as u128,
            self.expert_bytes as u128,
        );
        let host = self.weights_kind == weights_kind::HOST;
        let mut v = vec![
            ("header", 0, HEADER_BYTES as u128),
            ("ring", self.ring_offset, self.ring_len as u128 * self.ring_entry_bytes as u128),
            ("placement", self.placement_offset, 4 * l * p),
            ("epochs", self.epochs_offset, 8 * l),
            // In u128 like the rest: 4 x num_physical overflows u64 for a hostile world_size x
            // slots_per_rank (the header's u32 fields; found by fuzzing).
            ("command", self.command_offset, (4 * p).div_ceil(64) * 64 + s),
        ];
        if host {
            v.push(("weights", self.weights_offset, l * s * eb));
            v.push(("staging", self.staging_offset, s * eb));
        }
        v
    }

    /// The header bytes of this layout (the engine side writes them; tests corrupt them).
    pub fn header_bytes(&self, engine_pid: u64) -> Vec<u8> {
        let mut h = vec![0u8; HEADER_BYTES];
        let mut put = |at: usize, bytes: &[u8]| h[at..at + bytes.len()].copy_from_slice(bytes);
        put(off::MAGIC, &MAGIC.to_le_bytes());
        put(off::VERSION, &VERSION.to_le_bytes());
        put(off::HEADER_BYTES, &(HEADER_BYTES as u32).to_le_bytes());
        for (at, v) in [
            (off::NUM_LAYERS, self.num_layers),
            (off::SLOTS_PER_RANK, self.slots_per_rank),
            (off::NUM_LOGICAL, self.num_logical),
            (off::WORLD_SIZE, self.world_size),
            (off::RANK, self.rank),
            (off::RING_LEN, self.ring_len),
            (off::NUM_TENSORS, self.tensors.len()),
        ] {
            put(at, &(v as u32).to_le_bytes());
        }
        put(off::WEIGHTS_KIND, &self.weights_kind.to_le_bytes());
        put(off::MINOR_VERSION, &MINOR_VERSION.to_le_bytes());
        if let Some(w) = &self.ipc {
            let bus = w.pci_bus_id.as_bytes();
            put(ipc::PCI_BUS_ID, &bus[..bus.len().min(15)]);
            put(ipc::UUID, &w.uuid);
            put(ipc::NUM_HANDLES, &(w.handles.len() as u32).to_le_bytes());
            for (i, x) in w.handles.iter().enumerate().take(ipc::MAX_HANDLES) {
                let at = ipc::HANDLES + i * ipc::ENTRY_BYTES;
                put(at, &x.handle);
                put(at + 64, &x.role.to_le_bytes());
                put(at + 68, &x.first_layer.to_le_bytes());
                put(at + 72, &x.offset.to_le_bytes());
                put(at + 80, &x.bytes.to_le_bytes());
            }
        }
        for (at, v) in [
            (off::EXPERT_BYTES, self.expert_bytes),
            (off::TOTAL_BYTES, self.total_bytes),
            (off::RING_OFFSET, self.ring_offset),
            (off::RING_ENTRY_BYTES, self.ring_entry_bytes),
            (off::PLACEMENT_OFFSET, self.placement_offset),
            (off::EPOCHS_OFFSET, self.epochs_offset),
            (off::COMMAND_OFFSET, self.command_offset),
            (off::WEIGHTS_OFFSET, self.weights_offset),
            (off::STAGING_OFFSET, self.staging_offset),
            (off::ENGINE_PID, engine_pid as usize),
        ] {
            put(at, &(v as u64).to_le_bytes());
        }
        for (i, t) in self.tensors.iter().enumerate() {
            let at = off::TENSORS + i * TENSOR_ENTRY_BYTES;
            let name = t.name.as_bytes();
            put(at, &name[..name.len().min(24)]);
            let dtype = t.dtype.as_bytes();
            put(at + 24, &dtype[..dtype.len().min(8)]);
            put(at + 32, &t.offset.to_le_bytes());
            put(at + 40, &t.bytes.to_le_bytes());
            put(at + 48, &(t.dims.len() as u32).to_le_bytes());
            for (j, d) in t.dims.iter().take(2).enumerate() {
                put(at + 56 + 4 * j, &d.to_le_bytes());
            }
        }
        h
    }

    /// Parses and checks a header (`bytes`: at least the header; `file_len`: the region's size).
    /// Every error says what is wrong.
    pub fn parse(bytes: &[u8], file_len: usize) -> Result<Layout, String> {
        if bytes.len() < HEADER_BYTES || file_len < HEADER_BYTES {
            return Err(format!("{file_len} bytes: too short for the {HEADER_BYTES}-byte header"));
        }
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let magic = u64_at(off::MAGIC);
        if magic != MAGIC {
            return Err(format!(
                "bad magic {magic:#018x} (want {MAGIC:#018x}, \"EPLBSHM1\"): not an eplb engine region"
            ));
        }
        let version = u32_at(off::VERSION);
        if version != VERSION {
            return Err(format!(
                "contract version {version}, but this eplb-worker speaks version {VERSION}: use matching engine client and eplb-worker versions"
            ));
        }
        if u32_at(off::HEADER_BYTES) as usize != HEADER_BYTES {
            return Err(format!("header_bytes {} (want {HEADER_BYTES})", u32_at(off::HEADER_BYTES)));
        }
        let to_usize = |v: u64, what: &str| usize::try_from(v).map_err(|_| format!("{what} {v} is too large"));
        let tensors_n = u32_at(off::NUM_TENSORS) as usize;
        let layout = Layout {
            num_layers: u32_at(off::NUM_LAYERS) as usize,
            slots_per_rank: u32_at(off::SLOTS_PER_RANK) as usize,
            num_logical: u32_at(off::NUM_LOGICAL) as usize,
            world_size: u32_at(off::WORLD_SIZE) as usize,
            rank: u32_at(off::RANK) as usize,
            ring_len: u32_at(off::RING_LEN) as usize,
            expert_bytes: to_usize(u64_at(off::EXPERT_BYTES), "expert_bytes")?,
            weights_kind: u32_at(off::WEIGHTS_KIND),
            ipc: None,
            tensors: Vec::new(),
            total_bytes: to_usize(u64_at(off::TOTAL_BYTES), "total_bytes")?,
            ring_offset: to_usize(u64_at(off::RING_OFFSET), "ring_offset")?,
            ring_entry_bytes: to_usize(u64_at(off::RING_ENTRY_BYTES), "ring_entry_bytes")?,
            placement_offset: to_usize(u64_at(off::PLACEMENT_OFFSET), "placement_offset")?,
            epochs_offset: to_usize(u64_at(off::EPOCHS_OFFSET), "epochs_offset")?,
            command_offset: to_usize(u64_at(off::COMMAND_OFFSET), "command_offset")?,
            weights_offset: to_usize(u64_at(off::WEIGHTS_OFFSET), "weights_offset")?,
            staging_offset: to_usize(u64_at(off::STAGING_OFFSET), "staging_offset")?,
        };
        let l = &layout;
        for (what, v) in [
            ("num_layers", l.num_layers),
            ("slots_per_rank", l.slots_per_rank),
            ("num_logical", l.num_logical),
            ("world_size", l.world_size),
        ] {
            if v == 0 {
                return Err(format!("{what} is 0"));
            }
        }
        if l.rank >= l.world_size {
            return Err(format!("rank {} is not below world_size {}", l.rank, l.world_size));
        }
        if l.num_physical() < l.num_logical {
            return Err(format!(
                "{} slots ({} ranks x {}) cannot hold {} experts",
                l.num_physical(),
                l.world_size,
                l.slots_per_rank,
                l.num_logical
            ));
        }
        if l.ring_len < MIN_RING_LEN {
            return Err(format!("ring_len {} is below {MIN_RING_LEN}", l.ring_len));
        }
        if l.expert_bytes == 0 || !(l.expert_bytes as u64).is_multiple_of(ALIGN) {
            return Err(format!("expert_bytes {} is not a positive multiple of 64", l.expert_bytes));
        }
        let ipc_weights = match l.weights_kind {
            weights_kind::HOST => None,
            weights_kind::CUDA_IPC => Some(parse_ipc(bytes).map_err(|e| format!("weights_kind 1 (CUDA IPC): {e}"))?),
            k => {
                return Err(format!(
                    "weights_kind {k}: this eplb-worker knows host weights (0) and CUDA IPC handles (1)"
                ))
            }
        };
        // In u128: 8 x num_layers x slots_per_rank of two u32 fields overflows u64 (found by fuzzing).
        let want_entry = 64 + (8 * l.num_layers as u128 * l.slots_per_rank as u128).div_ceil(64) * 64;
        if l.ring_entry_bytes as u128 != want_entry {
            return Err(format!("ring_entry_bytes {} (want {want_entry} for this shape)", l.ring_entry_bytes));
        }
        if l.total_bytes != file_len {
            return Err(format!("total_bytes {} but the region has {file_len} bytes", l.total_bytes));
        }
        let mut sections = l.sections();
        for &(name, at, len) in &sections {
            if !(at as u64).is_multiple_of(ALIGN) {
                return Err(format!("the {name} section at {at} is not at a multiple of 64"));
            }
            if at as u128 + len > file_len as u128 {
                return Err(format!(
                    "the {name} section ({len} bytes at {at}) ends past the region's {file_len} bytes"
                ));
            }
        }
        sections.sort_by_key(|s| s.1);
        for w in sections.windows(2) {
            if w[0].1 as u128 + w[0].2 > w[1].1 as u128 {
                return Err(format!("the {} and {} sections overlap", w[0].0, w[1].0));
            }
        }
        if !(1..=MAX_TENSORS).contains(&tensors_n) {
            return Err(format!("num_tensors {tensors_n} is not in 1..={MAX_TENSORS}"));
        }
        let mut tensors = Vec::new();
        let mut end = 0u64;
        for i in 0..tensors_n {
            let at = off::TENSORS + i * TENSOR_ENTRY_BYTES;
            let text = |r: std::ops::Range<usize>| {
                let b = &bytes[r];
                let n = b.iter().position(|&c| c == 0).unwrap_or(b.len());
                String::from_utf8(b[..n].to_vec()).map_err(|_| format!("tensor {i}: a name or dtype is not UTF-8"))
            };
            let (name, dtype) = (text(at..at + 24)?, text(at + 24..at + 32)?);
            let (offset, tbytes, ndim) = (u64_at(at + 32), u64_at(at + 40), u32_at(at + 48));
            let dims: Vec<u32> = (0..ndim.min(2) as usize).map(|j| u32_at(at + 56 + 4 * j)).collect();
            let size = dtype_bytes(&dtype).ok_or_else(|| format!("tensor {i} ({name}): unknown dtype {dtype:?}"))?;
            if !(1..=2).contains(&ndim) {
                return Err(format!("tensor {i} ({name}): ndim {ndim} is not 1 or 2"));
            }
            let elems: u64 = dims.iter().map(|&d| d as u64).product();
            if elems.checked_mul(size) != Some(tbytes) || tbytes == 0 {
                return Err(format!("tensor {i} ({name}): {tbytes} bytes do not match {dims:?} x {dtype}"));
            }
            if offset % ALIGN != 0 || offset < end {
                return Err(format!(
                    "tensor {i} ({name}): offset {offset} is not a multiple of 64 after the previous tensor's end {end}"
                ));
            }
            end = offset.checked_add(tbytes).ok_or_else(|| {
                format!("tensor {i} ({name}): offset {offset} + {tbytes} bytes is past 2^64")
            })?;
            if end > l.expert_bytes as u64 {
                return Err(format!("tensor {i} ({name}) ends at {end}, past expert_bytes {}", l.expert_bytes));
            }
            tensors.push(TensorSpec { name, dtype, offset, bytes: tbytes, dims });
        }
        if round64(end) != l.expert_bytes as u64 {
            return Err(format!(
                "expert_bytes {} is not the end of the last tensor rounded up to 64 ({})",
                l.expert_bytes,
                round64(end)
            ));
        }
        if let Some(w) = &ipc_weights {
            w.check(layout.num_layers, layout.layer_bytes()).map_err(|e| format!("weights_kind 1 (CUDA IPC): {e}"))?;
        }
        Ok(Layout { tensors, ipc: ipc_weights, ..layout })
    }
}

/// The IPC section of a header.
fn parse_ipc(bytes: &[u8]) -> Result<IpcWeights, String> {
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let raw = &bytes[ipc::PCI_BUS_ID..ipc::PCI_BUS_ID + 16];
    let n = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
    let pci_bus_id = std::str::from_utf8(&raw[..n])
        .ok()
        .filter(|t| t.chars().all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.'))
        .ok_or("the IPC section's pci_bus_id is not a PCI bus id (like 0000:19:00.0)")?
        .to_string();
    let uuid: [u8; 16] = bytes[ipc::UUID..ipc::UUID + 16].try_into().expect("16 bytes");
    let count = u32_at(ipc::NUM_HANDLES) as usize;
    if !(1..=ipc::MAX_HANDLES).contains(&count) {
        return Err(format!("the IPC section has {count} handles (1 to {})", ipc::MAX_HANDLES));
    }
    let handles = (0..count)
        .map(|i| {
            let at = ipc::HANDLES + i * ipc::ENTRY_BYTES;
            IpcHandle {
                handle: bytes[at..at + 64].try_into().expect("64 bytes"),
                role: u32_at(at + 64),
                first_layer: u32_at(at + 68),
                offset: u64_at(at + 72),
                bytes: u64_at(at + 80),
            }
        })
        .collect();
    Ok(IpcWeights { pci_bus_id, uuid, handles })
}

/// The path of engine rank `rank`'s region named `name`.
pub fn region_path(name: &str, rank: usize) -> PathBuf {
    PathBuf::from(format!("/dev/shm/eplb-{name}-{rank}"))
}

/// What reading one step of the ring gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RingRead {
    /// The whole entry of the step: its phase, tokens, MoE time (ns, 0: not measured) and
    /// `counts [layers * slots_per_rank]`.
    Step { phase: u64, tokens: u64, moe_ns: u64, counts: Vec<u64> },
    /// The engine has not finished the step yet.
    NotYet,
    /// The entry was overwritten by a later step before it was read.
    Lost,
}

/// A mapped region.
pub struct Region {
    map: MmapRaw,
    _file: File,
    pub path: PathBuf,
    pub layout: Layout,
}

// SAFETY: every access to the shared bytes goes through atomics, volatile accesses under a
// sequence lock, or slices whose exclusive use the protocol guarantees (see `staging_mut`).
unsafe impl Send for Region {}
unsafe impl Sync for Region {}

impl Region {
    /// Maps the region at `path` (read-write, shared) and checks its header.
    pub fn open(path: &Path) -> Result<Region, RegionError> {
        let io = |source| RegionError::Io { path: path.to_path_buf(), source };
        let file = OpenOptions::new().read(true).write(true).open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len() as usize;
        if len < HEADER_BYTES {
            return Err(RegionError::Bad {
                path: path.into(),
                what: format!("{len} bytes: too short for the {HEADER_BYTES}-byte header"),
            });
        }
        let map = MmapRaw::map_raw(&file).map_err(io)?;
        // SAFETY: the mapping is at least HEADER_BYTES long; the header is written once, before
        // the engine renames the region into place.
        let header = unsafe { std::slice::from_raw_parts(map.as_ptr(), HEADER_BYTES) };
        let layout = Layout::parse(header, map.len()).map_err(|what| RegionError::Bad { path: path.into(), what })?;
        Ok(Region { map, _file: file, path: path.to_path_buf(), layout })
    }

    /// Creates a region file at `path` for `layout` (the engine side: header, zeros), written
    /// under a temporary name and renamed into place by [`Region::publish`].
    pub fn create(path: &Path, layout: &Layout, engine_pid: u64) -> Result<Region, RegionError> {
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let io = |source| RegionError::Io { path: tmp.clone(), source };
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(&tmp).map_err(io)?;
        file.set_len(layout.total_bytes as u64).map_err(io)?;
        let map = MmapRaw::map_raw(&file).map_err(io)?;
        let header = layout.header_bytes(engine_pid);
        // SAFETY: the mapping is total_bytes >= HEADER_BYTES long and nobody else has it yet.
        unsafe { std::ptr::copy_nonoverlapping(header.as_ptr(), map.as_mut_ptr(), HEADER_BYTES) };
        Ok(Region { map, _file: file, path: tmp, layout: layout.clone() })
    }

    /// Renames a region made by [`Region::create`] into `path`, where sidecars find it.
    pub fn publish(&mut self, path: &Path) -> Result<(), RegionError> {
        std::fs::rename(&self.path, path).map_err(|source| RegionError::Io { path: path.into(), source })?;
        self.path = path.to_path_buf();
        Ok(())
    }

    fn check(&self, at: usize, len: usize) {
        assert!(at.checked_add(len).is_some_and(|end| end <= self.map.len()), "region access out of bounds");
    }

    /// The atomic u64 at `at` (8-byte aligned: the mapping is page aligned, offsets are checked).
    pub fn atomic(&self, at: usize) -> &AtomicU64 {
        self.check(at, 8);
        assert_eq!(at % 8, 0, "unaligned atomic field");
        // SAFETY: in bounds, aligned, and the mapping lives as long as `self`.
        unsafe { &*(self.map.as_ptr().add(at) as *const AtomicU64) }
    }

    /// A plain u64 at `at`, read with a volatile load.
    pub fn read_u64(&self, at: usize) -> u64 {
        self.check(at, 8);
        // SAFETY: in bounds and aligned (every such field is at a multiple of 8).
        unsafe { std::ptr::read_volatile(self.map.as_ptr().add(at) as *const u64) }
    }

    /// A plain u64 at `at`, written with a volatile store.
    pub fn write_u64(&self, at: usize, v: u64) {
        self.check(at, 8);
        // SAFETY: in bounds and aligned.
        unsafe { std::ptr::write_volatile(self.map.as_mut_ptr().add(at) as *mut u64, v) }
    }

    fn read_i32(&self, at: usize) -> i32 {
        self.check(at, 4);
        // SAFETY: in bounds and aligned (i32 arrays start at multiples of 64).
        unsafe { std::ptr::read_volatile(self.map.as_ptr().add(at) as *const i32) }
    }

    fn write_i32(&self, at: usize, v: i32) {
        self.check(at, 4);
        // SAFETY: in bounds and aligned.
        unsafe { std::ptr::write_volatile(self.map.as_mut_ptr().add(at) as *mut i32, v) }
    }

    fn read_u8(&self, at: usize) -> u8 {
        self.check(at, 1);
        // SAFETY: in bounds.
        unsafe { std::ptr::read_volatile(self.map.as_ptr().add(at)) }
    }

    fn write_u8(&self, at: usize, v: u8) {
        self.check(at, 1);
        // SAFETY: in bounds.
        unsafe { std::ptr::write_volatile(self.map.as_mut_ptr().add(at), v) }
    }

    /// `len` bytes at `at`, shared. The caller guarantees nobody writes them meanwhile (the
    /// protocol: live weights change only in an apply the sidecar waits for).
    pub fn bytes(&self, at: usize, len: usize) -> &[u8] {
        self.check(at, len);
        // SAFETY: in bounds; see above for the absence of concurrent writes.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(at), len) }
    }

    /// `len` bytes at `at`, exclusive.
    ///
    /// # Safety
    /// No other slice of these bytes may be alive, in this process or another one, while the
    /// returned one is: the staging area between "free" and "post" of the switch protocol, or
    /// the engine side's own writes at a step boundary.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn bytes_mut(&self, at: usize, len: usize) -> &mut [u8] {
        self.check(at, len);
        std::slice::from_raw_parts_mut(self.map.as_mut_ptr().add(at), len)
    }

    /// The live weights of `layer`: `slots_per_rank * expert_bytes` bytes.
    pub fn live_offset(&self, layer: usize) -> usize {
        self.layout.weights_offset + layer * self.layout.slots_per_rank * self.layout.expert_bytes
    }

    pub fn staging_len(&self) -> usize {
        self.layout.slots_per_rank * self.layout.expert_bytes
    }

    /// `phy2log [num_layers, num_physical]`, as stored.
    pub fn phy2log(&self) -> Vec<i32> {
        let n = self.layout.num_layers * self.layout.num_physical();
        (0..n).map(|i| self.read_i32(self.layout.placement_offset + 4 * i)).collect()
    }

    /// Writes row `layer` of `phy2log` (the engine side, at a step boundary).
    pub fn write_phy2log_row(&self, layer: usize, row: &[i32]) {
        let p = self.layout.num_physical();
        for (i, &v) in row.iter().take(p).enumerate() {
            self.write_i32(self.layout.placement_offset + 4 * (layer * p + i), v);
        }
    }

    /// The atomic `epoch[layer]`.
    pub fn epoch(&self, layer: usize) -> &AtomicU64 {
        self.atomic(self.layout.epochs_offset + 8 * layer)
    }

    /// Reads step `t` of the load ring under its sequence lock. Never returns a torn entry.
    pub fn read_step(&self, t: u64) -> RingRead {
        if t >= self.atomic(off::ENGINE_STEP).load(Ordering::Acquire) {
            return RingRead::NotYet;
        }
        let l = &self.layout;
        let base = l.ring_offset + (t % l.ring_len as u64) as usize * l.ring_entry_bytes;
        let n = l.num_layers * l.slots_per_rank;
        let seq = self.atomic(base + off::ENTRY_SEQ);
        let mut counts = vec![0u64; n];
        let mut spins = 0u32;
        loop {
            let s1 = seq.load(Ordering::Acquire);
            if s1.is_multiple_of(2) {
                let step = self.read_u64(base + off::ENTRY_STEP);
                let phase = self.read_u64(base + off::ENTRY_PHASE);
                let tokens = self.read_u64(base + off::ENTRY_TOKENS);
                let moe_ns = self.read_u64(base + off::ENTRY_MOE_NS);
                for (i, c) in counts.iter_mut().enumerate() {
                    *c = self.read_u64(base + off::ENTRY_COUNTS + 8 * i);
                }
                fence(Ordering::Acquire);
                if seq.load(Ordering::Relaxed) == s1 {
                    return if step == t { RingRead::Step { phase, tokens, moe_ns, counts } } else { RingRead::Lost };
                }
            }
            spins += 1;
            if spins.is_multiple_of(64) {
                std::thread::yield_now();
            }
        }
    }

    /// Writes step `t` into the ring and publishes it (`engine_step = t + 1`): the engine side.
    /// `moe_ns`: the step's MoE time on this rank (0: not measured).
    pub fn write_step(&self, t: u64, phase: u64, tokens: u64, moe_ns: u64, counts: &[u64]) {
        let l = &self.layout;
        let base = l.ring_offset + (t % l.ring_len as u64) as usize * l.ring_entry_bytes;
        let seq = self.atomic(base + off::ENTRY_SEQ);
        let s = seq.load(Ordering::Relaxed);
        seq.store(s + 1, Ordering::Relaxed);
        fence(Ordering::Release);
        self.write_u64(base + off::ENTRY_STEP, t);
        self.write_u64(base + off::ENTRY_PHASE, phase);
        self.write_u64(base + off::ENTRY_TOKENS, tokens);
        self.write_u64(base + off::ENTRY_MOE_NS, moe_ns);
        for (i, &c) in counts.iter().take(l.num_layers * l.slots_per_rank).enumerate() {
            self.write_u64(base + off::ENTRY_COUNTS + 8 * i, c);
        }
        seq.store(s + 2, Ordering::Release);
        self.atomic(off::ENGINE_STEP).store(t + 1, Ordering::Release);
    }

    /// Posts a command under `cmd_seq` (the sidecar side).
    pub fn post(&self, cmd: &Command) {
        let seq = self.atomic(off::CMD_SEQ);
        let s = seq.load(Ordering::Relaxed) & !1;
        seq.store(s + 1, Ordering::Relaxed);
        fence(Ordering::Release);
        self.write_u64(off::CMD_ID, cmd.id);
        self.write_u64(off::CMD_LAYER, cmd.layer as u64);
        self.write_u64(off::CMD_APPLY_STEP, cmd.apply_step);
        self.write_u64(off::CMD_EPOCH, cmd.epoch);
        for (i, &e) in cmd.new_row.iter().enumerate() {
            self.write_i32(self.layout.command_offset + 4 * i, e);
        }
        for (k, &m) in cmd.copy_mask.iter().enumerate() {
            self.write_u8(self.layout.mask_offset() + k, u8::from(m));
        }
        seq.store(s + 2, Ordering::Release);
    }

    /// Reads the command under `cmd_seq` (the engine side), never waiting: None when there is
    /// none, when a post is under way (`cmd_seq` odd: a sidecar stopped in the middle of one would
    /// otherwise hang the engine), or when the read was disturbed 4 times.
    pub fn read_command(&self) -> Option<Command> {
        let seq = self.atomic(off::CMD_SEQ);
        for _ in 0..4 {
            let s1 = seq.load(Ordering::Acquire);
            if s1 % 2 == 1 {
                return None;
            }
            let id = self.read_u64(off::CMD_ID);
            let layer = self.read_u64(off::CMD_LAYER) as usize;
            let apply_step = self.read_u64(off::CMD_APPLY_STEP);
            let epoch = self.read_u64(off::CMD_EPOCH);
            let p = self.layout.num_physical();
            let new_row: Vec<i32> = (0..p).map(|i| self.read_i32(self.layout.command_offset + 4 * i)).collect();
            let copy_mask: Vec<bool> =
                (0..self.layout.slots_per_rank).map(|k| self.read_u8(self.layout.mask_offset() + k) != 0).collect();
            fence(Ordering::Acquire);
            if seq.load(Ordering::Relaxed) == s1 {
                return (id != 0).then_some(Command { id, layer, apply_step, epoch, new_row, copy_mask });
            }
        }
        None
    }

    /// The last answer: (`ack_id`, `ack_result`, `ack_step`); `ack_id` is read first (acquire),
    /// so the other two belong to it or a later one.
    pub fn ack(&self) -> (u64, u64, u64) {
        let id = self.atomic(off::ACK_ID).load(Ordering::Acquire);
        (id, self.atomic(off::ACK_RESULT).load(Ordering::Acquire), self.atomic(off::ACK_STEP).load(Ordering::Acquire))
    }

    /// Answers command `id` (the engine side): result and step first, then the id.
    pub fn answer(&self, id: u64, result: u64, step: u64) {
        self.atomic(off::ACK_RESULT).store(result, Ordering::Release);
        self.atomic(off::ACK_STEP).store(step, Ordering::Release);
        self.atomic(off::ACK_ID).store(id, Ordering::Release);
    }

    pub fn get(&self, field: usize) -> u64 {
        self.atomic(field).load(Ordering::Acquire)
    }

    pub fn set(&self, field: usize, v: u64) {
        self.atomic(field).store(v, Ordering::Release)
    }
}

/// A command of the mailbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub id: u64,
    pub layer: usize,
    /// Apply at the boundary before this engine step.
    pub apply_step: u64,
    /// The layer's epoch after the apply.
    pub epoch: u64,
    /// The layer's new `phy2log` row `[num_physical]`.
    pub new_row: Vec<i32>,
    /// `[slots_per_rank]`: live slot `s` takes staging slot `s`.
    pub copy_mask: Vec<bool>,
}

/// `CLOCK_MONOTONIC` in ns, the clock of the contract's heartbeats.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid out-pointer; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Whether process `pid` exists and has not exited (`kill(pid, 0)`, where a process we may not
/// signal exists too; a zombie, dead but not yet reaped by its parent, counts as gone).
pub fn pid_alive(pid: u64) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(pid, 0) };
    if rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
        return false;
    }
    // /proc/PID/stat: "pid (comm) S ...", the state after the last ')'.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            !matches!(stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next()), Some('Z' | 'X'))
        }
        Err(_) => true,
    }
}
