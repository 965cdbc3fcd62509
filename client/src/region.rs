//! The engine side of the contract in safe Rust (what `capi` exposes to C): one engine rank's
//! region, created, published, recorded into, switched at step boundaries and finished exactly
//! as the Python client (`python/eplb_client/region.py`) does: same checks, same layout (byte
//! for byte: the golden test compares them), same file naming, same mailbox answers and the same
//! table-fault rule.
//!
//! Concurrency: the mutable state is behind one mutex, so calls from several threads are
//! serialised (a command is decided once). [`EngineRegion::heartbeat`](crate::region::EngineRegion::heartbeat) takes no lock: it is one
//! atomic store into the mapping, which lives until the region is dropped, so a heartbeat thread
//! may beat during a long apply.

use std::ffi::CString;
use std::sync::Mutex;

use crate::core::mailbox::{self, CommandHead, Mailbox};
use crate::core::ring::{self, EntryHead};
use crate::layout::*;
use crate::sync::{AtomicU32, AtomicU64, AtomicU8, Ordering};

/// A count of one slot in one step is below this (2^40): it keeps the sidecar's u64 sums over
/// ranks and steps from wrapping (the Python client's `MAX_COUNT`).
pub const MAX_COUNT: u64 = 1 << 40;
/// Region names: at most this many characters (the worker's bound).
pub const MAX_NAME_LEN: usize = 200;
/// Where regions live.
pub const SHM_DIR: &str = "/dev/shm";

/// What went wrong, as the C API's status and a message that says what to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Invalid,
    State,
    Io,
    Sidecar,
    Callback,
}

/// An error of the engine side: its kind and its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientError {
    pub kind: ErrorKind,
    pub message: String,
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ClientError {}

fn invalid(message: impl Into<String>) -> ClientError {
    ClientError { kind: ErrorKind::Invalid, message: message.into() }
}

fn state(message: impl Into<String>) -> ClientError {
    ClientError { kind: ErrorKind::State, message: message.into() }
}

fn io(message: impl Into<String>) -> ClientError {
    ClientError { kind: ErrorKind::Io, message: message.into() }
}

/// One tensor of one layer as the engine describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    /// A contract dtype name (`f8e4m3`), or a numpy/torch one (`float8_e4m3fn`, `torch.float32`),
    /// stored as the contract's name.
    pub dtype: String,
    /// [`EPLB_KIND_EXPERT`] or [`EPLB_KIND_GLOBAL`].
    pub kind: u32,
    pub rows: u32,
    pub row_bytes: u64,
    pub row_stride: u64,
    /// CUDA IPC weights: the allocation's `cudaIpcMemHandle_t` and the tensor's offset in it.
    pub ipc: Option<([u8; 64], u64)>,
}

/// The region's shape and kinds (the C `eplb_config` less its arrays).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    pub rank: u32,
    pub world_size: u32,
    pub num_layers: u32,
    pub slots_per_rank: u32,
    pub num_logical: u32,
    /// 0: [`EPLB_DEFAULT_RING_LEN`].
    pub ring_len: u32,
    pub weights_kind: u32,
    pub counts_kind: u32,
}

/// The engine's device copy (CUDA weights; a notification after the region's copy with host
/// weights): `(layer, slots)`; an `Err` is the callback's non-zero code.
pub type ApplyFn = Box<dyn FnMut(u32, &[u32]) -> Result<(), i32> + Send>;

/// The engine's collective at a boundary: `have -> (min, max)` over every engine rank; an `Err`
/// is the callback's non-zero code.
pub type AgreeFn<'a> = &'a mut dyn FnMut(u64) -> Result<(u64, u64), i32>;

/// Where a table entry is (the part the engine side uses).
#[derive(Debug, Clone, Copy)]
struct Entry {
    offset: u64,
    row_stride: u64,
    row_bytes: u64,
    rows: u32,
    kind: u32,
}

/// The contract's dtype name of `dtype` (a contract name, or a numpy/torch one), if any.
pub fn contract_dtype(dtype: &str) -> Option<&'static str> {
    let d = dtype.strip_prefix("torch.").unwrap_or(dtype);
    if let Some(&c) = DTYPES.iter().find(|&&c| c == d) {
        return Some(c);
    }
    Some(match d {
        "float64" | "double" => "f64",
        "float32" | "float" => "f32",
        "float16" | "half" => "f16",
        "bfloat16" | "uint16" => "bf16",
        "int64" | "long" => "i64",
        "int32" | "int" => "i32",
        "int16" | "short" => "i16",
        "int8" => "i8",
        "uint8" => "u8",
        "float8_e4m3fn" | "float8_e4m3fnuz" => "f8e4m3",
        "float8_e5m2" | "float8_e5m2fnuz" => "f8e5m2",
        "float8_e8m0fnu" => "e8m0",
        "float4_e2m1fn_x2" => "fp4x2",
        _ => return None,
    })
}

/// Refuses a region name the worker would refuse (`[A-Za-z0-9_.-]`, 1 to 200 characters, not
/// starting with `.`).
pub fn check_name(name: &str) -> Result<(), ClientError> {
    if name.is_empty() || !name.bytes().all(|c| c.is_ascii_alphanumeric() || b"_.-".contains(&c)) {
        return Err(invalid(format!("region name {name:?}: use only letters, digits, '_', '-' and '.'")));
    }
    if name.starts_with('.') {
        return Err(invalid(format!("region name {name:?}: must not start with '.'")));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(invalid(format!(
            "region name of {} characters: at most {MAX_NAME_LEN} (the file name eplb-NAME-RANK must stay under the file system's 255 bytes)",
            name.len()
        )));
    }
    Ok(())
}

/// `/dev/shm/eplb-NAME-RANK`.
pub fn region_path(name: &str, rank: u32) -> String {
    format!("{SHM_DIR}/eplb-{name}-{rank}")
}

/// Why a `phy2log` row is not a placement (every expert in `[0, num_logical)` and held at least
/// once), or None.
pub fn check_phy2log(row: &[i32], num_logical: usize) -> Option<String> {
    let mut seen = vec![false; num_logical];
    for &e in row {
        match usize::try_from(e).ok().and_then(|e| seen.get_mut(e)) {
            Some(s) => *s = true,
            None => return Some(format!("expert ids outside [0, {num_logical})")),
        }
    }
    let missing: Vec<usize> = seen.iter().enumerate().filter(|(_, &s)| !s).map(|(e, _)| e).take(8).collect();
    (!missing.is_empty()).then(|| format!("experts {missing:?} have no slot"))
}

/// `CLOCK_MONOTONIC` in ns, the clock of the contract's heartbeats.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid out-pointer; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn where_(layer: u32, num_layers: u32, name: &str) -> String {
    if layer == num_layers {
        format!("staging, tensor {name:?}")
    } else {
        format!("layer {layer}, tensor {name:?}")
    }
}

/// The shared mapping: unmapped when dropped, never before (so that a heartbeat from another
/// thread is always a store into mapped memory).
struct Map {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is shared memory accessed only through atomics, or (host weights) through
// rows whose exclusive use the protocol guarantees (the engine's own tensors between its calls).
unsafe impl Send for Map {}
unsafe impl Sync for Map {}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: ptr/len is the mapping made in `create`, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

impl Map {
    /// `n` atomic u64 words at byte `at` (8-aligned, in bounds: the layout's own offsets).
    fn u64s(&self, at: usize, n: usize) -> &[AtomicU64] {
        assert!(at.is_multiple_of(8) && at + 8 * n <= self.len, "region access out of bounds");
        // SAFETY: in bounds and aligned (the mapping is page aligned); lives as long as self.
        unsafe { std::slice::from_raw_parts(self.ptr.add(at).cast(), n) }
    }

