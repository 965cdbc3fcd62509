//! The shared-memory region of one engine rank (docs/engine-contract.md, version 2): its byte
//! layout, the header and tensor-table checks, and typed access for both sides (the sidecar here;
//! the engine side for tests and the Rust fake engine in [`super::writer`]).
//!
//! The header is one `#[repr(C)]` struct, [`Header`], whose field offsets are asserted at compile
//! time against the contract's table; both live in `eplb_client::layout` (the one definition the
//! C header `client/include/eplb_client.h` is generated from) and are re-exported here; the tensor table's
//! entries are [`TableEntryRaw`]s, 64 bytes each. Both are read and written as little-endian bytes,
//! never by casting the mapping, so a region from a corrupt or hostile engine is only ever data.
//!
//! The file is mapped with `memmap2::MmapRaw` (shared, read-write: the sidecar writes the
//! mailbox, the staging rows and its own header fields). Fields the contract marks atomic are
//! 8-byte aligned `u64`s accessed as [`AtomicU64`]; the other fields of a ring entry or a command
//! are read and written with volatile accesses between the loads and stores of their sequence
//! word, with acquire/release fences (a sequence lock).

use std::fs::{File, OpenOptions};
use std::mem::offset_of;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};

use eplb_client::core::mailbox::{self, CommandHead, Mailbox};
use eplb_client::core::ring::{self, EntryHead};

use memmap2::MmapRaw;
use thiserror::Error;

// The contract's layout is defined once, in the client crate (also the C header's source).
pub use eplb_client::layout::{
    ack, counts_kind, engine_state, ipc, off, phase, round64, sidecar_state, tensor_kind, weights_kind, Header,
    TableEntryRaw, DTYPES, HEADER_BYTES, MAGIC, MAX_TENSORS, MINOR_VERSION, MIN_RING_LEN, TENSOR_ENTRY_BYTES, VERSION,
};
const ALIGN: u64 = eplb_client::layout::EPLB_ALIGN as u64;

/// One CUDA IPC handle: one whole allocation of the engine's GPU memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpcHandle {
    /// The `cudaIpcMemHandle_t` (`cuIpcGetMemHandle`) of the allocation, from its base address.
    pub handle: [u8; 64],
    /// The allocation's size (`cuMemGetAddressRange`).
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
    /// Bytes of the section.
    pub fn section_bytes(&self) -> u64 {
        (ipc::HANDLES + ipc::ENTRY_BYTES * self.handles.len()) as u64
    }
}

/// Errors of a region: what is wrong with it, and where.
#[derive(Debug, Error)]
pub enum RegionError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {what}")]
    Bad { path: PathBuf, what: String },
}

/// One entry of the tensor table: where tensor `t` of one layer (or of the staging layer) is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: String,
    /// Host: byte offset from the start of the region; IPC: byte offset inside allocation `handle`.
    pub offset: u64,
    /// Bytes from one row to the next (≥ `row_bytes`).
    pub row_stride: u64,
    /// Bytes of one row that belong to its slot (what moves).
    pub row_bytes: u64,
    /// Per-expert: `slots_per_rank`; global: the global tensor's rows (0 in the staging layer).
    pub rows: u32,
    /// [`tensor_kind`].
    pub kind: u8,
    /// IPC handle index (weights_kind 1); 0 with host weights.
    pub handle: u16,
}

impl TensorEntry {
    /// Where row `r` starts.
    pub fn row_at(&self, r: usize) -> u64 {
        self.offset + r as u64 * self.row_stride
    }

    /// Its extent `[offset, offset + (rows - 1) * row_stride + row_bytes)` (empty without rows),
    /// in u128 so that no entry's numbers can overflow it.
    pub fn extent(&self) -> (u128, u128) {
        let start = self.offset as u128;
        if self.rows == 0 {
            return (start, start);
        }
        (start, start + (self.rows as u128 - 1) * self.row_stride as u128 + self.row_bytes as u128)
    }

    pub fn is_expert(&self) -> bool {
        self.kind == tensor_kind::EXPERT
    }
}

/// What an engine hands over for one tensor of a layer (the builder's input).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorDesc {
    pub name: String,
    pub dtype: String,
    pub row_bytes: u64,
    /// ≥ `row_bytes`.
    pub row_stride: u64,
    /// [`tensor_kind`].
    pub kind: u8,
    /// Rows of a global tensor (per-expert tensors have `slots_per_rank`).
    pub global_rows: u32,
}

impl TensorDesc {
    /// A per-expert tensor whose rows are `row_bytes` apart.
    pub fn expert(name: &str, dtype: &str, row_bytes: u64) -> TensorDesc {
        TensorDesc {
            name: name.into(),
            dtype: dtype.into(),
            row_bytes,
            row_stride: row_bytes,
            kind: tensor_kind::EXPERT,
            global_rows: 0,
        }
    }

    /// The same with a row stride larger than the row (padded rows).
    pub fn strided(self, row_stride: u64) -> TensorDesc {
        TensorDesc { row_stride, ..self }
    }

    /// A global tensor of `rows` rows.
    pub fn global(name: &str, dtype: &str, row_bytes: u64, rows: u32) -> TensorDesc {
        TensorDesc {
            name: name.into(),
            dtype: dtype.into(),
            row_bytes,
            row_stride: row_bytes,
            kind: tensor_kind::GLOBAL,
            global_rows: rows,
        }
    }
}

