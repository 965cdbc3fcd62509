//! The C API (docs/c-api.md; `include/eplb_client.h` is generated from this file and
//! [`crate::layout`]). Every function catches panics (`EPLB_ERR_PANIC`: nothing unwinds into C),
//! checks its pointers for NULL and its lengths, and leaves a message for
//! [`eplb_last_error`] (per thread) when it fails. Nothing here aborts the engine.
#![allow(non_camel_case_types)]

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::layout::*;
use crate::region::{AgreeFn, ApplyFn, ClientError, Config, EngineRegion, ErrorKind, TensorSpec};

/// What every function returns.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum eplb_status {
    EPLB_OK = 0,
    /// A bad argument or table (the message names layer, tensor and field).
    EPLB_ERR_INVALID = 1,
    /// Called out of order (record of a wrong step, after finish, ...).
    EPLB_ERR_STATE = 2,
    /// The region file: exists or in use, no space, mmap failed (errno in the message).
    EPLB_ERR_IO = 3,
    /// The sidecar failed or vanished, or a command was malformed.
    EPLB_ERR_SIDECAR = 4,
    /// The engine's agree or apply callback returned non-zero.
    EPLB_ERR_CALLBACK = 5,
    /// An internal bug caught at the FFI boundary (never unwinds into C).
    EPLB_ERR_PANIC = 6,
}

/// One region per engine rank (opaque).
pub struct eplb_region {
    inner: EngineRegion,
}

/// One tensor of one layer (see docs/c-api.md).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct eplb_tensor_desc {
    /// At most 24 bytes, e.g. "w13_weight".
    pub name: *const c_char,
    /// A contract dtype name (f64 f32 f16 bf16 i64 i32 i16 i8 u8 f8e4m3 f8e5m2 e8m0 fp4x2) or its
    /// numpy/torch name ("float8_e4m3fn", "float32", "bfloat16", "uint8", ...), stored as the
    /// contract's.
    pub dtype: *const c_char,
    /// `EPLB_KIND_EXPERT` (1) or `EPLB_KIND_GLOBAL` (2).
    pub kind: u32,
    /// Per-expert: the routed slots eplb may move (== slots_per_rank); global: its rows.
    pub rows: u32,
    pub row_bytes: u64,
    /// >= row_bytes.
    pub row_stride: u64,
    /// `EPLB_WEIGHTS_CUDA_IPC`: the allocation's `cudaIpcMemHandle_t` (64 bytes, from
    /// `cudaIpcGetMemHandle` on the allocation base); equal handles are one allocation.
    /// Ignored with host weights.
    pub ipc_handle: *const u8,
    /// `EPLB_WEIGHTS_CUDA_IPC`: the tensor's byte offset from the allocation's base.
    pub ipc_offset: u64,
}

/// A region's shape, kinds and initial contents.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct eplb_config {
    pub rank: u32,
    pub world_size: u32,
    pub num_layers: u32,
    pub slots_per_rank: u32,
    pub num_logical: u32,
    /// 0: the default 64.
    pub ring_len: u32,
    /// `EPLB_WEIGHTS_HOST` (0) or `EPLB_WEIGHTS_CUDA_IPC` (1).
    pub weights_kind: u32,
    /// `EPLB_COUNTS_LOCAL` or `EPLB_COUNTS_PHYSICAL`.
    pub counts_kind: u32,
    /// Tensors per layer.
    pub num_tensors: u32,
    /// `[num_layers][num_tensors]`, row-major.
    pub tensors: *const eplb_tensor_desc,
    /// `[num_tensors]`: the one-layer staging (per-expert entries only are used); may be NULL
    /// for host weights.
    pub staging: *const eplb_tensor_desc,
    /// `[num_layers][world_size * slots_per_rank]`: the initial placement.
    pub phy2log: *const i32,
}

/// `agree(user, have, &min, &max)`: the min and max of `have` over every engine rank (the
/// engine's collective). Called once per boundary on every rank. Returns 0 on success.
pub type eplb_agree_fn = Option<unsafe extern "C" fn(*mut c_void, u64, *mut u64, *mut u64) -> c_int>;