    fn u32s(&self, at: usize, n: usize) -> &[AtomicU32] {
        assert!(at.is_multiple_of(4) && at + 4 * n <= self.len, "region access out of bounds");
        // SAFETY: as above.
        unsafe { std::slice::from_raw_parts(self.ptr.add(at).cast(), n) }
    }

    fn u8s(&self, at: usize, n: usize) -> &[AtomicU8] {
        assert!(at + n <= self.len, "region access out of bounds");
        // SAFETY: as above.
        unsafe { std::slice::from_raw_parts(self.ptr.add(at).cast(), n) }
    }

    fn word(&self, at: usize) -> &AtomicU64 {
        &self.u64s(at, 1)[0]
    }

    /// Writes `bytes` at `at` (before publishing: nobody else has the file).
    fn put(&self, at: usize, bytes: &[u8]) {
        assert!(at + bytes.len() <= self.len, "region access out of bounds");
        // SAFETY: in bounds; the region is not yet visible to any other process.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(at), bytes.len()) }
    }
}

/// The mutable side of a region (behind its mutex).
struct State {
    published: bool,
    /// Finished, failed or closed: every later step call is refused.
    closed: bool,
    /// Why the weights may be torn (an apply callback that failed): every later step is refused.
    broken: Option<String>,
    /// The engine's copy of `phy2log [num_layers * num_physical]` (what its router uses).
    phy2log: Vec<i32>,
    tmp_path: Option<String>,
    /// Scratch of the mailbox read.
    row: Vec<i32>,
    mask: Vec<bool>,
    slots: Vec<u32>,
    /// The command whose row and mask are in `row`, `mask` (read under one sequence lock).
    cmd: Option<CommandHead>,
    apply: Option<ApplyFn>,
    /// What [`EngineRegion::boundary_begin`] found, until its [`EngineRegion::boundary_end`].
    begun: Option<Begun>,
    /// With `begun`: an invalid command for that boundary and why (the contract's rule it
    /// breaks), answered rejected at the end.
    reject: Option<(u64, String)>,
    /// The last command this rank answered rejected, and why: `(id, why)`.
    last_rejection: Option<(u64, String)>,
}

/// What [`EngineRegion::boundary_begin`] found at the boundary of `step`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Begun {
    pub step: u64,
    /// The pending command's id when it is for this very boundary and valid, else 0: what the
    /// engine's ranks agree on (`min`, `max` of `have` over every rank).
    pub have: u64,
    /// The id of a command posted and not yet answered, whatever its step (0: none). When
    /// `have` and `posted` are both 0, [`EngineRegion::boundary_end`] has nothing to do.
    pub posted: u64,
}

/// One engine rank's region (see the module doc).
pub struct EngineRegion {
    map: Map,
    path: String,
    cfg: Config,
    num_tensors: usize,
    count_cols: usize,
    ring_offset: usize,
    ring_entry_bytes: usize,
    placement_offset: usize,
    epochs_offset: usize,
    command_offset: usize,
    mask_offset: usize,
    /// `(num_layers + 1) * num_tensors` entries (the last layer: staging).
    entries: Vec<Entry>,
    names: Vec<String>,
    per_expert: Vec<usize>,
    state: Mutex<State>,
}

/// The IPC section's allocations, deduplicated by handle in first-seen order: (handle, bytes).
type Allocations = Vec<([u8; 64], u64)>;