/// Where everything is in a region: the header's numbers, the tensor table and the IPC section.
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
    /// [`counts_kind`].
    pub counts_kind: u32,
    /// The CUDA IPC section (`weights_kind` 1).
    pub ipc: Option<IpcWeights>,
    pub num_tensors: usize,
    /// `(num_layers + 1) * num_tensors` entries: entry `layer * num_tensors + t`; the entries of
    /// `layer = num_layers` are the staging area's.
    pub tensors: Vec<TensorEntry>,
    pub total_bytes: usize,
    pub ring_offset: usize,
    pub ring_entry_bytes: usize,
    pub placement_offset: usize,
    pub epochs_offset: usize,
    pub command_offset: usize,
    pub table_offset: usize,
    pub ipc_offset: usize,
}

/// The shape of a region, before its tensors are placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub num_layers: usize,
    pub slots_per_rank: usize,
    pub num_logical: usize,
    pub world_size: usize,
    pub rank: usize,
    pub ring_len: usize,
    /// [`counts_kind`].
    pub counts_kind: u32,
}

impl Layout {
    /// The sections before the tensors, packed in the contract's order (header, ring, placement,
    /// epochs, command, table, IPC section), each at a multiple of 64; the tensors and the
    /// region's end are the caller's.
    fn skeleton(s: &Shape, num_tensors: usize, ipc: Option<IpcWeights>) -> Layout {
        let (l, spr, p) = (s.num_layers as u64, s.slots_per_rank as u64, (s.world_size * s.slots_per_rank) as u64);
        let cols = if s.counts_kind == counts_kind::PHYSICAL { p } else { spr };
        let ring_entry_bytes = 64 + round64(8 * l * cols);
        let ring_offset = HEADER_BYTES as u64;
        let placement_offset = ring_offset + s.ring_len as u64 * ring_entry_bytes;
        let epochs_offset = placement_offset + round64(4 * l * p);
        let command_offset = epochs_offset + round64(8 * l);
        let table_offset = command_offset + round64(4 * p) + round64(spr);
        let table_end = table_offset + round64(((l + 1) as usize * num_tensors * TENSOR_ENTRY_BYTES) as u64);
        let (ipc_offset, end) = match &ipc {
            Some(w) => (table_end, table_end + round64(w.section_bytes())),
            None => (0, table_end),
        };
        Layout {
            num_layers: s.num_layers,
            slots_per_rank: s.slots_per_rank,
            num_logical: s.num_logical,
            world_size: s.world_size,
            rank: s.rank,
            ring_len: s.ring_len,
            expert_bytes: 0,
            weights_kind: if ipc.is_some() { weights_kind::CUDA_IPC } else { weights_kind::HOST },
            counts_kind: s.counts_kind,
            ipc,
            num_tensors,
            tensors: Vec::new(),
            total_bytes: end as usize,
            ring_offset: ring_offset as usize,
            ring_entry_bytes: ring_entry_bytes as usize,
            placement_offset: placement_offset as usize,
            epochs_offset: epochs_offset as usize,
            command_offset: command_offset as usize,
            table_offset: table_offset as usize,
            ipc_offset: ipc_offset as usize,
        }
    }

    /// A host region (what the reference client writes): the sections, then for every layer
    /// every tensor, then the staging tensors (per-expert ones only), each at a multiple of 64.
    pub fn host(shape: &Shape, tensors: &[TensorDesc]) -> Layout {
        let mut l = Layout::skeleton(shape, tensors.len(), None);
        let mut end = l.total_bytes as u64;
        for layer in 0..=shape.num_layers {
            let staging = layer == shape.num_layers;
            for d in tensors {
                let rows = if d.kind == tensor_kind::EXPERT { shape.slots_per_rank as u32 } else { d.global_rows };
                let (offset, row_stride, rows) = if staging && d.kind != tensor_kind::EXPERT {
                    (0, 0, 0)
                } else {
                    let at = round64(end);
                    end = at + (rows.max(1) as u64 - 1) * d.row_stride + d.row_bytes;
                    (at, d.row_stride, rows)
                };
                l.tensors.push(TensorEntry {
                    name: d.name.clone(),
                    dtype: d.dtype.clone(),
                    offset,
                    row_stride,
                    row_bytes: d.row_bytes,
                    rows,
                    kind: d.kind,
                    handle: 0,
                });
            }
        }
        l.total_bytes = round64(end) as usize;
        l.expert_bytes = expert_bytes_of(tensors.iter().filter(|d| d.kind == tensor_kind::EXPERT).map(|d| d.row_bytes));
        l
    }

    /// A host region of one contiguous per-expert tensor a layer (`[slots_per_rank, expert_bytes]`).
    pub fn contiguous(shape: &Shape, expert_bytes: u64) -> Layout {
        Layout::host(shape, &[TensorDesc::expert("w", "u8", expert_bytes)])
    }

    /// A region whose tensors are in the engine's GPU memory (weights_kind 1): `entries` as the
    /// engine describes them (handle indices and offsets into `ipc`'s allocations).
    pub fn cuda_ipc(shape: &Shape, entries: Vec<TensorEntry>, ipc: IpcWeights) -> Layout {
        let t = entries.len() / (shape.num_layers + 1).max(1);
        let mut l = Layout::skeleton(shape, t, Some(ipc));
        l.expert_bytes = expert_bytes_of(entries.iter().take(t).filter(|e| e.is_expert()).map(|e| e.row_bytes));
        l.tensors = entries;
        l
    }

    pub fn num_physical(&self) -> usize {
        self.world_size * self.slots_per_rank
    }

    /// Columns of a ring entry's counts: `slots_per_rank` or `num_physical` ([`counts_kind`]).
    pub fn count_cols(&self) -> usize {
        if self.counts_kind == counts_kind::PHYSICAL {
            self.num_physical()
        } else {
            self.slots_per_rank
        }
    }

    /// Offset of `copy_mask [slots_per_rank]` u8, after `new_row [num_physical]` i32.
    pub fn mask_offset(&self) -> usize {
        self.command_offset + round64(4 * self.num_physical() as u64) as usize
    }

