//! Unit tests of the region: the header check, the ring's sequence lock, the mailbox, and the
//! engine side's boundary rules.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::region::*;
use super::writer::{Decision, EngineRank};

fn layout() -> Layout {
    Layout::packed(3, 4, 10, 3, 1, 16, &[("w13", "bf16", &[16, 8]), ("w2", "f32", &[5])])
}

fn temp_region(name: &str, layout: &Layout) -> Region {
    let dir = std::env::temp_dir().join(format!("eplb-shm-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    let mut r = Region::create(&path, layout, 1).unwrap();
    r.publish(&path).unwrap();
    r
}

/// The parse error of `layout`'s header after `edit`.
fn parse_error(edit: impl Fn(&mut Vec<u8>)) -> String {
    let l = layout();
    let mut h = l.header_bytes(1);
    edit(&mut h);
    Layout::parse(&h, l.total_bytes).unwrap_err()
}

fn put_u32(h: &mut [u8], at: usize, v: u32) {
    h[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(h: &mut [u8], at: usize, v: u64) {
    h[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

#[test]
fn a_packed_header_parses_back() {
    let l = layout();
    assert_eq!(l.expert_bytes, 320, "256 bytes of bf16, then 20 of f32 at 256, rounded up to 64");
    assert_eq!(Layout::parse(&l.header_bytes(1), l.total_bytes), Ok(l.clone()));
    let r = temp_region("roundtrip", &l);
    assert_eq!(Region::open(&r.path).unwrap().layout, l);
}

fn ipc_layout(handles: Vec<IpcHandle>) -> Layout {
    layout().with_ipc(IpcWeights { pci_bus_id: "0000:19:00.0".into(), uuid: [7; 16], handles })
}

fn handle(role: u32, first_layer: u32, offset: u64, bytes: u64) -> IpcHandle {
    let mut h = [0u8; 64];
    h[0] = role as u8;
    h[63] = 0xab;
    IpcHandle { handle: h, role, first_layer, offset, bytes }
}

#[test]
fn a_cuda_ipc_header_parses_back_without_host_weights() {
    let lb = layout().layer_bytes();
    // All layers behind one handle at an offset, staging behind another.
    let l = ipc_layout(vec![handle(ipc::ROLE_LIVE, 0, 512, 3 * lb), handle(ipc::ROLE_STAGING, 0, 0, lb)]);
    assert_eq!(l.weights_kind, weights_kind::CUDA_IPC);
    assert!(l.total_bytes < layout().total_bytes, "no weights or staging in the region");
    let h = l.header_bytes(1);
    assert_eq!(u32::from_le_bytes(h[off::MINOR_VERSION..off::MINOR_VERSION + 4].try_into().unwrap()), MINOR_VERSION);
    let back = Layout::parse(&h, l.total_bytes).unwrap();
    assert_eq!(back, l);
    let w = back.ipc.as_ref().unwrap();
    assert_eq!(w.live(2, lb), Some((0, 512 + 2 * lb)));
    assert_eq!(w.live(3, lb), None);
    assert_eq!(w.staging(), Some((1, 0)));
    // One handle per layer, as engines that allocate each layer's tensor separately export them.
    let per_layer = ipc_layout(vec![
        handle(ipc::ROLE_STAGING, 0, 0, lb),
        handle(ipc::ROLE_LIVE, 2, 0, lb),
        handle(ipc::ROLE_LIVE, 0, 64, lb),
        handle(ipc::ROLE_LIVE, 1, 128, lb),
    ]);
    let back = Layout::parse(&per_layer.header_bytes(1), per_layer.total_bytes).unwrap();
    assert_eq!(back.ipc.as_ref().unwrap().live(1, lb), Some((3, 128)));
    let r = temp_region("ipc-roundtrip", &l);
    assert_eq!(Region::open(&r.path).unwrap().layout, l);
}

#[test]
fn bad_cuda_ipc_tables_are_refused() {
    let lb = layout().layer_bytes();
    let err = |handles: Vec<IpcHandle>| {
        let l = ipc_layout(handles);
        Layout::parse(&l.header_bytes(1), l.total_bytes).unwrap_err()
    };
    let staging = || handle(ipc::ROLE_STAGING, 0, 0, lb);
    let e = err(vec![handle(ipc::ROLE_LIVE, 0, 0, 2 * lb), staging()]);
    assert!(e.contains("layer 2 is in 0 live IPC handles"), "{e}");
    let e = err(vec![handle(ipc::ROLE_LIVE, 0, 0, 3 * lb), handle(ipc::ROLE_LIVE, 1, 0, lb), staging()]);
    assert!(e.contains("layer 1 is in 2 live IPC handles"), "{e}");
    let e = err(vec![handle(ipc::ROLE_LIVE, 0, 0, 3 * lb)]);
    assert!(e.contains("0 staging IPC handles"), "{e}");
    let e = err(vec![handle(ipc::ROLE_LIVE, 0, 0, 3 * lb + 64), staging()]);
    assert!(e.contains("not a whole number of layers"), "{e}");
    let e = err(vec![handle(ipc::ROLE_LIVE, 2, 0, 2 * lb), staging()]);
    assert!(e.contains("past num_layers"), "{e}");
    let e = err(vec![handle(9, 0, 0, lb), staging()]);
    assert!(e.contains("unknown role 9"), "{e}");
    let mut l = ipc_layout(vec![handle(ipc::ROLE_LIVE, 0, 0, 3 * lb), staging()]);
    if let Some(w) = l.ipc.as_mut() {
        w.pci_bus_id = "gpu0!".into();
    }
    let e = Layout::parse(&l.header_bytes(1), l.total_bytes).unwrap_err();
    assert!(e.contains("not a PCI bus id"), "{e}");
    let e = parse_error(|h| put_u32(h, off::WEIGHTS_KIND, 2));
    assert!(e.contains("weights_kind 2"), "{e}");
}

#[test]
fn bad_headers_are_refused_with_what_is_wrong() {
    assert!(parse_error(|h| h[0] ^= 1).contains("bad magic"));
    let e = parse_error(|h| put_u32(h, off::VERSION, 2));
    assert!(e.contains("contract version 2") && e.contains("speaks version 1"), "{e}");
    assert!(parse_error(|h| put_u32(h, off::RANK, 3)).contains("rank 3 is not below world_size 3"));
    assert!(parse_error(|h| put_u32(h, off::NUM_LAYERS, 0)).contains("num_layers is 0"));
    assert!(parse_error(|h| put_u32(h, off::NUM_LAYERS, 9)).contains("ring_entry_bytes"));
    assert!(parse_error(|h| put_u32(h, off::NUM_LOGICAL, 13)).contains("cannot hold 13 experts"));
    assert!(parse_error(|h| put_u32(h, off::RING_LEN, 8)).contains("ring_len 8"));
    assert!(parse_error(|h| put_u64(h, off::EXPERT_BYTES, 100)).contains("multiple of 64"));
    assert!(parse_error(|h| put_u32(h, off::WEIGHTS_KIND, 1)).contains("CUDA IPC"));
    assert!(parse_error(|h| put_u64(h, off::TOTAL_BYTES, 1)).contains("total_bytes"));
    let l = layout();
    assert!(parse_error(|h| put_u64(h, off::STAGING_OFFSET, l.weights_offset as u64)).contains("overlap"));
    assert!(parse_error(|h| put_u64(h, off::WEIGHTS_OFFSET, l.weights_offset as u64 + 8)).contains("multiple of 64"));
    assert!(parse_error(|h| put_u32(h, off::NUM_TENSORS, 0)).contains("num_tensors 0"));
    assert!(parse_error(|h| h[off::TENSORS + 24] = b'x').contains("unknown dtype"));
    assert!(parse_error(|h| put_u32(h, off::TENSORS + 56, 17)).contains("do not match"));
    assert!(parse_error(|h| put_u64(h, off::TENSORS + 64 + 32, 128)).contains("after the previous tensor"));
    assert!(Layout::parse(&[0u8; 100], 100).unwrap_err().contains("too short"));
}

#[test]
fn steps_read_back_and_an_overwritten_step_is_lost() {
    let l = layout();
    let r = temp_region("ring", &l);
    let n = l.num_layers * l.slots_per_rank;
    assert_eq!(r.read_step(0), RingRead::NotYet);
    for t in 0..40u64 {
        r.write_step(t, phase::DECODE, t, 1000 + t, &vec![t * 3; n]);
    }
    assert_eq!(
        r.read_step(39),
        RingRead::Step { phase: phase::DECODE, tokens: 39, moe_ns: 1039, counts: vec![117; n] }
    );
    assert_eq!(r.read_step(24), RingRead::Step { phase: phase::DECODE, tokens: 24, moe_ns: 1024, counts: vec![72; n] });
    // Steps 0..24 were overwritten by 16..40 (16 entries).
    assert_eq!(r.read_step(23), RingRead::Lost);
    assert_eq!(r.read_step(3), RingRead::Lost);
    assert_eq!(r.read_step(40), RingRead::NotYet);
}

#[test]
fn a_reader_racing_the_writer_never_sees_a_torn_entry() {
    // Entries hold step t and counts all equal to t: a torn copy would mix two steps.
    let l = Layout::packed(8, 16, 64, 8, 0, 16, &[("w", "u8", &[64])]);
    let writer = Arc::new(temp_region("race", &l));
    let reader = Region::open(&writer.path).unwrap();
    let n = l.num_layers * l.slots_per_rank;
    let steps = 20_000u64;
    let w = writer.clone();
    let handle = std::thread::spawn(move || {
        for t in 0..steps {
            w.write_step(t, phase::MIXED, t, 0, &vec![t; n]);
        }
    });
    let (mut read, mut lost) = (0u64, 0u64);
    let mut t = 0u64;
    while t < steps {
        match reader.read_step(t) {
            RingRead::Step { tokens, counts, .. } => {
                assert_eq!(tokens, t);
                assert!(counts.iter().all(|&c| c == t), "a torn entry at step {t}");
                read += 1;
                t += 1;
            }
            RingRead::Lost => {
                lost += 1;
                t += 1;
            }
            RingRead::NotYet => std::thread::yield_now(),
        }
    }
    handle.join().unwrap();
    assert_eq!(read + lost, steps);
}

#[test]
fn commands_and_the_boundary_rules() {
    let l = Layout::packed(2, 2, 3, 2, 0, 16, &[("w", "u8", &[64])]);
    let initial = vec![0, 1, 2, 0, 0, 1, 2, 1];
    let name = format!("unit-{}", std::process::id());
    let mut engine = EngineRank::create(&name, &l, &initial, |layer, e, b| b.fill((10 * layer + e) as u8)).unwrap();
    let sidecar = Region::open(&region_path(&name, 0)).unwrap();
    assert_eq!(sidecar.phy2log(), initial);
    assert_eq!(engine.have(0), (0, None), "no command");
    // A command for step 3, posted while the engine is at step 1: nothing before step 3.
    let staging = unsafe { sidecar.bytes_mut(l.staging_offset, 2 * 64) };
    staging[64..].fill(22);
    let cmd =
        Command { id: 1, layer: 1, apply_step: 3, epoch: 1, new_row: vec![0, 2, 2, 1], copy_mask: vec![false, true] };
    sidecar.post(&cmd);
    assert_eq!(engine.have(1).0, 0);
    assert_eq!(engine.decide(1, None, 0, 0), Decision::Nothing);
    // At step 3 another rank does not have it: cancelled, nothing changes.
    let (have, got) = engine.have(3);
    assert_eq!((have, got.as_ref()), (1, Some(&cmd)));
    assert_eq!(engine.decide(3, got, 0, 1), Decision::Cancelled { id: 1 });
    assert_eq!(sidecar.ack(), (1, ack::CANCELLED, 3));
    assert_eq!(
        (engine.live(1, 1)[0], sidecar.phy2log(), sidecar.epoch(1).load(Ordering::Acquire)),
        (11, initial.clone(), 0)
    );
    // A command whose step has passed is answered missed.
    sidecar.post(&Command { id: 2, apply_step: 4, ..cmd.clone() });
    assert_eq!(engine.have(5).0, 0);
    assert_eq!(sidecar.ack(), (2, ack::MISSED, 5));
    // Every rank has it at its step: applied in place, row and epoch with it.
    sidecar.post(&Command { id: 3, apply_step: 6, ..cmd.clone() });
    let (have, got) = engine.have(6);
    assert_eq!(engine.decide(6, got, have, have), Decision::Applied { id: 3, layer: 1, epoch: 1 });
    assert_eq!(sidecar.ack(), (3, ack::APPLIED, 6));
    assert_eq!((engine.live(1, 0)[0], engine.live(1, 1)[0]), (10, 22), "slot 0 kept, slot 1 took staging");
    assert_eq!(sidecar.phy2log(), vec![0, 1, 2, 0, 0, 2, 2, 1]);
    assert_eq!(sidecar.epoch(1).load(Ordering::Acquire), 1);
    assert_eq!(engine.have(7), (0, None), "answered: nothing pending");
    // An invalid command (a stale epoch) is rejected, and takes no part as `have`.
    sidecar.post(&Command { id: 4, apply_step: 8, ..cmd.clone() });
    let (have, got) = engine.have(8);
    assert_eq!(have, 0);
    assert_eq!(engine.decide(8, got, 0, 0), Decision::Rejected { id: 4 });
    assert_eq!(sidecar.ack(), (4, ack::REJECTED, 8));
    // A post under way (a sidecar stopped in the middle of one): no command, and no waiting.
    sidecar.atomic(off::CMD_SEQ).fetch_add(1, Ordering::AcqRel);
    assert_eq!(engine.have(9), (0, None));
    sidecar.atomic(off::CMD_SEQ).fetch_add(1, Ordering::AcqRel);
    // A command still pending when the engine finishes is answered cancelled.
    sidecar.post(&Command { id: 5, apply_step: 20, epoch: 2, ..cmd.clone() });
    engine.finish();
    assert_eq!(sidecar.ack(), (5, ack::CANCELLED, 0));
    assert!(!region_path(&name, 0).exists());
    assert_eq!(sidecar.get(off::ENGINE_STATE), engine_state::FINISHED);
}

#[test]
fn a_dead_or_zombie_pid_is_not_alive() {
    assert!(pid_alive(std::process::id() as u64));
    assert!(!pid_alive(0));
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id() as u64;
    // Dead but not reaped: a zombie. waitid(WNOWAIT) returns once it has exited and leaves it
    // unreaped (no sleep, no race).
    // SAFETY: a zeroed siginfo_t is a valid out-parameter; the pid is our own child's.
    let rc = unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, libc::WEXITED | libc::WNOWAIT)
    };
    assert_eq!(rc, 0, "waitid: {}", std::io::Error::last_os_error());
    assert!(!pid_alive(pid));
    child.wait().unwrap();
    assert!(!pid_alive(pid));
}