impl EngineRegion {
    /// Checks everything, then creates the region under a temporary name
    /// (`/dev/shm/.eplb-NAME-RANK.PID.tmp`): header, `phy2log`, tensor table, the IPC section
    /// (CUDA weights) and zeroed tensor rows (host weights: the engine fills them through
    /// [`EngineRegion::tensor_ptr`]). [`EngineRegion::publish`] renames it into place.
    ///
    /// `tensors`: `[num_layers][num_tensors]` row-major; `staging`: `[num_tensors]` (CUDA
    /// weights; per-expert entries used); `phy2log`: `[num_layers * num_physical]`.
    pub fn create(
        name: &str,
        cfg: Config,
        tensors: &[TensorSpec],
        staging: Option<&[TensorSpec]>,
        phy2log: &[i32],
        apply: Option<ApplyFn>,
    ) -> Result<EngineRegion, ClientError> {
        check_name(name)?;
        let mut cfg = cfg;
        if cfg.ring_len == 0 {
            cfg.ring_len = EPLB_DEFAULT_RING_LEN;
        }
        let (l, spr, e_n, w) = (cfg.num_layers, cfg.slots_per_rank, cfg.num_logical, cfg.world_size);
        if cfg.rank >= w {
            return Err(invalid(format!("rank {} is outside world_size {w}", cfg.rank)));
        }
        if l < 1 || spr < 1 || e_n < 1 {
            return Err(invalid("num_layers, slots_per_rank and num_logical must be >= 1"));
        }
        if [l, spr, e_n, w, cfg.ring_len].iter().any(|&v| v >= 1 << 31) {
            return Err(invalid("num_layers, slots_per_rank, num_logical, world_size and ring_len must be < 2^31"));
        }
        if cfg.ring_len < EPLB_MIN_RING_LEN {
            return Err(invalid(format!("ring_len {} < {EPLB_MIN_RING_LEN}", cfg.ring_len)));
        }
        if cfg.counts_kind > EPLB_COUNTS_PHYSICAL {
            return Err(invalid(format!(
                "counts_kind {}: EPLB_COUNTS_LOCAL ({EPLB_COUNTS_LOCAL}, per local slot) or EPLB_COUNTS_PHYSICAL ({EPLB_COUNTS_PHYSICAL}, per physical slot)",
                cfg.counts_kind
            )));
        }
        let cuda = match cfg.weights_kind {
            EPLB_WEIGHTS_HOST => false,
            EPLB_WEIGHTS_CUDA_IPC => true,
            k => return Err(invalid(format!("weights_kind {k}: EPLB_WEIGHTS_HOST (0) or EPLB_WEIGHTS_CUDA_IPC (1)"))),
        };
        let (l, spr, e_n) = (l as usize, spr as usize, e_n as usize);
        let p = w as usize * spr;
        if p > (i32::MAX as usize) || (l as u128) * (p as u128) > (1u128 << 40) {
            return Err(invalid(format!("{l} layers x {p} physical slots: too large a region")));
        }
        if phy2log.len() != l * p {
            return Err(invalid(format!(
                "phy2log has {} entries, want num_layers x num_physical = {}",
                phy2log.len(),
                l * p
            )));
        }
        for layer in 0..l {
            if let Some(why) = check_phy2log(&phy2log[layer * p..(layer + 1) * p], e_n) {
                return Err(invalid(format!("phy2log layer {layer}: {why}")));
            }
        }
        if tensors.is_empty() || !tensors.len().is_multiple_of(l) {
            return Err(invalid(format!("{} tensor descriptions: want num_layers x num_tensors", tensors.len())));
        }
        let t_n = tensors.len() / l;
        if !(1..=EPLB_MAX_TENSORS as usize).contains(&t_n) {
            return Err(invalid(format!("num_tensors {t_n} is not in 1..={EPLB_MAX_TENSORS}")));
        }

        // -- the tensors: every rule of the table, before anything is written --
        let mut dtypes = Vec::with_capacity(tensors.len());
        for (i, t) in tensors.iter().enumerate() {
            dtypes.push(check_tensor(t, (i / t_n) as u32, cfg.num_layers, spr as u32, cuda)?);
        }
        for layer in 0..l {
            for t in 0..t_n {
                let (d, r) = (&tensors[layer * t_n + t], &tensors[t]);
                let at = where_(layer as u32, cfg.num_layers, &d.name);
                if tensors[layer * t_n..layer * t_n + t].iter().any(|o| o.name == d.name) {
                    return Err(invalid(format!("{at}: field name: used twice in the layer")));
                }
                for (field, a, b) in [
                    ("name", d.name.clone(), r.name.clone()),
                    ("dtype", dtypes[layer * t_n + t].to_string(), dtypes[t].to_string()),
                    ("kind", d.kind.to_string(), r.kind.to_string()),
                    ("row_bytes", d.row_bytes.to_string(), r.row_bytes.to_string()),
                ] {
                    if a != b {
                        return Err(invalid(format!(
                            "{at}: field {field}: {a:?}, but layer 0's tensor {t} has {b:?} (the same in every layer)"
                        )));
                    }
                }
            }
        }
        let per_expert: Vec<usize> = (0..t_n).filter(|&t| tensors[t].kind == EPLB_KIND_EXPERT).collect();
        if per_expert.is_empty() {
            return Err(invalid("layer 0: field kind: at least one per-expert tensor (EPLB_KIND_EXPERT)"));
        }
        let stage: Option<Vec<Option<TensorSpec>>> = if cuda {
            let staging = staging.ok_or_else(|| {
                invalid("CUDA weights need staging: the engine's one-layer staging tensors (one per per-expert tensor, same names, rows = slots_per_rank)")
            })?;
            if staging.len() != t_n {
                return Err(invalid(format!("staging has {} descriptions, want num_tensors = {t_n}", staging.len())));
            }
            let mut out = Vec::with_capacity(t_n);
            for (t, (s, r)) in staging.iter().zip(&tensors[..t_n]).enumerate() {
                if r.kind == EPLB_KIND_GLOBAL {
                    out.push(None);
                    continue;
                }
                let at = where_(cfg.num_layers, cfg.num_layers, &s.name);
                let dt = check_tensor(s, cfg.num_layers, cfg.num_layers, spr as u32, true)?;
                for (field, a, b) in [
                    ("name", s.name.clone(), r.name.clone()),
                    ("kind", s.kind.to_string(), r.kind.to_string()),
                    ("dtype", dt.to_string(), dtypes[t].to_string()),
                    ("row_bytes", s.row_bytes.to_string(), r.row_bytes.to_string()),
                ] {
                    if a != b {
                        return Err(invalid(format!(
                            "{at}: field {field}: {a:?}, but the layers' tensor {t} has {b:?}"
                        )));
                    }
                }
                out.push(Some(s.clone()));
            }
            if apply.is_none() {
                return Err(invalid("CUDA weights need the apply callback (the engine's device copy of staging rows)"));
            }
            Some(out)
        } else {
            None
        };

        // -- the layout (the Python client's, byte for byte) --
        let (l64, spr64, p64, t64) = (l as u64, spr as u64, p as u64, t_n as u64);
        let count_cols = if cfg.counts_kind == EPLB_COUNTS_PHYSICAL { p } else { spr };
        let ring_entry_bytes = 64 + round64(8 * l64 * count_cols as u64);
        let ring_offset = EPLB_HEADER_BYTES as u64;
        let placement_offset = ring_offset + cfg.ring_len as u64 * ring_entry_bytes;
        let epochs_offset = round64(placement_offset + 4 * l64 * p64);
        let command_offset = round64(epochs_offset + 8 * l64);
        let mask_offset = command_offset + round64(4 * p64);
        let table_offset = round64(mask_offset + spr64);
        let table_end = table_offset + (l64 + 1) * t64 * EPLB_TENSOR_ENTRY_BYTES as u64;
        let mut entries = Vec::with_capacity((l + 1) * t_n);
        let mut handles: [Vec<u16>; 1] = [Vec::with_capacity((l + 1) * t_n)];
        let mut allocs: Allocations = Vec::new();
        let (ipc_offset, total_bytes, ipc_section) = if !cuda {
            let mut off = round64(table_end);
            for d in tensors {
                entries.push(Entry {
                    offset: off,
                    row_stride: d.row_stride,
                    row_bytes: d.row_bytes,
                    rows: d.rows,
                    kind: d.kind,
                });
                off = round64(off + extent(d.rows, d.row_stride, d.row_bytes));
            }
            for d in &tensors[..t_n] {
                if d.kind == EPLB_KIND_EXPERT {
                    entries.push(Entry {
                        offset: off,
                        row_stride: d.row_bytes,
                        row_bytes: d.row_bytes,
                        rows: spr as u32,
                        kind: d.kind,
                    });
                    off = round64(off + spr64 * d.row_bytes);
                } else {
                    entries.push(Entry { offset: 0, row_stride: 0, row_bytes: d.row_bytes, rows: 0, kind: d.kind });
                }
            }
            handles[0].resize(entries.len(), 0);
            (0, off.div_ceil(4096) * 4096, Vec::new())
        } else {
            let stage = stage.as_ref().expect("cuda: checked above");
            let mut add = |d: &TensorSpec| -> Result<u16, ClientError> {
                let (h, off) = d.ipc.expect("cuda: checked by check_tensor");
                let end = off + extent(d.rows, d.row_stride, d.row_bytes);
                let i = match allocs.iter().position(|a| a.0 == h) {
                    Some(i) => i,
                    None => {
                        allocs.push((h, 0));
                        allocs.len() - 1
                    }
                };
                if i >= EPLB_IPC_MAX_HANDLES as usize {
                    return Err(invalid(format!("more than {EPLB_IPC_MAX_HANDLES} distinct allocations: the IPC table holds 1 to {EPLB_IPC_MAX_HANDLES}")));
                }
                // The allocation's size is not in the description: the end of the last row any
                // tensor uses in it is a lower bound, which is all the sidecar checks.
                allocs[i].1 = allocs[i].1.max(end);
                Ok(i as u16)
            };
            for d in tensors {
                let h = add(d)?;
                let (_, off) = d.ipc.expect("cuda: checked");
                entries.push(Entry {
                    offset: off,
                    row_stride: d.row_stride,
                    row_bytes: d.row_bytes,
                    rows: d.rows,
                    kind: d.kind,
                });
                handles[0].push(h);
            }
            for (t, s) in stage.iter().enumerate() {
                match s {
                    Some(s) => {
                        let h = add(s)?;
                        let (_, off) = s.ipc.expect("cuda: checked");
                        entries.push(Entry {
                            offset: off,
                            row_stride: s.row_stride,
                            row_bytes: s.row_bytes,
                            rows: s.rows,
                            kind: s.kind,
                        });
                        handles[0].push(h);
                    }
                    None => {
                        entries.push(Entry {
                            offset: 0,
                            row_stride: 0,
                            row_bytes: tensors[t].row_bytes,
                            rows: 0,
                            kind: tensors[t].kind,
                        });
                        handles[0].push(0);
                    }
                }
            }
            let (bus, uuid) = crate::cuda::device_ids().map_err(invalid)?;
            let mut section = vec![0u8; EPLB_IPC_HANDLES as usize + EPLB_IPC_ENTRY_BYTES as usize * allocs.len()];
            section[..bus.len().min(15)].copy_from_slice(&bus.as_bytes()[..bus.len().min(15)]);
            section[EPLB_IPC_UUID as usize..EPLB_IPC_UUID as usize + 16].copy_from_slice(&uuid);
            for (i, (h, bytes)) in allocs.iter().enumerate() {
                let at = EPLB_IPC_HANDLES as usize + i * EPLB_IPC_ENTRY_BYTES as usize;
                section[at..at + 64].copy_from_slice(h);
                section[at + EPLB_IPC_ENTRY_SIZE as usize..at + EPLB_IPC_ENTRY_SIZE as usize + 8]
                    .copy_from_slice(&bytes.to_le_bytes());
            }
            let ipc_offset = round64(table_end);
            (ipc_offset, (ipc_offset + section.len() as u64).div_ceil(4096) * 4096, section)
        };
        // No two extents overlap (host: in the region; CUDA: inside one allocation).
        let mut spans: Vec<(u16, u64, u64, usize)> = entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.rows > 0)
            .map(|(i, e)| (handles[0][i], e.offset, e.offset + extent(e.rows, e.row_stride, e.row_bytes), i))
            .collect();
        spans.sort_unstable();
        for s in spans.windows(2) {
            if s[0].0 == s[1].0 && s[1].1 < s[0].2 {
                let name = |i: usize| {
                    let layer = (i / t_n) as u32;
                    let n = if layer == cfg.num_layers { &tensors[i % t_n].name } else { &tensors[i].name };
                    where_(layer, cfg.num_layers, n)
                };
                return Err(invalid(format!(
                    "{}: field ipc_offset: its rows [{}, {}) overlap those of {} [{}, {}) in allocation {}",
                    name(s[1].3),
                    s[1].1,
                    s[1].2,
                    name(s[0].3),
                    s[0].1,
                    s[0].2,
                    s[0].0
                )));
            }
        }
        let expert_bytes: u64 = per_expert.iter().map(|&t| tensors[t].row_bytes).sum();