    /// The end of the command area (row and mask).
    pub fn command_end(&self) -> usize {
        self.mask_offset() + self.slots_per_rank
    }

    /// Entry `t` of `layer` (`layer == num_layers`: the staging area).
    pub fn entry(&self, layer: usize, t: usize) -> &TensorEntry {
        &self.tensors[layer * self.num_tensors + t]
    }

    /// The indices `t` of the per-expert tensors, in table order.
    pub fn expert_tensors(&self) -> Vec<usize> {
        (0..self.num_tensors).filter(|&t| self.tensors[t].is_expert()).collect()
    }

    /// The indices `t` of the global tensors, in table order.
    pub fn global_tensors(&self) -> Vec<usize> {
        (0..self.num_tensors).filter(|&t| self.tensors[t].kind == tensor_kind::GLOBAL).collect()
    }

    /// Names a table entry for a message: `layer 3, tensor 1 (w2_weight)` or `the staging layer, ...`.
    pub fn entry_name(&self, index: usize) -> String {
        let (layer, t) = (index / self.num_tensors.max(1), index % self.num_tensors.max(1));
        let name = self.tensors.get(index).map_or("?", |e| e.name.as_str());
        if layer == self.num_layers {
            format!("the staging layer, tensor {t} ({name})")
        } else {
            format!("layer {layer}, tensor {t} ({name})")
        }
    }

    /// The sections as (name, offset, bytes).
    fn sections(&self) -> Vec<(&'static str, usize, u128)> {
        let (l, s, p) = (self.num_layers as u128, self.slots_per_rank as u128, self.num_physical() as u128);
        let mut v = vec![
            ("header", 0, HEADER_BYTES as u128),
            ("ring", self.ring_offset, self.ring_len as u128 * self.ring_entry_bytes as u128),
            ("placement", self.placement_offset, 4 * l * p),
            ("epochs", self.epochs_offset, 8 * l),
            // In u128 like the rest: 4 x num_physical overflows u64 for a hostile world_size x
            // slots_per_rank (the header's u32 fields; found by fuzzing).
            ("command", self.command_offset, (4 * p).div_ceil(64) * 64 + s),
            ("tensor table", self.table_offset, (l + 1) * self.num_tensors as u128 * TENSOR_ENTRY_BYTES as u128),
        ];
        if let Some(w) = &self.ipc {
            v.push(("IPC", self.ipc_offset, w.section_bytes() as u128));
        }
        v
    }

    /// The header bytes of this layout (the engine side writes them; tests corrupt them). Each
    /// field is written once, from the layout, at its contract offset (`off::*`, asserted against
    /// [`Header`]'s fields): the `u32` fields, then the `u64` ones; the atomic fields the engine
    /// sets later, and the rest of the 4096 bytes, are 0.
    pub fn header_bytes(&self, engine_pid: u64) -> Vec<u8> {
        let num_handles = self.ipc.as_ref().map_or(0, |w| w.handles.len() as u32);
        let mut out = vec![0u8; HEADER_BYTES];
        let mut put = |at: usize, bytes: &[u8]| out[at..at + bytes.len()].copy_from_slice(bytes);
        put(off::MAGIC, &MAGIC.to_le_bytes());
        for (at, v) in [
            (off::VERSION, VERSION),
            (off::HEADER_BYTES, HEADER_BYTES as u32),
            (off::NUM_LAYERS, self.num_layers as u32),
            (off::SLOTS_PER_RANK, self.slots_per_rank as u32),
            (off::NUM_LOGICAL, self.num_logical as u32),
            (off::WORLD_SIZE, self.world_size as u32),
            (off::RANK, self.rank as u32),
            (off::RING_LEN, self.ring_len as u32),
            (off::NUM_TENSORS, self.num_tensors as u32),
            (off::WEIGHTS_KIND, self.weights_kind),
            (off::MINOR_VERSION, MINOR_VERSION),
            (off::COUNTS_KIND, self.counts_kind),
            (off::NUM_HANDLES, num_handles),
        ] {
            put(at, &v.to_le_bytes());
        }
        for (at, v) in [
            (off::EXPERT_BYTES, self.expert_bytes as u64),
            (off::TOTAL_BYTES, self.total_bytes as u64),
            (off::RING_OFFSET, self.ring_offset as u64),
            (off::RING_ENTRY_BYTES, self.ring_entry_bytes as u64),
            (off::PLACEMENT_OFFSET, self.placement_offset as u64),
            (off::EPOCHS_OFFSET, self.epochs_offset as u64),
            (off::COMMAND_OFFSET, self.command_offset as u64),
            (off::TABLE_OFFSET, self.table_offset as u64),
            (off::IPC_OFFSET, self.ipc_offset as u64),
            (off::ENGINE_PID, engine_pid),
        ] {
            put(at, &v.to_le_bytes());
        }
        out
    }

