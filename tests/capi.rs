//! libeplb_client (the C API) against the sidecar's own reader: a region the library creates
//! is opened and fully checked by `Region::open` (header, every table rule); records are read
//! back through the ring's sequence lock; commands posted through the mailbox are applied,
//! cancelled, rejected or missed exactly as the contract says; and the C smoke engine
//! (client/tests/c/smoke.c) runs beside the real worker (`--force-moves`) until layers switch.

use std::ffi::{c_int, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use eplb::engine::shm::region::{ack, off, region_path, Command as Cmd, Region, RingRead};
use eplb_client::capi::*;
use eplb_client::layout::*;

mod common;

fn last_error() -> String {
    // SAFETY: the library's thread-local message, valid until this thread's next call.
    unsafe { CStr::from_ptr(eplb_last_error()) }.to_string_lossy().into_owned()
}

struct Fixture {
    region: *mut eplb_region,
    name: String,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // SAFETY: the region from eplb_create, closed once.
        unsafe { eplb_close(self.region) };
        let _ = std::fs::remove_file(region_path(&self.name, 0));
    }
}

const L: u32 = 2;
const S: u32 = 4;
const E: u32 = 3;

/// One rank of `world` (rank 0), 2 layers, 4 slots, 3 experts; tensors: a per-expert one with
/// padded rows and a global one.
fn create(test: &str, world: u32) -> Fixture {
    let name = format!("capi{}-{test}", std::process::id());
    let (w13, f8, bias, f32_) = (c"w13_weight", c"float8_e4m3fn", c"bias", c"f32");
    let desc = |n: &CStr, d: &CStr, kind, rows, rb, rs| eplb_tensor_desc {
        name: n.as_ptr(),
        dtype: d.as_ptr(),
        kind,
        rows,
        row_bytes: rb,
        row_stride: rs,
        ipc_handle: std::ptr::null(),
        ipc_offset: 0,
    };
    let tensors: Vec<eplb_tensor_desc> = (0..L)
        .flat_map(|_| [desc(w13, f8, EPLB_KIND_EXPERT, S, 48, 64), desc(bias, f32_, EPLB_KIND_GLOBAL, 2, 16, 16)])
        .collect();
    let p = (world * S) as usize;
    let phy2log: Vec<i32> = (0..L as usize * p).map(|i| ((i % p) % E as usize) as i32).collect();
    let cfg = eplb_config {
        rank: 0,
        world_size: world,
        num_layers: L,
        slots_per_rank: S,
        num_logical: E,
        ring_len: 16,
        weights_kind: EPLB_WEIGHTS_HOST,
        counts_kind: EPLB_COUNTS_LOCAL,
        num_tensors: 2,
        tensors: tensors.as_ptr(),
        staging: std::ptr::null(),
        phy2log: phy2log.as_ptr(),
    };
    let cname = CString::new(name.clone()).unwrap();
    let mut r = std::ptr::null_mut();
    // SAFETY: valid pointers for the lengths cfg gives.
    let s = unsafe { eplb_create(cname.as_ptr(), &cfg, None, std::ptr::null_mut(), &mut r) };
    assert_eq!(s, eplb_status::EPLB_OK, "{}", last_error());
    Fixture { region: r, name }
}

fn open(f: &Fixture) -> Region {
    Region::open(Path::new(&region_path(&f.name, 0))).unwrap_or_else(|e| panic!("the sidecar's reader refuses it: {e}"))
}

fn boundary(f: &Fixture, step: u64, agree: eplb_agree_fn, user: *mut c_void) -> (eplb_status, i32) {
    let mut applied = -7;
    // SAFETY: a live region and a valid out-pointer.
    let s = unsafe { eplb_at_step_boundary(f.region, step, agree, user, &mut applied) };
    (s, applied)
}

fn record(f: &Fixture, step: u64, counts: &[u64]) -> eplb_status {
    // SAFETY: a live region; counts holds counts.len() values.
    unsafe { eplb_record(f.region, step, EPLB_PHASE_DECODE, counts.as_ptr(), counts.len(), 9, 77) }
}