        // -- the file: only now is anything written --
        let path = region_path(name, cfg.rank);
        let total = usize::try_from(total_bytes).map_err(|_| invalid("the region is too large"))?;
        check_free_space(&path, total_bytes)?;
        check_existing(&path)?;
        // SAFETY: getpid cannot fail.
        let pid = unsafe { libc::getpid() } as u64;
        let tmp = format!("{SHM_DIR}/.eplb-{name}-{}.{pid}.tmp", cfg.rank);
        let map = create_mapped(&tmp, total)?;
        let mut h = Header {
            magic: EPLB_MAGIC,
            version: EPLB_VERSION,
            header_bytes: EPLB_HEADER_BYTES,
            num_layers: cfg.num_layers,
            slots_per_rank: cfg.slots_per_rank,
            num_logical: cfg.num_logical,
            world_size: cfg.world_size,
            rank: cfg.rank,
            ring_len: cfg.ring_len,
            expert_bytes,
            num_tensors: t_n as u32,
            weights_kind: cfg.weights_kind,
            total_bytes,
            ring_offset,
            ring_entry_bytes,
            placement_offset,
            epochs_offset,
            command_offset,
            table_offset,
            ipc_offset,
            engine_pid: pid,
            minor_version: EPLB_MINOR_VERSION,
            counts_kind: cfg.counts_kind,
            num_handles: allocs.len() as u32,
            ..Header::default()
        };
        h.engine_state = EPLB_ENGINE_STARTING;
        map.put(0, &header_bytes(&h));
        for (i, e) in entries.iter().enumerate() {
            let (t, layer) = (i % t_n, i / t_n);
            let spec = if layer == l { &tensors[t] } else { &tensors[i] };
            let mut raw = [0u8; 64];
            let nb = spec.name.as_bytes();
            raw[..nb.len()].copy_from_slice(nb);
            let db = dtypes[t].as_bytes();
            raw[24..24 + db.len()].copy_from_slice(db);
            raw[32..40].copy_from_slice(&e.offset.to_le_bytes());
            raw[40..48].copy_from_slice(&e.row_stride.to_le_bytes());
            raw[48..56].copy_from_slice(&e.row_bytes.to_le_bytes());
            raw[56..60].copy_from_slice(&e.rows.to_le_bytes());
            raw[60] = e.kind as u8;
            raw[62..64].copy_from_slice(&handles[0][i].to_le_bytes());
            map.put(table_offset as usize + i * 64, &raw);
        }
        if !ipc_section.is_empty() {
            map.put(ipc_offset as usize, &ipc_section);
        }
        let region = EngineRegion {
            map,
            path,
            cfg,
            num_tensors: t_n,
            count_cols,
            ring_offset: ring_offset as usize,
            ring_entry_bytes: ring_entry_bytes as usize,
            placement_offset: placement_offset as usize,
            epochs_offset: epochs_offset as usize,
            command_offset: command_offset as usize,
            mask_offset: mask_offset as usize,
            entries,
            names: tensors[..t_n].iter().map(|t| t.name.clone()).collect(),
            per_expert,
            state: Mutex::new(State {
                published: false,
                closed: false,
                broken: None,
                phy2log: phy2log.to_vec(),
                tmp_path: Some(tmp),
                row: vec![0; p],
                mask: vec![false; spr],
                slots: Vec::with_capacity(spr),
                cmd: None,
                begun: None,
                reject: None,
                last_rejection: None,
                apply,
            }),
        };
        for layer in 0..l {
            mailbox::publish_placement(
                region.placement_row(layer),
                region.epoch(layer),
                &phy2log[layer * p..(layer + 1) * p],
                0,
            );
        }
        region.heartbeat();
        Ok(region)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while the lock was held was caught at the FFI boundary; the state is plain data.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn config(&self) -> Config {
        self.cfg
    }

    pub fn num_tensors(&self) -> usize {
        self.num_tensors
    }

    pub fn num_physical(&self) -> usize {
        self.cfg.world_size as usize * self.cfg.slots_per_rank as usize
    }

    /// Columns of a ring entry's counts: `slots_per_rank` or `num_physical`.
    pub fn count_cols(&self) -> usize {
        self.count_cols
    }

    /// The region's final path.
    pub fn path(&self) -> &str {
        &self.path
    }