    /// The tensor table's bytes (at `table_offset`).
    pub fn table_bytes(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.tensors.len() * TENSOR_ENTRY_BYTES];
        for (i, e) in self.tensors.iter().enumerate() {
            let at = i * TENSOR_ENTRY_BYTES;
            let mut put = |o: usize, bytes: &[u8]| out[at + o..at + o + bytes.len()].copy_from_slice(bytes);
            let name = e.name.as_bytes();
            put(0, &name[..name.len().min(24)]);
            let dtype = e.dtype.as_bytes();
            put(24, &dtype[..dtype.len().min(8)]);
            put(offset_of!(TableEntryRaw, offset), &e.offset.to_le_bytes());
            put(offset_of!(TableEntryRaw, row_stride), &e.row_stride.to_le_bytes());
            put(offset_of!(TableEntryRaw, row_bytes), &e.row_bytes.to_le_bytes());
            put(offset_of!(TableEntryRaw, rows), &e.rows.to_le_bytes());
            put(offset_of!(TableEntryRaw, kind), &[e.kind]);
            put(offset_of!(TableEntryRaw, handle), &e.handle.to_le_bytes());
        }
        out
    }

    /// The IPC section's bytes (at `ipc_offset`; empty with host weights).
    pub fn ipc_bytes(&self) -> Vec<u8> {
        let Some(w) = &self.ipc else { return Vec::new() };
        let mut out = vec![0u8; w.section_bytes() as usize];
        let bus = w.pci_bus_id.as_bytes();
        out[ipc::PCI_BUS_ID..ipc::PCI_BUS_ID + bus.len().min(15)].copy_from_slice(&bus[..bus.len().min(15)]);
        out[ipc::UUID..ipc::UUID + 16].copy_from_slice(&w.uuid);
        for (i, h) in w.handles.iter().enumerate() {
            let at = ipc::HANDLES + i * ipc::ENTRY_BYTES;
            out[at..at + 64].copy_from_slice(&h.handle);
            out[at + ipc::ENTRY_SIZE..at + ipc::ENTRY_SIZE + 8].copy_from_slice(&h.bytes.to_le_bytes());
        }
        out
    }

    /// Parses and checks a region (`bytes`: the whole region, or at least its header, table and
    /// IPC section; `file_len`: the region's size). Every error says what is wrong, and for the
    /// tensor table, which layer, tensor and field.
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
                "contract version {version}, but this eplb-worker speaks version {VERSION}: use an engine client of contract version {VERSION} (eplb_client and eplb-worker of the same release)"
            ));
        }
        if u32_at(off::HEADER_BYTES) as usize != HEADER_BYTES {
            return Err(format!("header_bytes {} (want {HEADER_BYTES})", u32_at(off::HEADER_BYTES)));
        }
        let to_usize = |v: u64, what: &str| usize::try_from(v).map_err(|_| format!("{what} {v} is too large"));
        let num_tensors = u32_at(off::NUM_TENSORS) as usize;
        let layout = Layout {
            num_layers: u32_at(off::NUM_LAYERS) as usize,
            slots_per_rank: u32_at(off::SLOTS_PER_RANK) as usize,
            num_logical: u32_at(off::NUM_LOGICAL) as usize,
            world_size: u32_at(off::WORLD_SIZE) as usize,
            rank: u32_at(off::RANK) as usize,
            ring_len: u32_at(off::RING_LEN) as usize,
            expert_bytes: to_usize(u64_at(off::EXPERT_BYTES), "expert_bytes")?,
            weights_kind: u32_at(off::WEIGHTS_KIND),
            counts_kind: u32_at(off::COUNTS_KIND),
            ipc: None,
            num_tensors,
            tensors: Vec::new(),
            total_bytes: to_usize(u64_at(off::TOTAL_BYTES), "total_bytes")?,
            ring_offset: to_usize(u64_at(off::RING_OFFSET), "ring_offset")?,
            ring_entry_bytes: to_usize(u64_at(off::RING_ENTRY_BYTES), "ring_entry_bytes")?,
            placement_offset: to_usize(u64_at(off::PLACEMENT_OFFSET), "placement_offset")?,
            epochs_offset: to_usize(u64_at(off::EPOCHS_OFFSET), "epochs_offset")?,
            command_offset: to_usize(u64_at(off::COMMAND_OFFSET), "command_offset")?,
            table_offset: to_usize(u64_at(off::TABLE_OFFSET), "table_offset")?,
            ipc_offset: to_usize(u64_at(off::IPC_OFFSET), "ipc_offset")?,
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
        if l.counts_kind > counts_kind::PHYSICAL {
            return Err(format!(
                "counts_kind {}: this eplb-worker knows per-local-slot counts (0) and per-physical-slot counts (1)",
                l.counts_kind
            ));
        }
        if !(1..=MAX_TENSORS).contains(&num_tensors) {
            return Err(format!("num_tensors {num_tensors} is not in 1..={MAX_TENSORS}"));
        }
        let num_handles = u32_at(off::NUM_HANDLES) as usize;
        match l.weights_kind {
            weights_kind::HOST if num_handles != 0 || l.ipc_offset != 0 => {
                return Err(format!(
                    "weights_kind 0 (host) with num_handles {num_handles} and ipc_offset {}: both must be 0",
                    l.ipc_offset
                ))
            }
            weights_kind::HOST => {}
            weights_kind::CUDA_IPC if !(1..=ipc::MAX_HANDLES).contains(&num_handles) => {
                return Err(format!(
                    "weights_kind 1 (CUDA IPC): num_handles {num_handles} is not in 1..={}",
                    ipc::MAX_HANDLES
                ))
            }
            weights_kind::CUDA_IPC => {}
            k => {
                return Err(format!(
                    "weights_kind {k}: this eplb-worker knows host weights (0) and CUDA IPC handles (1)"
                ))
            }
        }
        // In u128: 8 x num_layers x count_cols of u32 fields overflows u64 (found by fuzzing).
        let want_entry = 64 + (8 * l.num_layers as u128 * l.count_cols() as u128).div_ceil(64) * 64;
        if l.ring_entry_bytes as u128 != want_entry {
            return Err(format!(
                "ring_entry_bytes {} (want {want_entry} for this shape and counts_kind {})",
                l.ring_entry_bytes, l.counts_kind
            ));
        }
        if l.total_bytes != file_len {
            return Err(format!("total_bytes {} but the region has {file_len} bytes", l.total_bytes));
        }
        let mut sections = l.sections();
        if l.weights_kind == weights_kind::CUDA_IPC {
            let n = num_handles as u128;
            sections.push(("IPC", l.ipc_offset, (ipc::HANDLES as u128) + n * ipc::ENTRY_BYTES as u128));
        }
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
        let sections_end = sections.iter().map(|&(_, at, len)| at as u128 + len).max().unwrap_or(0);
        sections.sort_by_key(|s| s.1);
        for w in sections.windows(2) {
            if w[0].1 as u128 + w[0].2 > w[1].1 as u128 {
                return Err(format!("the {} and {} sections overlap", w[0].0, w[1].0));
            }
        }
        if bytes.len() < sections_end as usize {
            return Err(format!("{} bytes read, but the sections end at {sections_end}", bytes.len()));
        }
        let ipc_weights = match l.weights_kind {
            weights_kind::CUDA_IPC => Some(
                parse_ipc(&bytes[l.ipc_offset..], num_handles)
                    .map_err(|e| format!("weights_kind 1 (CUDA IPC): {e}"))?,
            ),
            _ => None,
        };
        let entries = (l.num_layers + 1) * num_tensors;
        let tensors = (0..entries)
            .map(|i| parse_entry(&bytes[l.table_offset + i * TENSOR_ENTRY_BYTES..][..TENSOR_ENTRY_BYTES]))
            .collect::<Vec<_>>();
        let parsed = Layout { tensors: Vec::new(), ipc: ipc_weights, ..layout };
        let mut checked = parsed.clone();
        let mut list = Vec::with_capacity(entries);
        for (i, e) in tensors.into_iter().enumerate() {
            list.push(e.map_err(|what| format!("tensor table: {}: {what}", parsed.entry_name_raw(i)))?);
        }
        checked.tensors = list;
        checked.check_table(sections_end)?;
        Ok(checked)
    }

    /// [`Layout::entry_name`] before the names are parsed.
    fn entry_name_raw(&self, index: usize) -> String {
        let (layer, t) = (index / self.num_tensors, index % self.num_tensors);
        if layer == self.num_layers {
            format!("the staging layer, tensor {t}")
        } else {
            format!("layer {layer}, tensor {t}")
        }
    }

    /// The contract's table rules; an error names the layer, the tensor and the field.
    fn check_table(&self, sections_end: u128) -> Result<(), String> {
        let t_n = self.num_tensors;
        let fail = |i: usize, what: String| Err(format!("tensor table: {}: {what}", self.entry_name(i)));
        // Names unique inside a layer (layer 0; the others must repeat layer 0's).
        for t in 0..t_n {
            if self.tensors[..t].iter().any(|e| e.name == self.tensors[t].name) {
                return fail(t, format!("name {:?} is used twice in the layer", self.tensors[t].name));
            }
        }
        for (i, e) in self.tensors.iter().enumerate() {
            let (layer, t) = (i / t_n, i % t_n);
            let first = &self.tensors[t];
            if e.name.is_empty() {
                return fail(i, "name is empty".into());
            }
            if e.dtype.is_empty() || !e.dtype.is_ascii() {
                return fail(
                    i,
                    format!("dtype {:?} is not an ASCII dtype name (such as {})", e.dtype, DTYPES.join(" ")),
                );
            }
            for (field, same) in [
                ("name", e.name == first.name),
                ("dtype", e.dtype == first.dtype),
                ("kind", e.kind == first.kind),
                ("row_bytes", e.row_bytes == first.row_bytes),
            ] {
                if !same {
                    return fail(
                        i,
                        format!(
                            "{field} differs from layer 0's ({:?} vs {:?}): every layer and the staging layer list the same tensors",
                            field_text(e, field),
                            field_text(first, field)
                        ),
                    );
                }
            }
            if e.handle != 0 && self.weights_kind == weights_kind::HOST {
                return fail(i, format!("handle {} with host weights (must be 0)", e.handle));
            }
            let staging = layer == self.num_layers;
            match e.kind {
                tensor_kind::EXPERT => {
                    if e.rows as usize != self.slots_per_rank {
                        return fail(
                            i,
                            format!(
                                "rows {} of a per-expert tensor differ from slots_per_rank {} (list only the routed slots)",
                                e.rows, self.slots_per_rank
                            ),
                        );
                    }
                }
                tensor_kind::GLOBAL if staging => {
                    if e.offset != 0 || e.row_stride != 0 || e.rows != 0 {
                        return fail(
                            i,
                            format!(
                                "a global tensor has no staging: offset, row_stride and rows must be 0 (are {}, {}, {})",
                                e.offset, e.row_stride, e.rows
                            ),
                        );
                    }
                    continue;
                }
                tensor_kind::GLOBAL => {
                    if e.rows == 0 {
                        return fail(i, "rows 0 of a global tensor (at least 1)".into());
                    }
                }
                k => return fail(i, format!("kind {k} (1 per-expert, 2 global)")),
            }
            if e.row_bytes == 0 {
                return fail(i, "row_bytes 0".into());
            }
            if e.row_stride < e.row_bytes {
                return fail(i, format!("row_stride {} < row_bytes {}", e.row_stride, e.row_bytes));
            }
            let (start, end) = e.extent();
            match &self.ipc {
                None => {
                    let total = self.total_bytes as u128;
                    if start < sections_end || end > total {
                        return fail(
                            i,
                            format!(
                                "offset {}: its extent [{start}, {end}) lies outside the tensor area [{sections_end}, {total}) of the region",
                                e.offset
                            ),
                        );
                    }
                }
                Some(w) => {
                    let Some(h) = w.handles.get(e.handle as usize) else {
                        return fail(i, format!("handle {} is not below num_handles {}", e.handle, w.handles.len()));
                    };
                    if end > h.bytes as u128 {
                        return fail(
                            i,
                            format!(
                                "offset {}: its extent [{start}, {end}) lies outside allocation {} of {} bytes",
                                e.offset, e.handle, h.bytes
                            ),
                        );
                    }
                }
            }
        }
        if !self.tensors[..t_n].iter().any(TensorEntry::is_expert) {
            return Err("tensor table: no per-expert tensor (kind 1): nothing could move".into());
        }
        let want = self.tensors[..t_n].iter().filter(|e| e.is_expert()).map(|e| e.row_bytes as u128).sum::<u128>();
        if self.expert_bytes as u128 != want {
            return Err(format!(
                "expert_bytes {} is not the sum of the per-expert tensors' row_bytes ({want})",
                self.expert_bytes
            ));
        }
        // No two extents overlap (inside one allocation, for IPC weights).
        let mut spans: Vec<(u16, u128, u128, usize)> = self
            .tensors
            .iter()
            .enumerate()
            .filter(|(_, e)| e.rows > 0)
            .map(|(i, e)| {
                let (s, end) = e.extent();
                (e.handle, s, end, i)
            })
            .collect();
        spans.sort_unstable();
        for w in spans.windows(2) {
            if w[0].0 == w[1].0 && w[0].2 > w[1].1 {
                let place = if self.ipc.is_some() { format!(" in allocation {}", w[0].0) } else { String::new() };
                return fail(
                    w[1].3,
                    format!(
                        "offset {}: its extent overlaps {}'s{place} ([{}, {}) and [{}, {}))",
                        self.tensors[w[1].3].offset,
                        self.entry_name(w[0].3),
                        w[0].1,
                        w[0].2,
                        w[1].1,
                        w[1].2
                    ),
                );
            }
        }
        Ok(())
    }
}