#[test]
fn a_region_of_the_library_passes_every_check_of_the_sidecars_reader() {
    let f = create("open", 1);
    // SAFETY: a live region.
    assert_eq!(unsafe { eplb_publish(f.region) }, eplb_status::EPLB_OK);
    let reg = open(&f);
    let l = &reg.layout;
    assert_eq!((l.num_layers, l.slots_per_rank, l.num_logical, l.world_size), (2, 4, 3, 1));
    assert_eq!((l.num_tensors, l.expert_bytes, l.ring_len), (2, 48, 16));
    assert_eq!(l.entry(0, 0).name, "w13_weight");
    assert_eq!(l.entry(0, 0).dtype, "f8e4m3", "numpy/torch dtype names are stored as the contract's");
    assert_eq!((l.entry(1, 0).row_stride, l.entry(2, 0).row_stride), (64, 48), "staging rows are packed");
    assert_eq!(reg.phy2log(), vec![0, 1, 2, 0, 0, 1, 2, 0]);
    assert_eq!(reg.get(off::ENGINE_STATE), EPLB_ENGINE_RUNNING);
    // The library's pointers are the table's rows.
    // SAFETY: a live region.
    let p = unsafe { eplb_tensor_ptr(f.region, 1, 0) } as usize;
    // SAFETY: as above.
    let base = unsafe { eplb_tensor_ptr(f.region, 0, 0) } as usize - l.entry(0, 0).offset as usize;
    assert_eq!(p - base, l.entry(1, 0).offset as usize);
}

#[test]
fn records_are_read_back_through_the_ring_and_wrong_steps_are_refused() {
    let f = create("ring", 1);
    let reg = {
        // SAFETY: a live region.
        assert_eq!(unsafe { eplb_publish(f.region) }, eplb_status::EPLB_OK);
        open(&f)
    };
    for step in 0..40u64 {
        let counts: Vec<u64> = (0..8).map(|i| step * 10 + i).collect();
        assert_eq!(boundary(&f, step, None, std::ptr::null_mut()), (eplb_status::EPLB_OK, -1));
        assert_eq!(record(&f, step, &counts), eplb_status::EPLB_OK, "{}", last_error());
        match reg.read_step(step) {
            RingRead::Step { phase, tokens, moe_ns, counts: got } => {
                assert_eq!((phase, tokens, moe_ns), (2, 9, 77));
                assert_eq!(got, counts);
            }
            other => panic!("step {step}: {other:?}"),
        }
    }
    assert_eq!(reg.get(off::ENGINE_STEP), 40);
    assert_eq!(reg.read_step(3), RingRead::Lost, "16 entries: step 3 was overwritten");
    assert_eq!(record(&f, 7, &[0; 8]), eplb_status::EPLB_ERR_STATE);
    assert!(last_error().contains("record(7) but engine_step is 40"), "{}", last_error());
    assert_eq!(record(&f, 40, &[0; 7]), eplb_status::EPLB_ERR_INVALID);
    assert_eq!(record(&f, 40, &[1 << 40; 8]), eplb_status::EPLB_ERR_INVALID);
    assert!(last_error().contains("beyond"), "{}", last_error());
    assert_eq!(boundary(&f, 39, None, std::ptr::null_mut()).0, eplb_status::EPLB_ERR_STATE);
    // SAFETY: a NULL region is refused, not dereferenced.
    assert_eq!(unsafe { eplb_publish(std::ptr::null_mut()) }, eplb_status::EPLB_ERR_INVALID);
}

/// Stages expert `e`'s bytes into staging row `slot` as the sidecar would.
fn stage(reg: &Region, slot: usize, byte: u8) {
    let e = reg.layout.entry(reg.layout.num_layers, 0);
    // SAFETY: the staging rows are the sidecar's between posts; the engine is not in a boundary.
    unsafe { reg.bytes_mut(e.row_at(slot) as usize, e.row_bytes as usize) }.fill(byte);
}

fn post(reg: &Region, id: u64, layer: usize, apply_step: u64, epoch: u64, row: Vec<i32>, mask: Vec<bool>) {
    reg.post(&Cmd { id, layer, apply_step, epoch, new_row: row, copy_mask: mask });
}