    fn mailbox(&self) -> Mailbox<'_> {
        Mailbox {
            head: self.map.u64s(EPLB_OFF_CMD_SEQ as usize, mailbox::HEAD_WORDS),
            row: self.map.u32s(self.command_offset, self.num_physical()),
            mask: self.map.u8s(self.mask_offset, self.cfg.slots_per_rank as usize),
        }
    }

    fn placement_row(&self, layer: usize) -> &[AtomicU32] {
        let p = self.num_physical();
        self.map.u32s(self.placement_offset + 4 * layer * p, p)
    }

    fn epoch(&self, layer: usize) -> &AtomicU64 {
        self.map.word(self.epochs_offset + 8 * layer)
    }

    fn header(&self, field: u32) -> &AtomicU64 {
        self.map.word(field as usize)
    }

    /// Host weights: where `layer`'s tensor `tensor` lives in the region (`layer == num_layers`:
    /// staging; None for a global's staging entry, CUDA weights, or out-of-range indices).
    pub fn tensor_ptr(&self, layer: u32, tensor: u32) -> Option<*mut u8> {
        if self.cfg.weights_kind != EPLB_WEIGHTS_HOST
            || layer > self.cfg.num_layers
            || tensor as usize >= self.num_tensors
        {
            return None;
        }
        let e = self.entries[layer as usize * self.num_tensors + tensor as usize];
        // SAFETY: the entry's extent lies inside the mapping (the layout put it there).
        (e.rows > 0).then(|| unsafe { self.map.ptr.add(e.offset as usize) })
    }

    /// Renames the region into place (`engine_state = running`): a sidecar may attach now.
    pub fn publish(&self) -> Result<(), ClientError> {
        let mut st = self.lock();
        if st.closed {
            return Err(state("publish: the region is closed (finished or failed)"));
        }
        self.publish_locked(&mut st)
    }

    fn publish_locked(&self, st: &mut State) -> Result<(), ClientError> {
        if st.published {
            return Ok(());
        }
        self.header(EPLB_OFF_ENGINE_STATE).store(EPLB_ENGINE_RUNNING, Ordering::Release);
        self.heartbeat();
        let tmp = st.tmp_path.as_deref().expect("set until published");
        rename(tmp, &self.path)?;
        st.tmp_path = None;
        st.published = true;
        Ok(())
    }

    /// `engine_heartbeat_ns = now` (lock-free: any thread, any time before the region is dropped).
    pub fn heartbeat(&self) {
        self.header(EPLB_OFF_ENGINE_HEARTBEAT_NS).store(monotonic_ns(), Ordering::Release);
    }

    pub fn engine_step(&self) -> u64 {
        self.header(EPLB_OFF_ENGINE_STEP).load(Ordering::Acquire)
    }

    /// Step `step`'s counts (`[num_layers * count_cols]`, each below [`MAX_COUNT`]) into the load
    /// ring under its sequence lock, then `engine_step = step + 1`. Checked before the entry is
    /// touched.
    pub fn record(&self, step: u64, phase: u32, counts: &[u64], tokens: u64, moe_ns: u64) -> Result<(), ClientError> {
        let st = self.lock();
        self.usable(&st, "record")?;
        self.check_record(step, phase, counts)?;
        self.write_record(step, phase, counts, tokens, moe_ns);
        drop(st);
        Ok(())
    }

    /// The end of step `step` in one call (one lock, one clock read): [`Self::record`] of `step`,
    /// then [`Self::boundary_begin`] of `step + 1`. Every check of both comes first: on an error
    /// nothing was written (not the ring entry, not `engine_step`).
    pub fn step_end(
        &self,
        step: u64,
        phase: u32,
        counts: &[u64],
        tokens: u64,
        moe_ns: u64,
    ) -> Result<Begun, ClientError> {
        let mut guard = self.lock();
        let st = &mut *guard;
        st.begun = None;
        self.usable(st, "record")?;
        self.check_record(step, phase, counts)?;
        self.publish_locked(st)?;
        self.write_record(step, phase, counts, tokens, moe_ns);
        Ok(self.begin_locked(st, step + 1))
    }

    /// Refuses every step call once the region is finished, failed or broken.
    fn usable(&self, st: &State, what: &str) -> Result<(), ClientError> {
        match st.broken.as_deref().or(st.closed.then_some("closed (finished or failed)")) {
            Some(why) => Err(state(format!("{what}: the region is {why}"))),
            None => Ok(()),
        }
    }

    /// Everything [`Self::record`] checks before it touches the ring.
    fn check_record(&self, step: u64, phase: u32, counts: &[u64]) -> Result<(), ClientError> {
        let now = self.engine_step();
        if step != now {
            return Err(state(format!("record({step}) but engine_step is {now}: record each step once, in order")));
        }
        if !(EPLB_PHASE_PREFILL..=EPLB_PHASE_MIXED).contains(&phase) {
            return Err(invalid(format!(
                "phase {phase} is not EPLB_PHASE_PREFILL (1), EPLB_PHASE_DECODE (2) or EPLB_PHASE_MIXED (3)"
            )));
        }
        let (l, c) = (self.cfg.num_layers as usize, self.count_cols);
        if counts.len() != l * c {
            let what = if self.cfg.counts_kind == EPLB_COUNTS_LOCAL { "slots_per_rank" } else { "num_physical" };
            return Err(invalid(format!(
                "counts has {} values, want num_layers x {what} = {l} x {c} = {}",
                counts.len(),
                l * c
            )));
        }
        if let Some(i) = counts.iter().position(|&v| v >= MAX_COUNT) {
            return Err(invalid(format!(
                "counts: {} at ({}, {}) is beyond {MAX_COUNT} pairs (overflow or garbage)",
                counts[i],
                i / c,
                i % c
            )));
        }
        Ok(())
    }

    /// The ring entry of `step` under its sequence lock, then `engine_step = step + 1` and the
    /// heartbeat (checked by [`Self::check_record`], under the lock).
    fn write_record(&self, step: u64, phase: u32, counts: &[u64], tokens: u64, moe_ns: u64) {
        let base = self.ring_offset + (step % self.cfg.ring_len as u64) as usize * self.ring_entry_bytes;
        let entry = self.map.u64s(base, ring::HEAD_WORDS + counts.len());
        ring::write(entry, EntryHead { step, phase: phase as u64, tokens, moe_ns }, counts);
        self.header(EPLB_OFF_ENGINE_STEP).store(step + 1, Ordering::Release);
        self.heartbeat();
    }

    /// The boundary before running `step` (`== engine_step`): reads the mailbox, agrees with the
    /// other ranks (`agree(have) -> (min, max)`; None only with one rank), applies in place or
    /// answers. Returns the layer applied, if any. [`Self::boundary_begin`], `agree`, then
    /// [`Self::boundary_end`].
    pub fn at_step_boundary(&self, step: u64, agree: Option<AgreeFn<'_>>) -> Result<Option<u32>, ClientError> {
        if agree.is_none() && self.cfg.world_size != 1 {
            return Err(invalid("agree is required with more than one engine rank"));
        }
        let have = self.boundary_begin(step)?.have;
        let (lo, hi) = match agree {
            None => (have, have),
            Some(f) => f(have).map_err(|code| {
                self.lock().begun = None;
                ClientError {
                    kind: ErrorKind::Callback,
                    message: format!("the agree callback returned {code} at the boundary of step {step}"),
                }
            })?,
        };
        self.boundary_end(step, lo, hi)
    }

    /// The first half of the boundary before running `step` (`== engine_step`), for engines
    /// whose collective does not fit a callback: reads the mailbox (a command whose step has
    /// passed is answered missed) and says what this rank has for this boundary. The engine then
    /// agrees (`min`, `max` of `have` over its ranks, every rank at every boundary) and calls
    /// [`Self::boundary_end`] with them. May be called again before the end (it reads the mailbox
    /// again: an engine that found its tensors moved reports `table_fault` and begins again, so
    /// that the command is rejected, not applied). When `have` and `posted` are both 0 the end has
    /// nothing to do and may be skipped.
    pub fn boundary_begin(&self, step: u64) -> Result<Begun, ClientError> {
        let mut guard = self.lock();
        let st = &mut *guard;
        st.begun = None;
        self.usable(st, "at_step_boundary")?;
        self.publish_locked(st)?;
        let now = self.engine_step();
        if step != now {
            return Err(state(format!("at_step_boundary({step}) but engine_step is {now}")));
        }
        self.heartbeat();
        Ok(self.begin_locked(st, step))
    }

    /// The mailbox read of [`Self::boundary_begin`] (checked: usable, published, `step ==
    /// engine_step`, heartbeat stored).
    fn begin_locked(&self, st: &mut State, step: u64) -> Begun {
        let (have, reject, posted) = self.pending_for(st, step);
        let begun = Begun { step, have, posted };
        st.begun = Some(begun);
        st.reject = reject;
        begun
    }

    /// The second half of the boundary of `step`: with `lo == hi == have != 0` (every rank has the
    /// command) applies it in place and answers applied; otherwise answers an invalid command
    /// rejected and a valid one cancelled. Returns the layer applied, if any.
    pub fn boundary_end(&self, step: u64, lo: u64, hi: u64) -> Result<Option<u32>, ClientError> {
        let mut guard = self.lock();
        let st = &mut *guard;
        self.usable(st, "at_step_boundary")?;
        let Some(begun) = st.begun else {
            return Err(state(format!("boundary_end({step}) without boundary_begin({step})")));
        };
        if begun.step != step {
            return Err(state(format!("boundary_end({step}) but boundary_begin was for step {}", begun.step)));
        }
        st.begun = None;
        let now = self.engine_step();
        if step != now {
            return Err(state(format!("boundary_end({step}) but engine_step is {now}")));
        }
        let have = begun.have;
        if have != 0 && lo == have && hi == have {
            return self.apply(st, step, have).map(Some);
        }
        let mb = self.mailbox();
        if let Some((id, why)) = st.reject.take() {
            mb.answer(id, EPLB_ACK_REJECTED, step);
            st.last_rejection = Some((id, why));
        } else if have != 0 {
            mb.answer(have, EPLB_ACK_CANCELLED, step);
        }
        Ok(None)
    }

    /// `(have, reject, posted)`: `have` is the pending command's id when it is for this very
    /// boundary and valid, else 0; `reject` is `(id, why)` for one for this boundary that is
    /// invalid; `posted` the id of a command posted and not answered (0: none). A command
    /// being written counts as none (the engine never waits for the sidecar); one whose step
    /// has passed is answered missed. The row and mask are left in `st.row`, `st.mask`.
    fn pending_for(&self, st: &mut State, step: u64) -> (u64, Option<(u64, String)>, u64) {
        let mb = self.mailbox();
        let ack = mb.ack_id();
        let Some((cmd, body)) =
            mb.read(|h| h.id != 0 && h.id != ack && h.apply_step == step, &mut st.row, &mut st.mask)
        else {
            return (0, None, 0);
        };
        if cmd.id == 0 || cmd.id == ack {
            return (0, None, 0);
        }
        if cmd.apply_step < step {
            mb.answer(cmd.id, EPLB_ACK_MISSED, step);
            return (0, None, 0);
        }
        if cmd.apply_step > step || !body {
            return (0, None, cmd.id);
        }
        st.cmd = Some(cmd);
        match self.invalid(st, &cmd) {
            Some(why) => (0, Some((cmd.id, why)), cmd.id),
            None => (cmd.id, None, cmd.id),
        }
    }

    /// The contract's validity rule for a command (read into `st.row`, `st.mask`), or None.
    fn invalid(&self, st: &State, cmd: &CommandHead) -> Option<String> {
        let fault = self.header(EPLB_OFF_TABLE_FAULT).load(Ordering::Acquire);
        if fault != 0 {
            return Some(format!("table_fault {fault}: a tensor was re-allocated"));
        }
        let l = self.cfg.num_layers as u64;
        if cmd.layer >= l {
            return Some(format!("layer {} >= num_layers {l}", cmd.layer));
        }
        let layer = cmd.layer as usize;
        let epoch = self.epoch(layer).load(Ordering::Acquire);
        if cmd.epoch != epoch + 1 {
            return Some(format!("epoch {} is not layer {layer}'s epoch {epoch} + 1", cmd.epoch));
        }
        if let Some(why) = check_phy2log(&st.row, self.cfg.num_logical as usize) {
            return Some(format!("new row: {why}"));
        }
        let (s, r, p) = (self.cfg.slots_per_rank as usize, self.cfg.rank as usize, self.num_physical());
        let old = &st.phy2log[layer * p + r * s..layer * p + (r + 1) * s];
        let new = &st.row[r * s..(r + 1) * s];
        if (0..s).any(|k| old[k] != new[k] && !st.mask[k]) {
            return Some("a local slot changes expert without a staged copy (copy_mask 0)".into());
        }
        None
    }

    /// Applies the command read into `st` (all ranks agreed): the staged rows into the layer's
    /// live rows (host weights) or the engine's apply callback (CUDA), then the placement and the
    /// epoch, then the answer. A failed callback leaves the weights possibly torn: nothing is
    /// answered, `engine_state = failed`, and every later step is refused.
    fn apply(&self, st: &mut State, step: u64, id: u64) -> Result<u32, ClientError> {
        let mb = self.mailbox();
        let cmd = st.cmd.filter(|c| c.id == id).expect("pending_for read the command it returned");
        let layer = cmd.layer as usize;
        st.slots.clear();
        st.slots.extend(st.mask.iter().enumerate().filter(|(_, &m)| m).map(|(k, _)| k as u32));
        let t_n = self.num_tensors;
        let l = self.cfg.num_layers as usize;
        if self.cfg.weights_kind == EPLB_WEIGHTS_HOST {
            for &t in &self.per_expert {
                let dst = self.entries[layer * t_n + t];
                let src = self.entries[l * t_n + t];
                for &s in &st.slots {
                    let n = dst.row_bytes as usize;
                    let from = (src.offset + s as u64 * src.row_stride) as usize;
                    let to = (dst.offset + s as u64 * dst.row_stride) as usize;
                    assert!(from + n <= self.map.len && to + n <= self.map.len, "row out of the region");
                    // SAFETY: in bounds, distinct extents (checked at create); the sidecar wrote
                    // the staging rows before it posted (acquired by the mailbox read) and the
                    // engine's tensors are not in use between its forward passes.
                    unsafe { std::ptr::copy_nonoverlapping(self.map.ptr.add(from), self.map.ptr.add(to), n) };
                }
            }
        }
        if let Some(f) = st.apply.as_mut() {
            if let Err(code) = f(layer as u32, &st.slots) {
                let why = format!("the apply of layer {layer} failed mid-copy (the apply callback returned {code})");
                st.broken = Some(why.clone());
                self.header(EPLB_OFF_ENGINE_STATE).store(EPLB_ENGINE_FAILED, Ordering::Release);
                return Err(ClientError {
                    kind: ErrorKind::Callback,
                    message: format!("{why}: this rank's weights may be torn; engine_state = failed"),
                });
            }
        }
        let p = self.num_physical();
        mailbox::publish_placement(self.placement_row(layer), self.epoch(layer), &st.row, cmd.epoch);
        st.phy2log[layer * p..(layer + 1) * p].copy_from_slice(&st.row);
        mb.answer(id, EPLB_ACK_APPLIED, step);
        Ok(layer as u32)
    }

    /// The last command this rank answered rejected, and why (the contract's rule it broke).
    pub fn last_rejection(&self) -> Option<(u64, String)> {
        self.lock().last_rejection.clone()
    }

    /// The engine's `phy2log` row of `layer` (`[num_physical]`).
    pub fn phy2log_row(&self, layer: u32, out: &mut [i32]) -> Result<(), ClientError> {
        let p = self.num_physical();
        if layer >= self.cfg.num_layers {
            return Err(invalid(format!("layer {layer} >= num_layers {}", self.cfg.num_layers)));
        }
        if out.len() != p {
            return Err(invalid(format!("phy2log: len {} but num_physical is {p}", out.len())));
        }
        let st = self.lock();
        out.copy_from_slice(&st.phy2log[layer as usize * p..(layer as usize + 1) * p]);
        Ok(())
    }

    /// The engine found `layer`'s tensor `tensor` (`layer == num_layers`: staging) re-allocated:
    /// `table_fault = 1 + entry` (the first one found stays), and every command is rejected from
    /// now on.
    pub fn table_fault(&self, layer: u32, tensor: u32) -> Result<(), ClientError> {
        if layer > self.cfg.num_layers || tensor as usize >= self.num_tensors {
            return Err(invalid(format!(
                "table_fault: layer {layer}, tensor {tensor}: want layer <= num_layers {} (num_layers: staging) and tensor < num_tensors {}",
                self.cfg.num_layers, self.num_tensors
            )));
        }
        let entry = layer as u64 * self.num_tensors as u64 + tensor as u64;
        let _ = self.header(EPLB_OFF_TABLE_FAULT).compare_exchange(0, entry + 1, Ordering::AcqRel, Ordering::Acquire);
        Ok(())
    }

    /// Every step done: a command still pending is answered cancelled, `engine_state =
    /// finished`; waits up to `wait_detach_ms` for an attached sidecar to leave; removes the
    /// file. Idempotent.
    pub fn finish(&self, wait_detach_ms: u64) -> Result<(), ClientError> {
        let mut st = self.lock();
        if st.closed {
            return Ok(());
        }
        let mb = self.mailbox();
        let ack = mb.ack_id();
        if let Some((cmd, _)) = mb.read(|_| false, &mut [], &mut []) {
            if cmd.id != 0 && cmd.id != ack {
                mb.answer(cmd.id, EPLB_ACK_CANCELLED, self.engine_step());
            }
        }
        self.header(EPLB_OFF_ENGINE_STATE).store(EPLB_ENGINE_FINISHED, Ordering::Release);
        self.heartbeat();
        let deadline = monotonic_ns().saturating_add(wait_detach_ms.saturating_mul(1_000_000));
        while self.header(EPLB_OFF_SIDECAR_STATE).load(Ordering::Acquire) == EPLB_SIDECAR_ATTACHED
            && monotonic_ns() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
            self.heartbeat();
        }
        self.close_locked(&mut st);
        Ok(())
    }

    /// `engine_state = failed` (the engine gives up), then the file is removed. Idempotent.
    pub fn fail(&self) {
        let mut st = self.lock();
        if st.closed {
            return;
        }
        self.header(EPLB_OFF_ENGINE_STATE).store(EPLB_ENGINE_FAILED, Ordering::Release);
        self.close_locked(&mut st);
    }

    /// Removes the file (temporary or published); the mapping stays until the region is dropped.
    /// A region closed while still starting or running is marked failed first, so that a sidecar
    /// stops rather than waits.
    pub fn close(&self) {
        let mut st = self.lock();
        if st.closed {
            return;
        }
        let s = self.header(EPLB_OFF_ENGINE_STATE).load(Ordering::Acquire);
        if s == EPLB_ENGINE_STARTING || s == EPLB_ENGINE_RUNNING {
            self.header(EPLB_OFF_ENGINE_STATE).store(EPLB_ENGINE_FAILED, Ordering::Release);
        }
        self.close_locked(&mut st);
    }

    fn close_locked(&self, st: &mut State) {
        st.closed = true;
        for p in [st.tmp_path.take(), st.published.then(|| self.path.clone())].into_iter().flatten() {
            if let Ok(c) = CString::new(p) {
                // SAFETY: a valid C string; failure (already gone) is fine.
                unsafe { libc::unlink(c.as_ptr()) };
            }
        }
    }

    /// The tensor names of a layer (table order).
    pub fn tensor_names(&self) -> &[String] {
        &self.names
    }
}