/// The sum of per-expert row sizes.
fn expert_bytes_of(rows: impl Iterator<Item = u64>) -> usize {
    rows.sum::<u64>() as usize
}

fn field_text(e: &TensorEntry, field: &str) -> String {
    match field {
        "name" => e.name.clone(),
        "dtype" => e.dtype.clone(),
        "kind" => e.kind.to_string(),
        _ => e.row_bytes.to_string(),
    }
}

/// One table entry from its 64 bytes.
fn parse_entry(b: &[u8]) -> Result<TensorEntry, String> {
    let text = |r: std::ops::Range<usize>, what: &str| {
        let s = &b[r];
        let n = s.iter().position(|&c| c == 0).unwrap_or(s.len());
        String::from_utf8(s[..n].to_vec()).map_err(|_| format!("{what} is not UTF-8"))
    };
    let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
    Ok(TensorEntry {
        name: text(0..24, "name")?,
        dtype: text(24..32, "dtype")?,
        offset: u64_at(offset_of!(TableEntryRaw, offset)),
        row_stride: u64_at(offset_of!(TableEntryRaw, row_stride)),
        row_bytes: u64_at(offset_of!(TableEntryRaw, row_bytes)),
        rows: u32::from_le_bytes(b[56..60].try_into().expect("4 bytes")),
        kind: b[offset_of!(TableEntryRaw, kind)],
        handle: u16::from_le_bytes(b[62..64].try_into().expect("2 bytes")),
    })
}