#[test]
fn commands_are_applied_missed_and_rejected_as_the_contract_says() {
    let f = create("mailbox", 1);
    // SAFETY: a live region.
    assert_eq!(unsafe { eplb_publish(f.region) }, eplb_status::EPLB_OK);
    let reg = open(&f);
    let mut step = 0u64;
    let run = |n: u64, step: &mut u64| {
        let mut last = -1;
        for _ in 0..n {
            let (s, a) = boundary(&f, *step, None, std::ptr::null_mut());
            assert_eq!(s, eplb_status::EPLB_OK, "{}", last_error());
            last = last.max(a);
            assert_eq!(record(&f, *step, &[1; 8]), eplb_status::EPLB_OK);
            *step += 1;
        }
        last
    };
    run(3, &mut step);
    // Layer 1: slot 3 takes expert 2 (staged), at step 5.
    stage(&reg, 3, 0xab);
    post(&reg, 1, 1, 5, 1, vec![0, 1, 2, 2], vec![false, false, false, true]);
    assert_eq!(run(2, &mut step), -1, "not before its step");
    assert_eq!(reg.ack().0, 0);
    assert_eq!(run(1, &mut step), 1, "applied at step 5");
    assert_eq!(reg.ack(), (1, ack::APPLIED, 5));
    assert_eq!(reg.epoch(1).load(std::sync::atomic::Ordering::Acquire), 1);
    assert_eq!(&reg.phy2log()[4..], &[0, 1, 2, 2]);
    let live = reg.layout.entry(1, 0);
    assert!(reg.bytes(live.row_at(3) as usize, 48).iter().all(|&b| b == 0xab), "the staged row is live");
    assert!(reg.bytes(live.row_at(2) as usize, 48).iter().all(|&b| b == 0), "an unmasked row is untouched");
    let mut row = [0i32; 4];
    // SAFETY: a live region and a buffer of num_physical.
    assert_eq!(unsafe { eplb_phy2log(f.region, 1, row.as_mut_ptr(), 4) }, eplb_status::EPLB_OK);
    assert_eq!(row, [0, 1, 2, 2]);
    // SAFETY: as above, with a wrong length.
    assert_eq!(unsafe { eplb_phy2log(f.region, 1, row.as_mut_ptr(), 3) }, eplb_status::EPLB_ERR_INVALID);
    // A command for a step already run: missed.
    post(&reg, 2, 0, 2, 1, vec![0, 1, 2, 0], vec![false; 4]);
    run(1, &mut step);
    assert_eq!(reg.ack(), (2, ack::MISSED, 6));
    // A wrong epoch: rejected; so is a slot that changes without a copy.
    post(&reg, 3, 0, step, 5, vec![0, 1, 2, 0], vec![false; 4]);
    run(1, &mut step);
    assert_eq!(reg.ack(), (3, ack::REJECTED, 7));
    post(&reg, 4, 0, step, 1, vec![2, 1, 0, 0], vec![false; 4]);
    run(1, &mut step);
    assert_eq!(reg.ack(), (4, ack::REJECTED, 8));
    // After a table fault every command is rejected.
    // SAFETY: a live region.
    assert_eq!(unsafe { eplb_table_fault(f.region, L, 0) }, eplb_status::EPLB_OK);
    assert_eq!(reg.table_fault(), 2 * 2 + 1, "1 + the staging entry of tensor 0");
    post(&reg, 5, 0, step, 1, vec![0, 1, 2, 0], vec![false; 4]);
    run(1, &mut step);
    assert_eq!(reg.ack(), (5, ack::REJECTED, 9));
    // A pending command at finish is cancelled.
    post(&reg, 6, 0, step + 3, 1, vec![0, 1, 2, 0], vec![false; 4]);
    // SAFETY: a live region.
    assert_eq!(unsafe { eplb_finish(f.region, 0) }, eplb_status::EPLB_OK);
    assert_eq!(reg.ack(), (6, ack::CANCELLED, 10));
    assert_eq!(reg.get(off::ENGINE_STATE), EPLB_ENGINE_FINISHED);
    assert!(!Path::new(&region_path(&f.name, 0)).exists(), "finish removes the file");
    assert_eq!(boundary(&f, step, None, std::ptr::null_mut()).0, eplb_status::EPLB_ERR_STATE);
}

/// An agree callback over a fixed answer: `user` points to (min, max, calls).
unsafe extern "C" fn fixed_agree(user: *mut c_void, have: u64, lo: *mut u64, hi: *mut u64) -> c_int {
    let st = &mut *(user as *mut (u64, u64, u64, u64));
    st.2 += 1;
    st.3 = have;
    *lo = st.0;
    *hi = st.1;
    0
}