/// `apply(user, layer, slots, num_slots)`: CUDA weights: copy row s of every per-expert staging
/// tensor into `layer`'s tensors for every s in `slots`, and return once the copy completed.
/// Host weights: NULL, or a notification after the library's copy. Returns 0 on success.
pub type eplb_apply_fn = Option<unsafe extern "C" fn(*mut c_void, u32, *const u32, usize) -> c_int>;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// After a call that succeeded: the message is empty, without an allocation when it already is
/// (the step's calls succeed every step; a malloc and a free with cold caches cost more than the
/// rest of the call).
fn clear_error() {
    LAST_ERROR.with(|e| {
        let mut e = e.borrow_mut();
        if !e.as_bytes().is_empty() {
            *e = CString::default();
        }
    });
}

fn status_of(kind: ErrorKind) -> eplb_status {
    match kind {
        ErrorKind::Invalid => eplb_status::EPLB_ERR_INVALID,
        ErrorKind::State => eplb_status::EPLB_ERR_STATE,
        ErrorKind::Io => eplb_status::EPLB_ERR_IO,
        ErrorKind::Sidecar => eplb_status::EPLB_ERR_SIDECAR,
        ErrorKind::Callback => eplb_status::EPLB_ERR_CALLBACK,
    }
}

fn bad(msg: impl Into<String>) -> ClientError {
    ClientError { kind: ErrorKind::Invalid, message: msg.into() }
}

/// Runs `f` at the boundary: its error becomes a status and this thread's message; a panic
/// becomes `EPLB_ERR_PANIC`.
fn guard(what: &str, f: impl FnOnce() -> Result<(), ClientError>) -> eplb_status {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => {
            clear_error();
            eplb_status::EPLB_OK
        }
        Ok(Err(e)) => {
            set_error(&format!("{what}: {}", e.message));
            status_of(e.kind)
        }
        Err(p) => {
            let why = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_error(&format!("{what}: internal error (a bug in libeplb_client, please report it): {why}"));
            eplb_status::EPLB_ERR_PANIC
        }
    }
}

fn region<'a>(r: *const eplb_region) -> Result<&'a EngineRegion, ClientError> {
    // SAFETY: non-NULL pointers come from eplb_create and live until eplb_close (the contract of
    // the C API).
    unsafe { r.as_ref() }.map(|r| &r.inner).ok_or_else(|| bad("the region is NULL"))
}

/// A C string argument, as UTF-8.
///
/// # Safety
/// `p` is NULL or a NUL-terminated string.
unsafe fn text(p: *const c_char, what: &str) -> Result<String, ClientError> {
    if p.is_null() {
        return Err(bad(format!("{what} is NULL")));
    }
    CStr::from_ptr(p).to_str().map(str::to_string).map_err(|_| bad(format!("{what} is not UTF-8")))
}

/// # Safety
/// `d` points to a valid description; its strings are NUL-terminated, its handle 64 bytes.
unsafe fn spec(d: &eplb_tensor_desc, at: &str, cuda: bool) -> Result<TensorSpec, ClientError> {
    let ipc = if cuda && !d.ipc_handle.is_null() {
        let mut h = [0u8; 64];
        h.copy_from_slice(std::slice::from_raw_parts(d.ipc_handle, 64));
        Some((h, d.ipc_offset))
    } else {
        None
    };
    Ok(TensorSpec {
        name: text(d.name, &format!("{at}: field name"))?,
        dtype: text(d.dtype, &format!("{at}: field dtype"))?,
        kind: d.kind,
        rows: d.rows,
        row_bytes: d.row_bytes,
        row_stride: d.row_stride,
        ipc,
    })
}

struct ApplyCallback {
    f: unsafe extern "C" fn(*mut c_void, u32, *const u32, usize) -> c_int,
    user: *mut c_void,
}

// SAFETY: the engine's callback and its user pointer are called only from the engine's own calls
// of at_step_boundary (the C API's threading rule: the caller owns `user`'s thread safety).
unsafe impl Send for ApplyCallback {}