/// The IPC section at the start of `bytes`.
fn parse_ipc(bytes: &[u8], count: usize) -> Result<IpcWeights, String> {
    let raw = &bytes[ipc::PCI_BUS_ID..ipc::PCI_BUS_ID + 16];
    let n = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
    let pci_bus_id = std::str::from_utf8(&raw[..n])
        .ok()
        .filter(|t| !t.is_empty() && t.chars().all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.'))
        .ok_or("the IPC section's pci_bus_id is not a PCI bus id (like 0000:19:00.0)")?
        .to_string();
    let uuid: [u8; 16] = bytes[ipc::UUID..ipc::UUID + 16].try_into().expect("16 bytes");
    let handles = (0..count)
        .map(|i| {
            let at = ipc::HANDLES + i * ipc::ENTRY_BYTES;
            let size = u64::from_le_bytes(bytes[at + ipc::ENTRY_SIZE..at + ipc::ENTRY_SIZE + 8].try_into().expect("8"));
            if size == 0 {
                return Err(format!("IPC handle {i}: bytes 0 (the allocation's size)"));
            }
            Ok(IpcHandle { handle: bytes[at..at + 64].try_into().expect("64 bytes"), bytes: size })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(IpcWeights { pci_bus_id, uuid, handles })
}

/// Whether a region file may be trusted: a regular file, owned by this process's user, not
/// writable by the group or others. The sidecar writes the engine's weights from what the
/// region says: a file another user can write could steer those writes, and one owned by
/// another user is another job's.
fn trusted(meta: &std::fs::Metadata) -> Result<(), String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let t = meta.file_type();
    if !t.is_file() {
        let what = if t.is_fifo() {
            "a FIFO"
        } else if t.is_dir() {
            "a folder"
        } else if t.is_char_device() || t.is_block_device() {
            "a device"
        } else {
            "not a regular file"
        };
        return Err(format!("is {what}, not an engine region"));
    }
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(format!(
            "is owned by uid {}, but this sidecar runs as uid {me}: run the sidecar as the engine's user",
            meta.uid()
        ));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(format!(
            "has mode {mode:04o}: writable by the group or others, so anyone could steer the sidecar's writes; the engine creates it 0600 (chmod go-w, or restart the engine)"
        ));
    }
    Ok(())
}

/// The path of engine rank `rank`'s region named `name`.
pub fn region_path(name: &str, rank: usize) -> PathBuf {
    PathBuf::from(format!("/dev/shm/eplb-{name}-{rank}"))
}

/// What reading one step of the ring gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RingRead {
    /// The whole entry of the step: its phase, tokens, MoE time (ns, 0: not measured) and
    /// `counts [layers * count_cols]`.
    Step { phase: u64, tokens: u64, moe_ns: u64, counts: Vec<u64> },
    /// The engine has not finished the step yet.
    NotYet,
    /// The entry was overwritten by a later step before it was read.
    Lost,
    /// The entry's sequence word stayed odd (being written) for [`SEQLOCK_SPINS`] tries: the
    /// caller watches the engine and a deadline, then tries again (an engine that left the entry
    /// half written must not hold the sidecar forever).
    Busy,
}