unsafe extern "C" fn failing_agree(_: *mut c_void, _: u64, _: *mut u64, _: *mut u64) -> c_int {
    -3
}

#[test]
fn with_several_ranks_a_command_not_every_rank_has_is_cancelled() {
    let f = create("agree", 2);
    let reg = {
        // SAFETY: a live region.
        assert_eq!(unsafe { eplb_publish(f.region) }, eplb_status::EPLB_OK);
        open(&f)
    };
    assert_eq!(boundary(&f, 0, None, std::ptr::null_mut()).0, eplb_status::EPLB_ERR_INVALID, "agree is required");
    let mut st = (0u64, 0u64, 0u64, 0u64);
    let user = &mut st as *mut _ as *mut c_void;
    assert_eq!(boundary(&f, 0, Some(fixed_agree), user), (eplb_status::EPLB_OK, -1));
    assert_eq!(record(&f, 0, &[0; 8]), eplb_status::EPLB_OK);
    let row = vec![0, 1, 2, 0, 1, 2, 0, 1];
    post(&reg, 9, 0, 1, 1, row.clone(), vec![false; 4]);
    // SAFETY: st lives across the calls.
    unsafe { (*(user as *mut (u64, u64, u64, u64))).0 = 0 };
    unsafe { (*(user as *mut (u64, u64, u64, u64))).1 = 9 };
    assert_eq!(boundary(&f, 1, Some(fixed_agree), user), (eplb_status::EPLB_OK, -1));
    assert_eq!(reg.ack(), (9, ack::CANCELLED, 1), "min 0 != max 9: another rank lacks it");
    assert_eq!(st.3, 9, "this rank had it");
    assert_eq!(record(&f, 1, &[0; 8]), eplb_status::EPLB_OK);
    post(&reg, 10, 0, 2, 1, row.clone(), vec![false; 4]);
    st.0 = 10;
    st.1 = 10;
    let user = &mut st as *mut _ as *mut c_void;
    assert_eq!(boundary(&f, 2, Some(fixed_agree), user), (eplb_status::EPLB_OK, 0));
    assert_eq!(reg.ack(), (10, ack::APPLIED, 2));
    assert_eq!(st.2, 3, "agree is called at every boundary");
    assert_eq!(record(&f, 2, &[0; 8]), eplb_status::EPLB_OK);
    assert_eq!(boundary(&f, 3, Some(failing_agree), std::ptr::null_mut()).0, eplb_status::EPLB_ERR_CALLBACK);
    assert!(last_error().contains("returned -3"), "{}", last_error());
}

fn begin(f: &Fixture, step: u64) -> (eplb_status, u64, u64) {
    let (mut have, mut posted) = (7u64, 7u64);
    // SAFETY: a live region and valid out-pointers.
    let s = unsafe { eplb_boundary_begin(f.region, step, &mut have, &mut posted) };
    (s, have, posted)
}

fn end(f: &Fixture, step: u64, lo: u64, hi: u64) -> (eplb_status, i32) {
    let mut applied = -7;
    // SAFETY: a live region and a valid out-pointer.
    let s = unsafe { eplb_boundary_end(f.region, step, lo, hi, &mut applied) };
    (s, applied)
}