impl ApplyCallback {
    fn call(&self, layer: u32, slots: &[u32]) -> Result<(), i32> {
        // SAFETY: the engine's callback, with its own user pointer and a valid slot list.
        let rc = unsafe { (self.f)(self.user, layer, slots.as_ptr(), slots.len()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(rc)
        }
    }
}

/// Checks everything and creates `/dev/shm/eplb-NAME-RANK` under a temporary name (not yet
/// visible to a sidecar). On success `*out` is the region (free it with `eplb_close`).
///
/// # Safety
/// Pointers are NULL or valid for the lengths `cfg` gives.
#[no_mangle]
pub unsafe extern "C" fn eplb_create(
    name: *const c_char,
    cfg: *const eplb_config,
    apply: eplb_apply_fn,
    apply_user: *mut c_void,
    out: *mut *mut eplb_region,
) -> eplb_status {
    guard("eplb_create", || {
        if out.is_null() {
            return Err(bad("out is NULL"));
        }
        *out = std::ptr::null_mut();
        let name = text(name, "name")?;
        let cfg = cfg.as_ref().ok_or_else(|| bad("cfg is NULL"))?;
        if !(1..=EPLB_MAX_TENSORS).contains(&cfg.num_tensors) {
            return Err(bad(format!("num_tensors {} is not in 1..={EPLB_MAX_TENSORS}", cfg.num_tensors)));
        }
        if cfg.num_layers == 0 || cfg.num_layers >= 1 << 31 || cfg.world_size == 0 || cfg.slots_per_rank == 0 {
            return Err(bad("num_layers, world_size and slots_per_rank must be in 1..2^31"));
        }
        let p = cfg.world_size as u64 * cfg.slots_per_rank as u64;
        if p > i32::MAX as u64 || cfg.num_layers as u64 * p > 1 << 40 {
            return Err(bad(format!("{} layers x {p} physical slots: too large a region", cfg.num_layers)));
        }
        if cfg.tensors.is_null() {
            return Err(bad("cfg->tensors is NULL"));
        }
        if cfg.phy2log.is_null() {
            return Err(bad("cfg->phy2log is NULL"));
        }
        let cuda = cfg.weights_kind == EPLB_WEIGHTS_CUDA_IPC;
        let (l, t_n) = (cfg.num_layers as usize, cfg.num_tensors as usize);
        let descs = std::slice::from_raw_parts(cfg.tensors, l * t_n);
        let tensors = descs
            .iter()
            .enumerate()
            .map(|(i, d)| spec(d, &format!("layer {}, tensor {}", i / t_n, i % t_n), cuda))
            .collect::<Result<Vec<_>, _>>()?;
        let staging = if cuda && !cfg.staging.is_null() {
            let descs = std::slice::from_raw_parts(cfg.staging, t_n);
            let mut out = Vec::with_capacity(t_n);
            for (t, d) in descs.iter().enumerate() {
                if tensors[t].kind == EPLB_KIND_GLOBAL {
                    // A global has no staging: its entry is not read.
                    out.push(tensors[t].clone());
                } else {
                    out.push(spec(d, &format!("staging, tensor {t}"), true)?);
                }
            }
            Some(out)
        } else {
            None
        };
        let phy2log = std::slice::from_raw_parts(cfg.phy2log, l * p as usize);
        let apply: Option<ApplyFn> = apply.map(|f| {
            let cb = ApplyCallback { f, user: apply_user };
            Box::new(move |layer: u32, slots: &[u32]| cb.call(layer, slots)) as ApplyFn
        });
        let config = Config {
            rank: cfg.rank,
            world_size: cfg.world_size,
            num_layers: cfg.num_layers,
            slots_per_rank: cfg.slots_per_rank,
            num_logical: cfg.num_logical,
            ring_len: cfg.ring_len,
            weights_kind: cfg.weights_kind,
            counts_kind: cfg.counts_kind,
        };
        let inner = EngineRegion::create(&name, config, &tensors, staging.as_deref(), phy2log, apply)?;
        *out = Box::into_raw(Box::new(eplb_region { inner }));
        Ok(())
    })
}

/// Host weights: where `layer`'s tensor `tensor` lives in the region (`layer == num_layers`:
/// the staging layer); the engine computes with and initialises this memory. NULL on error, for
/// a global tensor's staging and for CUDA weights.
///
/// # Safety
/// `r` is NULL or a live region.
#[no_mangle]
pub unsafe extern "C" fn eplb_tensor_ptr(r: *mut eplb_region, layer: u32, tensor: u32) -> *mut c_void {
    let mut out = std::ptr::null_mut();
    guard("eplb_tensor_ptr", || {
        let reg = region(r)?;
        match reg.tensor_ptr(layer, tensor) {
            Some(p) => {
                out = p.cast();
                Ok(())
            }
            None => Err(bad(format!(
                "no host tensor at layer {layer}, tensor {tensor} (num_layers {}, num_tensors {}; CUDA weights and a global's staging have none)",
                reg.config().num_layers,
                reg.num_tensors()
            ))),
        }
    });
    out
}

/// Renames the region into place (`engine_state = running`): the sidecar may attach.
///
/// # Safety
/// `r` is NULL or a live region.
#[no_mangle]
pub unsafe extern "C" fn eplb_publish(r: *mut eplb_region) -> eplb_status {
    guard("eplb_publish", || region(r)?.publish())
}

/// After the forward pass of `step`: the ring entry (seqlock), then `engine_step = step + 1`.
/// `counts`: `num_layers * (slots_per_rank or num_physical)` values, each below 2^40.
///
/// # Safety
/// `r` is NULL or a live region; `counts` is NULL or holds `num_counts` values.
#[no_mangle]
pub unsafe extern "C" fn eplb_record(
    r: *mut eplb_region,
    step: u64,
    phase: u32,
    counts: *const u64,
    num_counts: usize,
    tokens: u64,
    moe_ns: u64,
) -> eplb_status {
    guard("eplb_record", || {
        let reg = region(r)?;
        if counts.is_null() {
            return Err(bad("counts is NULL"));
        }
        let want = reg.config().num_layers as usize * reg.count_cols();
        if num_counts != want {
            return Err(bad(format!("num_counts {num_counts}, want num_layers x count columns = {want}")));
        }
        reg.record(step, phase, std::slice::from_raw_parts(counts, num_counts), tokens, moe_ns)
    })
}

/// Before running `step` (== engine_step): the mailbox, `agree`, then apply or answer, and the
/// heartbeat. `*applied_layer` (may be NULL): the layer applied, or -1.
///
/// # Safety
/// `r` is NULL or a live region; `applied_layer` is NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn eplb_at_step_boundary(
    r: *mut eplb_region,
    step: u64,
    agree: eplb_agree_fn,
    agree_user: *mut c_void,
    applied_layer: *mut i32,
) -> eplb_status {
    if !applied_layer.is_null() {
        *applied_layer = -1;
    }
    guard("eplb_at_step_boundary", || {
        let reg = region(r)?;
        let mut call = |have: u64| -> Result<(u64, u64), i32> {
            let f = agree.expect("only called when given");
            let (mut lo, mut hi) = (0u64, 0u64);
            // SAFETY: the engine's collective with its own user pointer and valid out-pointers.
            let rc = unsafe { f(agree_user, have, &mut lo, &mut hi) };
            if rc == 0 {
                Ok((lo, hi))
            } else {
                Err(rc)
            }
        };
        let agree_dyn: Option<AgreeFn<'_>> = if agree.is_some() { Some(&mut call) } else { None };
        let applied = reg.at_step_boundary(step, agree_dyn)?;
        if let (Some(layer), false) = (applied, applied_layer.is_null()) {
            *applied_layer = layer as i32;
        }
        Ok(())
    })
}