impl Drop for EngineRegion {
    fn drop(&mut self) {
        self.close();
    }
}

/// Bytes from a tensor's offset to the end of its last listed row.
fn extent(rows: u32, row_stride: u64, row_bytes: u64) -> u64 {
    if rows == 0 {
        0
    } else {
        (rows as u64 - 1) * row_stride + row_bytes
    }
}

/// Checks one description; returns its contract dtype name.
fn check_tensor(
    t: &TensorSpec,
    layer: u32,
    num_layers: u32,
    slots_per_rank: u32,
    cuda: bool,
) -> Result<&'static str, ClientError> {
    let at = where_(layer, num_layers, &t.name);
    if t.name.is_empty() || t.name.len() > EPLB_NAME_BYTES as usize || t.name.contains('\0') {
        return Err(invalid(format!("{at}: field name: 1 to {EPLB_NAME_BYTES} UTF-8 bytes without NUL")));
    }
    let dtype = contract_dtype(&t.dtype).ok_or_else(|| {
        invalid(format!(
            "{at}: field dtype: {:?} is not one of {} (or a numpy/torch name of one)",
            t.dtype,
            DTYPES.join(" ")
        ))
    })?;
    if t.kind != EPLB_KIND_EXPERT && t.kind != EPLB_KIND_GLOBAL {
        return Err(invalid(format!(
            "{at}: field kind: {} is not EPLB_KIND_EXPERT ({EPLB_KIND_EXPERT}) or EPLB_KIND_GLOBAL ({EPLB_KIND_GLOBAL})",
            t.kind
        )));
    }
    if t.row_bytes == 0 {
        return Err(invalid(format!("{at}: field row_bytes: 0 (a row must have at least one byte)")));
    }
    if t.row_stride < t.row_bytes {
        return Err(invalid(format!(
            "{at}: field row_stride: {} < row_bytes {} (rows overlap)",
            t.row_stride, t.row_bytes
        )));
    }
    if t.kind == EPLB_KIND_EXPERT && t.rows != slots_per_rank {
        return Err(invalid(format!(
            "{at}: field rows: {}, but a per-expert tensor lists slots_per_rank = {slots_per_rank} rows",
            t.rows
        )));
    }
    if t.kind == EPLB_KIND_GLOBAL && t.rows < 1 {
        return Err(invalid(format!("{at}: field rows: 0: a global tensor lists at least one row")));
    }
    if (t.rows as u128 - 1) * t.row_stride as u128 + t.row_bytes as u128 >= 1u128 << 62 {
        return Err(invalid(format!("{at}: field row_stride: the tensor's extent does not fit in 2^62 bytes")));
    }
    if cuda {
        match t.ipc {
            None => return Err(invalid(format!("{at}: field ipc_handle: NULL with CUDA weights"))),
            Some((_, off)) if off >= 1 << 62 => {
                return Err(invalid(format!("{at}: field ipc_offset: {off} is beyond any allocation")))
            }
            _ => {}
        }
    }
    Ok(dtype)
}