/// The boundary in two calls (no callback): begin says what this rank has, the engine agrees,
/// end applies or answers; what `posted` reports, when the end may be skipped, and a begin again
/// after a table fault turning an apply into a rejection.
#[test]
fn the_two_phase_boundary_applies_cancels_and_rejects_as_the_callback_one_does() {
    let f = create("twophase", 2);
    let reg = {
        // SAFETY: a live region.
        assert_eq!(unsafe { eplb_publish(f.region) }, eplb_status::EPLB_OK);
        open(&f)
    };
    let row = vec![0, 1, 2, 0, 1, 2, 0, 1];
    // Nothing posted: have 0, posted 0, and the end may be skipped (the next begin starts over).
    assert_eq!(begin(&f, 0), (eplb_status::EPLB_OK, 0, 0));
    assert_eq!(record(&f, 0, &[0; 8]), eplb_status::EPLB_OK);
    // A command for a later step: posted, not had.
    post(&reg, 9, 0, 2, 1, row.clone(), vec![false; 4]);
    assert_eq!(begin(&f, 1), (eplb_status::EPLB_OK, 0, 9));
    assert_eq!(end(&f, 1, 0, 0), (eplb_status::EPLB_OK, -1));
    assert_eq!(reg.ack().0, 0, "nothing answered before its step");
    assert_eq!(record(&f, 1, &[0; 8]), eplb_status::EPLB_OK);
    // Its step: had; another rank lacks it (min 0): cancelled.
    assert_eq!(begin(&f, 2), (eplb_status::EPLB_OK, 9, 9));
    assert_eq!(end(&f, 2, 0, 9), (eplb_status::EPLB_OK, -1));
    assert_eq!(reg.ack(), (9, ack::CANCELLED, 2));
    assert_eq!(end(&f, 2, 9, 9).0, eplb_status::EPLB_ERR_STATE, "one end a begin");
    assert!(last_error().contains("without boundary_begin"), "{}", last_error());
    assert_eq!(record(&f, 2, &[0; 8]), eplb_status::EPLB_OK);
    // Every rank has it: applied.
    post(&reg, 10, 0, 3, 1, row.clone(), vec![false; 4]);
    assert_eq!(begin(&f, 3), (eplb_status::EPLB_OK, 10, 10));
    assert_eq!(end(&f, 4, 10, 10).0, eplb_status::EPLB_ERR_STATE, "the end of another step");
    assert_eq!(begin(&f, 3), (eplb_status::EPLB_OK, 10, 10), "begin again reads the mailbox again");
    assert_eq!(end(&f, 3, 10, 10), (eplb_status::EPLB_OK, 0));
    assert_eq!(reg.ack(), (10, ack::APPLIED, 3));
    assert_eq!(&reg.phy2log()[..8], &row[..]);
    assert_eq!(record(&f, 3, &[0; 8]), eplb_status::EPLB_OK);
    // Had at begin; the engine then finds a tensor moved: table_fault, begin again: rejected.
    post(&reg, 11, 1, 4, 1, row.clone(), vec![false; 4]);
    assert_eq!(begin(&f, 4), (eplb_status::EPLB_OK, 11, 11));
    // SAFETY: a live region.
    assert_eq!(unsafe { eplb_table_fault(f.region, 1, 0) }, eplb_status::EPLB_OK);
    assert_eq!(begin(&f, 4), (eplb_status::EPLB_OK, 0, 11), "invalid now: not had, still posted");
    assert_eq!(end(&f, 4, 0, 11), (eplb_status::EPLB_OK, -1));
    assert_eq!(reg.ack(), (11, ack::REJECTED, 4));
    // A begin for a step that is not engine_step, and a NULL have, are refused.
    assert_eq!(begin(&f, 9).0, eplb_status::EPLB_ERR_STATE);
    // SAFETY: a live region; have NULL on purpose.
    let s = unsafe { eplb_boundary_begin(f.region, 4, std::ptr::null_mut(), std::ptr::null_mut()) };
    assert_eq!(s, eplb_status::EPLB_ERR_INVALID);
    // SAFETY: NULL region on purpose.
    assert_eq!(
        unsafe { eplb_boundary_end(std::ptr::null_mut(), 4, 0, 0, std::ptr::null_mut()) },
        eplb_status::EPLB_ERR_INVALID
    );
}