/// The boundary in two calls, for engines whose collective does not fit a callback (or runs
/// asynchronously): the first half of the boundary before running `step` (== engine_step) reads
/// the mailbox and sets `*have` (the id of the command every rank must have to apply it at this
/// boundary, or 0) and `*posted` (may be NULL: the id of a command posted and not yet answered,
/// whatever its step, or 0). The engine then agrees (the min and max of `have` over its ranks,
/// every rank at every boundary) and calls [`eplb_boundary_end`]. When `*have` and `*posted` are
/// both 0, the end has nothing to do and may be skipped. Calling it again before the end reads the
/// mailbox again (after [`eplb_table_fault`], the command is then rejected, not applied).
///
/// # Safety
/// `r` is NULL or a live region; `have` is NULL or valid; `posted` is NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn eplb_boundary_begin(
    r: *mut eplb_region,
    step: u64,
    have: *mut u64,
    posted: *mut u64,
) -> eplb_status {
    if !posted.is_null() {
        *posted = 0;
    }
    guard("eplb_boundary_begin", || {
        let reg = region(r)?;
        if have.is_null() {
            return Err(bad("have is NULL"));
        }
        let begun = reg.boundary_begin(step)?;
        *have = begun.have;
        if !posted.is_null() {
            *posted = begun.posted;
        }
        Ok(())
    })
}