/// The header's 4096 bytes (the fixed part from `h`, the rest zero).
fn header_bytes(h: &Header) -> Vec<u8> {
    let mut out = vec![0u8; EPLB_HEADER_BYTES as usize];
    let mut put = |at: u32, b: &[u8]| out[at as usize..at as usize + b.len()].copy_from_slice(b);
    put(EPLB_OFF_MAGIC, &h.magic.to_le_bytes());
    for (at, v) in [
        (EPLB_OFF_VERSION, h.version),
        (EPLB_OFF_HEADER_BYTES, h.header_bytes),
        (EPLB_OFF_NUM_LAYERS, h.num_layers),
        (EPLB_OFF_SLOTS_PER_RANK, h.slots_per_rank),
        (EPLB_OFF_NUM_LOGICAL, h.num_logical),
        (EPLB_OFF_WORLD_SIZE, h.world_size),
        (EPLB_OFF_RANK, h.rank),
        (EPLB_OFF_RING_LEN, h.ring_len),
        (EPLB_OFF_NUM_TENSORS, h.num_tensors),
        (EPLB_OFF_WEIGHTS_KIND, h.weights_kind),
        (EPLB_OFF_MINOR_VERSION, h.minor_version),
        (EPLB_OFF_COUNTS_KIND, h.counts_kind),
        (EPLB_OFF_NUM_HANDLES, h.num_handles),
    ] {
        put(at, &v.to_le_bytes());
    }
    for (at, v) in [
        (EPLB_OFF_EXPERT_BYTES, h.expert_bytes),
        (EPLB_OFF_TOTAL_BYTES, h.total_bytes),
        (EPLB_OFF_RING_OFFSET, h.ring_offset),
        (EPLB_OFF_RING_ENTRY_BYTES, h.ring_entry_bytes),
        (EPLB_OFF_PLACEMENT_OFFSET, h.placement_offset),
        (EPLB_OFF_EPOCHS_OFFSET, h.epochs_offset),
        (EPLB_OFF_COMMAND_OFFSET, h.command_offset),
        (EPLB_OFF_TABLE_OFFSET, h.table_offset),
        (EPLB_OFF_IPC_OFFSET, h.ipc_offset),
        (EPLB_OFF_ENGINE_PID, h.engine_pid),
        (EPLB_OFF_ENGINE_STATE, h.engine_state),
    ] {
        put(at, &v.to_le_bytes());
    }
    out
}