#[test]
fn bad_input_is_refused_with_a_message_naming_the_field() {
    let name = CString::new(format!("capi{}-bad", std::process::id())).unwrap();
    let t = |kind, rows, rb, rs, dtype: &'static CStr| eplb_tensor_desc {
        name: c"w".as_ptr(),
        dtype: dtype.as_ptr(),
        kind,
        rows,
        row_bytes: rb,
        row_stride: rs,
        ipc_handle: std::ptr::null(),
        ipc_offset: 0,
    };
    let phy2log = [0i32, 1, 2, 0];
    let try_create = |tensors: &[eplb_tensor_desc], weights_kind| {
        let cfg = eplb_config {
            rank: 0,
            world_size: 1,
            num_layers: 1,
            slots_per_rank: 4,
            num_logical: 3,
            ring_len: 0,
            weights_kind,
            counts_kind: EPLB_COUNTS_LOCAL,
            num_tensors: tensors.len() as u32,
            tensors: tensors.as_ptr(),
            staging: std::ptr::null(),
            phy2log: phy2log.as_ptr(),
        };
        let mut r = std::ptr::null_mut();
        // SAFETY: valid pointers.
        let s = unsafe { eplb_create(name.as_ptr(), &cfg, None, std::ptr::null_mut(), &mut r) };
        assert!(r.is_null());
        (s, last_error())
    };
    let (s, m) = try_create(&[t(EPLB_KIND_EXPERT, 3, 8, 8, c"u8")], EPLB_WEIGHTS_HOST);
    assert_eq!(s, eplb_status::EPLB_ERR_INVALID);
    assert!(m.contains("layer 0, tensor \"w\": field rows: 3"), "{m}");
    let (_, m) = try_create(&[t(EPLB_KIND_EXPERT, 4, 8, 4, c"u8")], EPLB_WEIGHTS_HOST);
    assert!(m.contains("field row_stride: 4 < row_bytes 8"), "{m}");
    let (_, m) = try_create(&[t(EPLB_KIND_EXPERT, 4, 8, 8, c"complex")], EPLB_WEIGHTS_HOST);
    assert!(m.contains("field dtype: \"complex\""), "{m}");
    let (_, m) = try_create(&[t(EPLB_KIND_GLOBAL, 1, 8, 8, c"u8")], EPLB_WEIGHTS_HOST);
    assert!(m.contains("at least one per-expert tensor"), "{m}");
    let (_, m) = try_create(&[t(EPLB_KIND_EXPERT, 4, 8, 8, c"u8")], EPLB_WEIGHTS_CUDA_IPC);
    assert!(m.contains("field ipc_handle: NULL"), "{m}");
    let (_, m) = try_create(&[t(EPLB_KIND_EXPERT, 4, 8, 8, c"u8")], 7);
    assert!(m.contains("weights_kind 7"), "{m}");
    // SAFETY: NULL arguments are refused.
    let s =
        unsafe { eplb_create(std::ptr::null(), std::ptr::null(), None, std::ptr::null_mut(), std::ptr::null_mut()) };
    assert_eq!(s, eplb_status::EPLB_ERR_INVALID);
    assert!(!Path::new(&region_path(name.to_str().unwrap(), 0)).exists());
}

// ---- the C engine beside the worker --------------------------------------------------------

fn smoke_binary() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = common::tmpdir("smoke-build");
    let st = Command::new(env!("CARGO"))
        .args(["build", "--release", "-p", "eplb-client", "--lib"])
        .current_dir(root)
        .status()
        .expect("cargo runs");
    assert!(st.success());
    let lib = root.join("target/release/libeplb_client.a");
    let exe = out.join("smoke");
    let o = Command::new("cc")
        .args(["-std=c11", "-D_DEFAULT_SOURCE", "-Wall", "-Wextra", "-Werror", "-O1", "-o"])
        .arg(&exe)
        .arg(root.join("client/tests/c/smoke.c"))
        .arg("-I")
        .arg(root.join("client/include"))
        .arg(&lib)
        .args(["-lpthread", "-ldl", "-lm", "-lrt", "-lgcc_s", "-lc"])
        .output()
        .expect("cc must be installed");
    assert!(o.status.success(), "cc failed:\n{}", String::from_utf8_lossy(&o.stderr));
    exe
}