/// Tries of a sequence lock before [`Region::read_step`] gives up for now ([`RingRead::Busy`]):
/// an engine writes an entry in microseconds, so a longer odd spell is a stopped, dead or broken
/// writer, which only the caller's watch can tell apart (the core's bound).
pub use eplb_client::core::ring::SEQLOCK_SPINS;

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
        // No symlink (O_NOFOLLOW) and no blocking open of a FIFO (O_NONBLOCK): the checks below
        // look at the very file opened.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| match source.raw_os_error() {
                Some(libc::ELOOP) => RegionError::Bad {
                    path: path.into(),
                    what: "is a symbolic link: a region is a file the engine created at this very path".into(),
                },
                _ => io(source),
            })?;
        let meta = file.metadata().map_err(io)?;
        trusted(&meta).map_err(|what| RegionError::Bad { path: path.into(), what })?;
        let len = meta.len() as usize;
        if len < HEADER_BYTES {
            return Err(RegionError::Bad {
                path: path.into(),
                what: format!("{len} bytes: too short for the {HEADER_BYTES}-byte header"),
            });
        }
        let map = MmapRaw::map_raw(&file).map_err(io)?;
        // SAFETY: the mapping is at least HEADER_BYTES long; the header, the tensor table and the
        // IPC section are written once, before the engine renames the region into place.
        let header = unsafe { std::slice::from_raw_parts(map.as_ptr(), map.len()) };
        let layout = Layout::parse(header, map.len()).map_err(|what| RegionError::Bad { path: path.into(), what })?;
        Ok(Region { map, _file: file, path: path.to_path_buf(), layout })
    }

    /// Creates a region file at `path` for `layout` (the engine side: header, zeros), written
    /// under a temporary name and renamed into place by [`Region::publish`].
    pub fn create(path: &Path, layout: &Layout, engine_pid: u64) -> Result<Region, RegionError> {
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let io = |source| RegionError::Io { path: tmp.clone(), source };
        let file = OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(&tmp).map_err(io)?;
        file.set_len(layout.total_bytes as u64).map_err(io)?;
        let map = MmapRaw::map_raw(&file).map_err(io)?;
        let header = layout.header_bytes(engine_pid);
        let (table, ipc) = (layout.table_bytes(), layout.ipc_bytes());
        // SAFETY: the mapping is total_bytes long, which holds the header, the table and the IPC
        // section (the layout's sections), and nobody else has it yet.
        unsafe {
            std::ptr::copy_nonoverlapping(header.as_ptr(), map.as_mut_ptr(), HEADER_BYTES);
            std::ptr::copy_nonoverlapping(table.as_ptr(), map.as_mut_ptr().add(layout.table_offset), table.len());
            std::ptr::copy_nonoverlapping(ipc.as_ptr(), map.as_mut_ptr().add(layout.ipc_offset), ipc.len());
        }
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

    /// Row `slot` of table entry `t` of `layer` (`layer == num_layers`: the staging area), host
    /// weights: `(offset in the region, row_bytes)`.
    pub fn row(&self, layer: usize, t: usize, slot: usize) -> (usize, usize) {
        let e = self.layout.entry(layer, t);
        (e.row_at(slot) as usize, e.row_bytes as usize)
    }

    /// `table_fault`: 0, or `1 + i` for a re-allocated table entry `i`.
    pub fn table_fault(&self) -> u64 {
        self.get(off::TABLE_FAULT)
    }

    /// `phy2log [num_layers, num_physical]`, as stored.
    pub fn phy2log(&self) -> Vec<i32> {
        let n = self.layout.num_layers * self.layout.num_physical();
        let mut out = vec![0i32; n];
        mailbox::read_row(self.u32s(self.layout.placement_offset, n), &mut out);
        out
    }

    /// Writes row `layer` of `phy2log` (the engine side: before publishing, or at a step
    /// boundary followed by the epoch's release store, [`mailbox::publish_placement`]).
    pub fn write_phy2log_row(&self, layer: usize, row: &[i32]) {
        let p = self.layout.num_physical();
        for (w, &v) in self.u32s(self.layout.placement_offset + 4 * layer * p, p).iter().zip(row) {
            w.store(v as u32, Ordering::Relaxed);
        }
    }

    /// The engine side of an apply's publication: `layer`'s row, then its epoch (release), the
    /// core's [`mailbox::publish_placement`].
    pub fn publish_placement(&self, layer: usize, row: &[i32], epoch: u64) {
        let p = self.layout.num_physical();
        mailbox::publish_placement(
            self.u32s(self.layout.placement_offset + 4 * layer * p, p),
            self.epoch(layer),
            row,
            epoch,
        );
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
        let n = l.num_layers * l.count_cols();
        let mut counts = vec![0u64; n];
        match ring::read(self.u64s(base, ring::HEAD_WORDS + n), &mut counts) {
            Some(head) if head.step == t => {
                RingRead::Step { phase: head.phase, tokens: head.tokens, moe_ns: head.moe_ns, counts }
            }
            Some(_) => RingRead::Lost,
            None => RingRead::Busy,
        }
    }

    /// The step number held by the ring entry of step `t`, read under its sequence lock (None
    /// while the entry is being written): a step counter ahead of what the ring holds is a
    /// corrupt region, not lost steps (see [`Region::check_step_counter`]).
    pub fn entry_step(&self, t: u64) -> Option<u64> {
        let l = &self.layout;
        let base = l.ring_offset + (t % l.ring_len as u64) as usize * l.ring_entry_bytes;
        ring::read(self.u64s(base, ring::HEAD_WORDS), &mut []).map(|head| head.step)
    }

    /// Checks `engine_step` against the ring: when it says `engine_step` steps were recorded,
    /// the entry of step `engine_step - 1` holds that step or a later one (the engine writes the
    /// entry before it publishes the counter, and may have gone on). An older step there means
    /// the counter jumped past anything the engine wrote (a garbage value such as 2^62): reading
    /// on would count billions of "lost" steps, so it is an error naming the region.
    pub fn check_step_counter(&self) -> Result<(), String> {
        let e = self.get(off::ENGINE_STEP);
        let Some(latest) = e.checked_sub(1) else { return Ok(()) };
        match self.entry_step(latest) {
            Some(held) if held < latest => Err(format!(
                "{}: engine_step says {e} steps were recorded, but the ring entry of step {latest} holds step {held}: the region is corrupt (a step counter beyond what the ring of {} entries holds); restart the engine",
                self.path.display(),
                self.layout.ring_len
            )),
            _ => Ok(()),
        }
    }

    /// Checks that the file still has the bytes mapped: a region truncated under the sidecar
    /// (an engine that re-created it in place, a careless `truncate`) would end the process with
    /// SIGBUS at the next access past its end. Called before the accesses of every step and
    /// every wait.
    pub fn check_size(&self) -> Result<(), String> {
        match self._file.metadata() {
            Ok(m) if m.len() >= self.map.len() as u64 => Ok(()),
            Ok(m) => Err(format!(
                "{}: the region shrank to {} bytes under the sidecar (mapped {}): it was truncated or re-created in place; restart the engine and the sidecar",
                self.path.display(),
                m.len(),
                self.map.len()
            )),
            Err(e) => Err(format!("{}: cannot check the region's size: {e}", self.path.display())),
        }
    }

    /// Writes step `t` into the ring and publishes it (`engine_step = t + 1`): the engine side.
    /// `moe_ns`: the step's MoE time on this rank (0: not measured).
    pub fn write_step(&self, t: u64, phase: u64, tokens: u64, moe_ns: u64, counts: &[u64]) {
        let l = &self.layout;
        let base = l.ring_offset + (t % l.ring_len as u64) as usize * l.ring_entry_bytes;
        let n = (l.num_layers * l.count_cols()).min(counts.len());
        ring::write(self.u64s(base, ring::HEAD_WORDS + n), EntryHead { step: t, phase, tokens, moe_ns }, &counts[..n]);
        self.atomic(off::ENGINE_STEP).store(t + 1, Ordering::Release);
    }

    /// Posts a command under `cmd_seq` (the sidecar side).
    pub fn post(&self, cmd: &Command) {
        let head = CommandHead { id: cmd.id, layer: cmd.layer as u64, apply_step: cmd.apply_step, epoch: cmd.epoch };
        self.mailbox().post(head, &cmd.new_row, &cmd.copy_mask);
    }

    /// Reads the command under `cmd_seq` (the engine side), never waiting: None when there is
    /// none, when a post is under way (`cmd_seq` odd: a sidecar stopped in the middle of one would
    /// otherwise hang the engine), or when the read was disturbed 4 times.
    pub fn read_command(&self) -> Option<Command> {
        let mut new_row = vec![0i32; self.layout.num_physical()];
        let mut copy_mask = vec![false; self.layout.slots_per_rank];
        let (h, _) = self.mailbox().read(|_| true, &mut new_row, &mut copy_mask)?;
        (h.id != 0).then_some(Command {
            id: h.id,
            layer: h.layer as usize,
            apply_step: h.apply_step,
            epoch: h.epoch,
            new_row,
            copy_mask,
        })
    }

    /// The last answer: (`ack_id`, `ack_result`, `ack_step`); `ack_id` is read first (acquire),
    /// so the other two belong to it or a later one.
    pub fn ack(&self) -> (u64, u64, u64) {
        let a = self.mailbox().ack();
        (a.id, a.result, a.step)
    }

    /// Answers command `id` (the engine side): result and step first, then the id.
    pub fn answer(&self, id: u64, result: u64, step: u64) {
        self.mailbox().answer(id, result, step);
    }

    /// The mailbox's views (the core's protocol over them).
    fn mailbox(&self) -> Mailbox<'_> {
        let l = &self.layout;
        Mailbox {
            head: self.u64s(off::CMD_SEQ, mailbox::HEAD_WORDS),
            row: self.u32s(l.command_offset, l.num_physical()),
            mask: self.u8s(l.mask_offset(), l.slots_per_rank),
        }
    }

    /// `n` atomic u64 words at `at` (8-byte aligned: sections start at multiples of 64).
    fn u64s(&self, at: usize, n: usize) -> &[AtomicU64] {
        self.check(at, 8 * n);
        assert_eq!(at % 8, 0, "unaligned atomic field");
        // SAFETY: in bounds, aligned, and the mapping lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(at) as *const AtomicU64, n) }
    }

    fn u32s(&self, at: usize, n: usize) -> &[AtomicU32] {
        self.check(at, 4 * n);
        assert_eq!(at % 4, 0, "unaligned i32 array");
        // SAFETY: as above.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(at) as *const AtomicU32, n) }
    }

    fn u8s(&self, at: usize, n: usize) -> &[AtomicU8] {
        self.check(at, n);
        // SAFETY: in bounds.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(at) as *const AtomicU8, n) }
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