fn errno_text() -> String {
    std::io::Error::last_os_error().to_string()
}

fn cpath(p: &str) -> Result<CString, ClientError> {
    CString::new(p).map_err(|_| invalid(format!("{p:?}: NUL in the path")))
}

/// Refuses a region larger than the free space of `/dev/shm` (tmpfs pages would fail later
/// with SIGBUS on first touch).
fn check_free_space(path: &str, total_bytes: u64) -> Result<(), ClientError> {
    let dir = cpath(SHM_DIR)?;
    // SAFETY: zeroed is a valid statvfs; a valid path and out-pointer.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(dir.as_ptr(), &mut st) } != 0 {
        return Ok(());
    }
    let free = st.f_bavail as u64 * st.f_frsize as u64;
    if total_bytes > free {
        return Err(io(format!(
            "{path}: the region needs {total_bytes} bytes ({:.2} GiB) but {SHM_DIR} has {free} free ({:.2} GiB): enlarge {SHM_DIR} (docker --shm-size) or shrink the region",
            total_bytes as f64 / (1u64 << 30) as f64,
            free as f64 / (1u64 << 30) as f64
        )));
    }
    Ok(())
}

/// A region left at `path` by a crashed engine is replaced; one whose engine lives, or a file
/// that is not a region, is an error (never blocking on a FIFO or device).
fn check_existing(path: &str) -> Result<(), ClientError> {
    let c = cpath(path)?;
    // SAFETY: zeroed is a valid stat; valid path and out-pointer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::lstat(c.as_ptr(), &mut st) } != 0 {
        return Ok(());
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(io(format!("{path} exists and is not a regular file: remove it or choose another name")));
    }
    // SAFETY: valid path; O_NONBLOCK|O_NOFOLLOW never blocks or follows.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_CLOEXEC) };
    if fd < 0 {
        return Ok(());
    }
    let mut head = [0u8; 128];
    // SAFETY: a valid buffer of 128 bytes.
    let n = unsafe { libc::pread(fd, head.as_mut_ptr().cast(), 128, 0) };
    // SAFETY: fd is ours.
    unsafe { libc::close(fd) };
    if n < 128 || u64::from_le_bytes(head[..8].try_into().expect("8")) != EPLB_MAGIC {
        return Err(io(format!("{path} exists and is not an eplb region: remove it or choose another name")));
    }
    let pid = u64::from_le_bytes(head[120..128].try_into().expect("8"));
    if pid_alive(pid) {
        return Err(io(format!("{path} belongs to running engine pid {pid}: choose another name")));
    }
    Ok(())
}

fn pid_alive(pid: u64) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks existence and permission.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Creates `tmp` (O_EXCL, 0600; a regular leftover with our pid is removed once), sizes it and
/// maps it shared.
fn create_mapped(tmp: &str, len: usize) -> Result<Map, ClientError> {
    let c = cpath(tmp)?;
    let mut fd = -1;
    for _ in 0..2 {
        // SAFETY: a valid path.
        fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o600,
            )
        };
        if fd >= 0 {
            break;
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EEXIST) {
            return Err(io(format!("{tmp}: cannot create the region file: {err}")));
        }
        // SAFETY: zeroed stat, valid path.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::lstat(c.as_ptr(), &mut st) } == 0 && st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(io(format!("{tmp} exists and is not a regular file: remove it")));
        }
        // SAFETY: valid path.
        unsafe { libc::unlink(c.as_ptr()) };
    }
    if fd < 0 {
        return Err(io(format!("{tmp} keeps appearing: another process uses this name")));
    }
    let fail = |what: &str| {
        let e = errno_text();
        // SAFETY: fd is ours; the path is valid.
        unsafe {
            libc::close(fd);
            libc::unlink(c.as_ptr());
        }
        io(format!("{tmp}: {what}: {e}"))
    };
    // SAFETY: fd is ours.
    if unsafe { libc::ftruncate(fd, len as libc::off_t) } != 0 {
        return Err(fail("cannot size the region file"));
    }
    // SAFETY: a fresh shared mapping of the whole file.
    let ptr =
        unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0) };
    if ptr == libc::MAP_FAILED {
        return Err(fail("mmap failed"));
    }
    // SAFETY: fd is ours; the mapping keeps the file.
    unsafe { libc::close(fd) };
    Ok(Map { ptr: ptr.cast(), len })
}

fn rename(from: &str, to: &str) -> Result<(), ClientError> {
    let (a, b) = (cpath(from)?, cpath(to)?);
    // SAFETY: valid paths.
    if unsafe { libc::rename(a.as_ptr(), b.as_ptr()) } != 0 {
        return Err(io(format!("cannot rename {from} to {to}: {}", errno_text())));
    }
    Ok(())
}