#[test]
fn the_c_engine_switches_layers_beside_the_worker() {
    let exe = smoke_binary();
    let name = format!("csmoke{}", std::process::id());
    let d = common::tmpdir("c-engine");
    let report = d.join("sidecar.json");
    let engine = Command::new(&exe)
        .args([&name, "400", "60", "3000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the smoke engine starts");
    let sidecar = common::mpirun(1)
        .env("OMPI_MCA_orte_tmpdir_base", common::tmpdir("ompi-c-engine"))
        .arg(common::BIN)
        .args(["run", "--engine", &format!("shm:{name}"), "--eplb-update-interval-steps", "10"])
        .args(["--engine-wait", "60", "--force-moves", "2", "--report"])
        .arg(&report)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mpirun must be installed");
    let deadline = Instant::now() + Duration::from_secs(120);
    let wait = |mut c: std::process::Child| {
        loop {
            if let Ok(Some(_)) = c.try_wait() {
                break;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        c.wait_with_output().expect("output")
    };
    let e = wait(engine);
    let s = wait(sidecar);
    let _ = std::fs::remove_file(region_path(&name, 0));
    let (eout, eerr) = (String::from_utf8_lossy(&e.stdout), String::from_utf8_lossy(&e.stderr));
    let serr = String::from_utf8_lossy(&s.stderr);
    assert!(e.status.success(), "the C engine failed: {eerr}\n{eout}\nsidecar:\n{serr}");
    assert!(s.status.success(), "the worker failed:\n{serr}");
    assert!(eout.contains("\"outputs_match\": true"), "{eout}");
    let r = common::read_report(&report);
    let s = &r;
    let updated = s["layers_updated"].as_u64().unwrap_or(0);
    assert!(updated > 0, "no layer switched: {r}");
    assert_eq!(s["wrong_bytes"], 0, "{r}");
    let applied: u64 =
        eout.split("\"applied\": ").nth(1).and_then(|t| t.split(',').next()).and_then(|t| t.parse().ok()).unwrap();
    assert_eq!(applied, updated, "the engine applied what the sidecar committed");
}

/// Records the apply callback's calls: (layer, slots).
unsafe extern "C" fn record_apply(user: *mut c_void, layer: u32, slots: *const u32, n: usize) -> c_int {
    let calls = &mut *(user as *mut Vec<(u32, Vec<u32>)>);
    calls.push((layer, std::slice::from_raw_parts(slots, n).to_vec()));
    0
}

#[test]
fn cuda_ipc_tensors_share_deduplicated_handles_and_the_apply_callback_copies() {
    // No GPU here: the PCI bus id comes from the override, the handles are made-up bytes (the
    // sidecar's reader checks the section and the table, not the handles' meaning).
    std::env::set_var("EPLB_PCI_BUS_ID", "0000:19:00.0");
    let name = format!("capi{}-ipc", std::process::id());
    let (h1, h2) = ([1u8; 64], [2u8; 64]);
    let d = |n: &'static CStr, kind, rows, rb: u64, h: &[u8; 64], off: u64| eplb_tensor_desc {
        name: n.as_ptr(),
        dtype: c"bf16".as_ptr(),
        kind,
        rows,
        row_bytes: rb,
        row_stride: rb,
        ipc_handle: h.as_ptr(),
        ipc_offset: off,
    };
    // Layer l's expert tensor at 4096 * l of allocation 1, its global in allocation 2; staging in
    // allocation 2 after the globals.
    let tensors: Vec<eplb_tensor_desc> = (0..L as u64)
        .flat_map(|l| {
            [d(c"w2", EPLB_KIND_EXPERT, S, 256, &h1, 4096 * l), d(c"g", EPLB_KIND_GLOBAL, 1, 32, &h2, 64 * l)]
        })
        .collect();
    let staging = [d(c"w2", EPLB_KIND_EXPERT, S, 256, &h2, 8192), d(c"g", EPLB_KIND_GLOBAL, 1, 32, &h2, 0)];
    let phy2log: Vec<i32> = (0..L as usize * 4).map(|i| (i % 4 % 3) as i32).collect();
    let cfg = eplb_config {
        rank: 0,
        world_size: 1,
        num_layers: L,
        slots_per_rank: S,
        num_logical: E,
        ring_len: 0,
        weights_kind: EPLB_WEIGHTS_CUDA_IPC,
        counts_kind: EPLB_COUNTS_PHYSICAL,
        num_tensors: 2,
        tensors: tensors.as_ptr(),
        staging: staging.as_ptr(),
        phy2log: phy2log.as_ptr(),
    };
    let cname = CString::new(name.clone()).unwrap();
    let mut calls: Vec<(u32, Vec<u32>)> = Vec::new();
    let user = &mut calls as *mut _ as *mut c_void;
    let mut r = std::ptr::null_mut();
    // SAFETY: valid pointers; without apply, CUDA weights are refused.
    let s = unsafe { eplb_create(cname.as_ptr(), &cfg, None, std::ptr::null_mut(), &mut r) };
    assert_eq!(s, eplb_status::EPLB_ERR_INVALID);
    assert!(last_error().contains("apply callback"), "{}", last_error());
    // SAFETY: as above.
    let s = unsafe { eplb_create(cname.as_ptr(), &cfg, Some(record_apply), user, &mut r) };
    assert_eq!(s, eplb_status::EPLB_OK, "{}", last_error());
    let f = Fixture { region: r, name };
    // SAFETY: a live region.
    assert!(unsafe { eplb_tensor_ptr(f.region, 0, 0) }.is_null(), "CUDA weights have no host pointer");
    // SAFETY: as above.
    assert_eq!(unsafe { eplb_publish(f.region) }, eplb_status::EPLB_OK);
    let reg = open(&f);
    let ipc = reg.layout.ipc.as_ref().expect("an IPC section");
    assert_eq!(ipc.pci_bus_id, "0000:19:00.0");
    assert_eq!(ipc.handles.len(), 2, "two distinct allocations");
    assert_eq!((ipc.handles[0].handle, ipc.handles[1].handle), (h1, h2));
    assert_eq!(ipc.handles[0].bytes, 4096 + 4 * 256, "the end of the last row used in allocation 0");
    assert_eq!(
        (reg.layout.entry(1, 0).handle, reg.layout.entry(1, 1).handle, reg.layout.entry(2, 0).handle),
        (0, 1, 1)
    );
    assert_eq!(reg.layout.count_cols(), 4);
    // A command: the engine's callback does the copy; the answer follows it.
    post(&reg, 1, 0, 0, 1, vec![0, 1, 2, 2], vec![false, false, false, true]);
    assert_eq!(boundary(&f, 0, None, std::ptr::null_mut()), (eplb_status::EPLB_OK, 0));
    assert_eq!(calls, vec![(0, vec![3])]);
    assert_eq!(reg.ack(), (1, ack::APPLIED, 0));
}

unsafe extern "C" fn failing_apply(_: *mut c_void, _: u32, _: *const u32, _: usize) -> c_int {
    1
}

#[test]
fn a_failed_apply_fails_the_engine_and_refuses_every_later_step() {
    let name = format!("capi{}-applyfail", std::process::id());
    let tensors: Vec<eplb_tensor_desc> = (0..L)
        .map(|_| eplb_tensor_desc {
            name: c"w".as_ptr(),
            dtype: c"u8".as_ptr(),
            kind: EPLB_KIND_EXPERT,
            rows: S,
            row_bytes: 8,
            row_stride: 8,
            ipc_handle: std::ptr::null(),
            ipc_offset: 0,
        })
        .collect();
    let phy2log: Vec<i32> = (0..L as usize * 4).map(|i| (i % 4 % 3) as i32).collect();
    let cfg = eplb_config {
        rank: 0,
        world_size: 1,
        num_layers: L,
        slots_per_rank: S,
        num_logical: E,
        ring_len: 0,
        weights_kind: EPLB_WEIGHTS_HOST,
        counts_kind: EPLB_COUNTS_LOCAL,
        num_tensors: 1,
        tensors: tensors.as_ptr(),
        staging: std::ptr::null(),
        phy2log: phy2log.as_ptr(),
    };
    let cname = CString::new(name.clone()).unwrap();
    let mut r = std::ptr::null_mut();
    // SAFETY: valid pointers; host weights with a notification callback that fails.
    let s = unsafe { eplb_create(cname.as_ptr(), &cfg, Some(failing_apply), std::ptr::null_mut(), &mut r) };
    assert_eq!(s, eplb_status::EPLB_OK, "{}", last_error());
    let f = Fixture { region: r, name };
    // SAFETY: a live region.
    assert_eq!(unsafe { eplb_publish(f.region) }, eplb_status::EPLB_OK);
    let reg = open(&f);
    post(&reg, 1, 1, 0, 1, vec![0, 1, 2, 1], vec![false, false, false, true]);
    assert_eq!(boundary(&f, 0, None, std::ptr::null_mut()).0, eplb_status::EPLB_ERR_CALLBACK);
    assert!(last_error().contains("weights may be torn"), "{}", last_error());
    assert_eq!(reg.ack().0, 0, "nothing is answered");
    assert_eq!(reg.get(off::ENGINE_STATE), EPLB_ENGINE_FAILED);
    assert_eq!(record(&f, 0, &[0; 8]), eplb_status::EPLB_ERR_STATE);
}