/// The second half of the boundary of `step`, after [`eplb_boundary_begin`] of the same step:
/// `lo`, `hi` are the min and max of `have` over every engine rank. Applies the command in place
/// when `lo == hi == have != 0`, else answers it (cancelled, or rejected when invalid).
/// `*applied_layer` (may be NULL): the layer applied, or -1.
///
/// # Safety
/// `r` is NULL or a live region; `applied_layer` is NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn eplb_boundary_end(
    r: *mut eplb_region,
    step: u64,
    lo: u64,
    hi: u64,
    applied_layer: *mut i32,
) -> eplb_status {
    if !applied_layer.is_null() {
        *applied_layer = -1;
    }
    guard("eplb_boundary_end", || {
        let applied = region(r)?.boundary_end(step, lo, hi)?;
        if let (Some(layer), false) = (applied, applied_layer.is_null()) {
            *applied_layer = layer as i32;
        }
        Ok(())
    })
}

/// The live `phy2log` row of `layer` into `out` (`len` == num_physical).
///
/// # Safety
/// `r` is NULL or a live region; `out` is NULL or holds `len` values.
#[no_mangle]
pub unsafe extern "C" fn eplb_phy2log(r: *const eplb_region, layer: u32, out: *mut i32, len: usize) -> eplb_status {
    guard("eplb_phy2log", || {
        let reg = region(r)?;
        if out.is_null() {
            return Err(bad("out is NULL"));
        }
        if len != reg.num_physical() {
            return Err(bad(format!("len {len}, but num_physical is {}", reg.num_physical())));
        }
        reg.phy2log_row(layer, std::slice::from_raw_parts_mut(out, len))
    })
}

/// `engine_heartbeat_ns = now`. Lock-free: a heartbeat thread may call it during any other call.
///
/// # Safety
/// `r` is NULL or a live region.
#[no_mangle]
pub unsafe extern "C" fn eplb_heartbeat(r: *mut eplb_region) -> eplb_status {
    guard("eplb_heartbeat", || {
        region(r)?.heartbeat();
        Ok(())
    })
}

/// The engine found `layer`'s tensor `tensor` re-allocated (`layer == num_layers`: staging):
/// `table_fault = 1 + entry`, and every command is rejected from now on.
///
/// # Safety
/// `r` is NULL or a live region.
#[no_mangle]
pub unsafe extern "C" fn eplb_table_fault(r: *mut eplb_region, layer: u32, tensor: u32) -> eplb_status {
    guard("eplb_table_fault", || region(r)?.table_fault(layer, tensor))
}

/// Every step done: a pending command is answered cancelled, `engine_state = finished`, then
/// waits up to `wait_detach_ms` for an attached sidecar to leave, and removes the file.
///
/// # Safety
/// `r` is NULL or a live region.
#[no_mangle]
pub unsafe extern "C" fn eplb_finish(r: *mut eplb_region, wait_detach_ms: u64) -> eplb_status {
    guard("eplb_finish", || region(r)?.finish(wait_detach_ms))
}

/// `engine_state = failed` (the engine gives up), and the file is removed.
///
/// # Safety
/// `r` is NULL or a live region.
#[no_mangle]
pub unsafe extern "C" fn eplb_fail(r: *mut eplb_region) -> eplb_status {
    guard("eplb_fail", || {
        region(r)?.fail();
        Ok(())
    })
}

/// Unmaps, removes the file (a region still running is marked failed first) and frees. NULL is
/// fine. No other call on `r` may run meanwhile or follow.
///
/// # Safety
/// `r` is NULL or a live region, not used after this call.
#[no_mangle]
pub unsafe extern "C" fn eplb_close(r: *mut eplb_region) {
    if r.is_null() {
        return;
    }
    let _ = guard("eplb_close", || {
        drop(Box::from_raw(r));
        Ok(())
    });
}

/// This thread's last message ("" if the last call succeeded). Valid until this thread's next
/// call into the library.
#[no_mangle]
pub extern "C" fn eplb_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// `EPLB_VERSION << 16 | EPLB_MINOR_VERSION`.
#[no_mangle]
pub extern "C" fn eplb_abi_version() -> u32 {
    EPLB_VERSION << 16 | EPLB_MINOR_VERSION
}
