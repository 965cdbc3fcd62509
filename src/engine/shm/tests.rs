//! Unit tests of the region: the header check, the ring's sequence lock, the mailbox, and the
//! engine side's boundary rules.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::region::*;
use super::writer::{Decision, EngineRank};

fn shape(num_layers: usize, slots_per_rank: usize, num_logical: usize, world_size: usize, rank: usize) -> Shape {
    Shape { num_layers, slots_per_rank, num_logical, world_size, rank, ring_len: 16, counts_kind: counts_kind::LOCAL }
}

/// Three layers of 4 slots, three per-expert tensors (one with padded rows, one of an odd size)
/// and a global one.
fn tensors() -> Vec<TensorDesc> {
    vec![
        TensorDesc::expert("w13_weight", "bf16", 256),
        TensorDesc::expert("w13_weight_scale_inv", "f32", 12).strided(16),
        TensorDesc::global("w13_input_scale", "f32", 8, 10),
        TensorDesc::expert("w2_weight", "f8e4m3", 37),
    ]
}

fn layout() -> Layout {
    Layout::host(&shape(3, 4, 10, 3, 1), &tensors())
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

/// The bytes of a region of `l` before its tensors: header, table, IPC section.
fn region_bytes(l: &Layout) -> Vec<u8> {
    let mut b = vec![0u8; l.total_bytes];
    b[..HEADER_BYTES].copy_from_slice(&l.header_bytes(1));
    let t = l.table_bytes();
    b[l.table_offset..l.table_offset + t.len()].copy_from_slice(&t);
    let i = l.ipc_bytes();
    b[l.ipc_offset..l.ipc_offset + i.len()].copy_from_slice(&i);
    b
}

/// The parse error of `layout()`'s bytes after `edit`.
fn parse_error(edit: impl Fn(&mut Vec<u8>)) -> String {
    let l = layout();
    let mut h = region_bytes(&l);
    edit(&mut h);
    Layout::parse(&h, l.total_bytes).unwrap_err()
}

/// The parse error of `l` after `edit` of its table.
fn table_error(mut l: Layout, edit: impl Fn(&mut Layout)) -> String {
    edit(&mut l);
    Layout::parse(&region_bytes(&l), l.total_bytes).unwrap_err()
}

fn put_u32(h: &mut [u8], at: usize, v: u32) {
    h[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(h: &mut [u8], at: usize, v: u64) {
    h[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

#[test]
fn a_host_region_with_a_tensor_table_parses_back() {
    let l = layout();
    assert_eq!(l.expert_bytes, 256 + 12 + 37, "the per-expert rows, no padding, no global");
    assert_eq!((l.num_tensors, l.tensors.len()), (4, 16), "(3 layers + staging) x 4 tensors");
    assert_eq!(l.entry(3, 2), &TensorEntry { offset: 0, row_stride: 0, rows: 0, ..l.entry(0, 2).clone() });
    assert_eq!((l.entry(1, 1).row_stride, l.entry(1, 1).row_bytes, l.entry(1, 1).rows), (16, 12, 4));
    assert_eq!(l.expert_tensors(), vec![0, 1, 3]);
    assert_eq!(l.global_tensors(), vec![2]);
    assert_eq!(Layout::parse(&region_bytes(&l), l.total_bytes), Ok(l.clone()));
    let r = temp_region("roundtrip", &l);
    assert_eq!(Region::open(&r.path).unwrap().layout, l);
    let h = l.header_bytes(1);
    assert_eq!(u32::from_le_bytes(h[off::VERSION..off::VERSION + 4].try_into().unwrap()), 2);
    assert_eq!(u32::from_le_bytes(h[off::MINOR_VERSION..off::MINOR_VERSION + 4].try_into().unwrap()), 0);
    // Physical counts: a ring entry holds num_physical columns.
    let p = Layout::host(&Shape { counts_kind: counts_kind::PHYSICAL, ..shape(3, 4, 10, 3, 1) }, &tensors());
    assert_eq!((p.count_cols(), p.ring_entry_bytes), (12, 64 + 320));
    assert_eq!(Layout::parse(&region_bytes(&p), p.total_bytes), Ok(p.clone()));
}

/// A CUDA IPC layout of `layout()`'s shape: every tensor of every layer in one of `handles`
/// allocations of 1 MiB, packed per allocation.
fn ipc_layout(handles: usize) -> Layout {
    let host = layout();
    let mut next = vec![0u64; handles];
    let entries: Vec<TensorEntry> = host
        .tensors
        .iter()
        .enumerate()
        .map(|(i, e)| {
            if e.rows == 0 {
                return TensorEntry { handle: 0, ..e.clone() };
            }
            let h = i % handles;
            let offset = next[h];
            next[h] += round64(e.extent().1 as u64 - e.extent().0 as u64);
            TensorEntry { offset, handle: h as u16, ..e.clone() }
        })
        .collect();
    let w = IpcWeights {
        pci_bus_id: "0000:19:00.0".into(),
        uuid: [7; 16],
        handles: (0..handles).map(|i| IpcHandle { handle: [i as u8 + 1; 64], bytes: 1 << 20 }).collect(),
    };
    Layout::cuda_ipc(&shape(3, 4, 10, 3, 1), entries, w)
}

#[test]
fn a_cuda_ipc_region_parses_back_without_host_weights() {
    let l = ipc_layout(5);
    assert_eq!(l.weights_kind, weights_kind::CUDA_IPC);
    assert!(l.total_bytes < layout().total_bytes, "no tensors in the region");
    assert_eq!(l.expert_bytes, layout().expert_bytes);
    let back = Layout::parse(&region_bytes(&l), l.total_bytes).unwrap();
    assert_eq!(back, l);
    assert_eq!(back.ipc.as_ref().unwrap().handles.len(), 5);
    let r = temp_region("ipc-roundtrip", &l);
    assert_eq!(Region::open(&r.path).unwrap().layout, l);
    // Many handles: one per tensor of a 58-layer, 4-tensor table is 236; the section holds 4096.
    let many = ipc_layout(16);
    assert_eq!(Layout::parse(&region_bytes(&many), many.total_bytes).unwrap(), many);
}

#[test]
fn a_version_1_region_is_refused_naming_both_versions() {
    let e = parse_error(|h| put_u32(h, off::VERSION, 1));
    assert!(e.contains("contract version 1") && e.contains("speaks version 2"), "{e}");
    let e = parse_error(|h| put_u32(h, off::VERSION, 3));
    assert!(e.contains("contract version 3") && e.contains("speaks version 2"), "{e}");
}

#[test]
fn bad_headers_are_refused_with_what_is_wrong() {
    assert!(parse_error(|h| h[0] ^= 1).contains("bad magic"));
    assert!(parse_error(|h| put_u32(h, off::RANK, 3)).contains("rank 3 is not below world_size 3"));
    assert!(parse_error(|h| put_u32(h, off::NUM_LAYERS, 0)).contains("num_layers is 0"));
    assert!(parse_error(|h| put_u32(h, off::NUM_LAYERS, 9)).contains("ring_entry_bytes"));
    assert!(parse_error(|h| put_u32(h, off::NUM_LOGICAL, 13)).contains("cannot hold 13 experts"));
    assert!(parse_error(|h| put_u32(h, off::RING_LEN, 8)).contains("ring_len 8"));
    assert!(parse_error(|h| put_u32(h, off::COUNTS_KIND, 1)).contains("ring_entry_bytes"));
    assert!(parse_error(|h| put_u32(h, off::COUNTS_KIND, 2)).contains("counts_kind 2"));
    assert!(parse_error(|h| put_u64(h, off::EXPERT_BYTES, 304)).contains("expert_bytes 304"));
    assert!(parse_error(|h| put_u32(h, off::WEIGHTS_KIND, 1)).contains("num_handles 0"));
    assert!(parse_error(|h| put_u32(h, off::WEIGHTS_KIND, 2)).contains("weights_kind 2"));
    assert!(parse_error(|h| put_u32(h, off::NUM_HANDLES, 1)).contains("weights_kind 0 (host) with num_handles 1"));
    assert!(parse_error(|h| put_u64(h, off::TOTAL_BYTES, 1)).contains("total_bytes"));
    let l = layout();
    assert!(parse_error(|h| put_u64(h, off::TABLE_OFFSET, l.command_offset as u64)).contains("overlap"));
    assert!(parse_error(|h| put_u64(h, off::TABLE_OFFSET, l.table_offset as u64 + 8)).contains("multiple of 64"));
    assert!(parse_error(|h| put_u32(h, off::NUM_TENSORS, 0)).contains("num_tensors 0"));
    assert!(parse_error(|h| put_u32(h, off::NUM_TENSORS, 65)).contains("num_tensors 65"));
    assert!(Layout::parse(&[0u8; 100], 100).unwrap_err().contains("too short"));
}

/// Asserts that `e` names the entry, the field and the problem.
fn names(e: &str, what: &[&str]) {
    assert!(e.starts_with("tensor table: "), "{e}");
    for w in what {
        assert!(e.contains(w), "{e:?} lacks {w:?}");
    }
}

#[test]
fn every_bad_tensor_table_is_refused_naming_layer_tensor_and_field() {
    let l = layout();
    let at = |layer: usize, t: usize| layer * l.num_tensors + t;
    // Overlap: layer 1's w2 starts inside layer 1's w13.
    let e = table_error(layout(), |l| l.tensors[at(1, 3)].offset = l.tensors[at(1, 0)].offset + 8);
    names(&e, &["layer 1, tensor 3 (w2_weight)", "offset", "overlaps", "layer 1, tensor 0 (w13_weight)"]);
    // Overlapping the staging area.
    let e = table_error(layout(), |l| l.tensors[at(2, 0)].offset = l.tensors[at(3, 0)].offset);
    names(&e, &["overlaps", "staging layer"]);
    // Outside the region, and inside the header or the table.
    let e = table_error(layout(), |l| l.tensors[at(2, 3)].offset = l.total_bytes as u64 - 10);
    names(&e, &["layer 2, tensor 3 (w2_weight)", "offset", "outside the tensor area"]);
    let e = table_error(layout(), |l| l.tensors[at(0, 0)].offset = 64);
    names(&e, &["layer 0, tensor 0 (w13_weight)", "outside the tensor area"]);
    let e = table_error(layout(), |l| l.tensors[at(0, 0)].offset = l.table_offset as u64);
    names(&e, &["outside the tensor area"]);
    // row_stride < row_bytes.
    let e = table_error(layout(), |l| l.tensors[at(2, 1)].row_stride = 8);
    names(&e, &["layer 2, tensor 1 (w13_weight_scale_inv)", "row_stride 8 < row_bytes 12"]);
    // Per-expert rows that are not the slots (SGLang's shared-expert rows listed too).
    let e = table_error(layout(), |l| l.tensors[at(0, 3)].rows = 5);
    names(&e, &["layer 0, tensor 3 (w2_weight)", "rows 5", "slots_per_rank 4"]);
    let e = table_error(layout(), |l| l.tensors[at(3, 0)].rows = 3);
    names(&e, &["the staging layer, tensor 0 (w13_weight)", "rows 3"]);
    // Name, dtype, kind and row_bytes differ between layers.
    let e = table_error(layout(), |l| l.tensors[at(2, 3)].name = "w2".into());
    names(&e, &["layer 2, tensor 3 (w2)", "name differs", "\"w2_weight\""]);
    let e = table_error(layout(), |l| l.tensors[at(3, 3)].dtype = "u8".into());
    names(&e, &["the staging layer, tensor 3 (w2_weight)", "dtype differs"]);
    let e = table_error(layout(), |l| l.tensors[at(1, 2)].kind = tensor_kind::EXPERT);
    names(&e, &["layer 1, tensor 2 (w13_input_scale)", "kind differs"]);
    let e = table_error(layout(), |l| l.tensors[at(1, 0)].row_bytes = 128);
    names(&e, &["layer 1, tensor 0 (w13_weight)", "row_bytes differs"]);
    // A global tensor with staging, an unknown kind, names used twice, handles with host weights.
    let e = table_error(layout(), |l| l.tensors[at(3, 2)].rows = 10);
    names(&e, &["the staging layer, tensor 2 (w13_input_scale)", "no staging"]);
    let e = table_error(layout(), |l| {
        for layer in 0..4 {
            l.tensors[at(layer, 2)].kind = 7;
        }
    });
    names(&e, &["layer 0, tensor 2", "kind 7"]);
    let e = table_error(layout(), |l| {
        for layer in 0..4 {
            l.tensors[at(layer, 3)].name = "w13_weight".into();
        }
    });
    names(&e, &["layer 0, tensor 3 (w13_weight)", "used twice"]);
    let e = table_error(layout(), |l| l.tensors[at(1, 1)].handle = 1);
    names(&e, &["layer 1, tensor 1", "handle 1 with host weights"]);
    let e = table_error(layout(), |l| l.tensors[at(0, 0)].row_bytes = 0);
    names(&e, &["row_bytes"]);
    // No per-expert tensor at all.
    let only = Layout::host(&shape(1, 2, 2, 1, 0), &[TensorDesc::global("g", "f32", 4, 2)]);
    let e = Layout::parse(&region_bytes(&only), only.total_bytes).unwrap_err();
    assert!(e.contains("no per-expert tensor"), "{e}");
}

#[test]
fn bad_cuda_ipc_tables_are_refused() {
    let l = ipc_layout(3);
    let at = |layer: usize, t: usize| layer * l.num_tensors + t;
    let e = table_error(ipc_layout(3), |l| l.tensors[at(2, 0)].handle = 3);
    names(&e, &["layer 2, tensor 0 (w13_weight)", "handle 3 is not below num_handles 3"]);
    let e = table_error(ipc_layout(3), |l| l.tensors[at(1, 3)].offset = (1 << 20) - 100);
    names(&e, &["layer 1, tensor 3 (w2_weight)", "outside allocation", "1048576 bytes"]);
    // Two tensors in one allocation that overlap; the same offsets in two allocations are fine.
    let e = table_error(ipc_layout(1), |l| l.tensors[at(1, 0)].offset = l.tensors[at(0, 0)].offset);
    names(&e, &["overlaps", "in allocation 0"]);
    let mut w = ipc_layout(1);
    w.ipc.as_mut().unwrap().pci_bus_id = "gpu0!".into();
    assert!(Layout::parse(&region_bytes(&w), w.total_bytes).unwrap_err().contains("not a PCI bus id"));
    let mut z = ipc_layout(2);
    z.ipc.as_mut().unwrap().handles[1].bytes = 0;
    assert!(Layout::parse(&region_bytes(&z), z.total_bytes).unwrap_err().contains("IPC handle 1: bytes 0"));
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
    let l = Layout::contiguous(&Shape { ring_len: 16, ..shape(8, 16, 64, 8, 0) }, 64);
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
    let l = Layout::host(
        &shape(2, 2, 3, 2, 0),
        &[
            TensorDesc::expert("a", "u8", 40).strided(48),
            TensorDesc::global("g", "u8", 3, 2),
            TensorDesc::expert("b", "u8", 24),
        ],
    );
    let initial = vec![0, 1, 2, 0, 0, 1, 2, 1];
    let name = format!("unit-{}", std::process::id());
    let mut engine = EngineRank::create(&name, &l, &initial, |layer, e, b| b.fill((10 * layer + e) as u8)).unwrap();
    let sidecar = Region::open(&region_path(&name, 0)).unwrap();
    assert_eq!(sidecar.phy2log(), initial);
    assert_eq!(engine.have(0), (0, None), "no command");
    // A command for step 3, posted while the engine is at step 1: nothing before step 3.
    let globals = engine.global_bytes();
    // The sidecar stages slot 1: its rows, nothing else.
    unsafe { super::writer::write_expert(&sidecar, l.num_layers, 1, &[22u8; 64]) };
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
    assert_eq!(engine.live(1, 0), vec![10u8; 64], "slot 0 kept");
    assert_eq!(engine.live(1, 1), vec![22u8; 64], "slot 1 took staging, every per-expert row of it");
    assert_eq!(engine.global_bytes(), globals, "the global tensor is untouched");
    let (a, n) = sidecar.row(1, 0, 1);
    assert_eq!(sidecar.bytes(a + n, 8), &[0u8; 8], "the padding between rows is untouched");
    assert_eq!(sidecar.phy2log(), vec![0, 1, 2, 0, 0, 2, 2, 1]);
    assert_eq!(sidecar.epoch(1).load(Ordering::Acquire), 1);
    assert_eq!(engine.have(7), (0, None), "answered: nothing pending");
    // An invalid command (a stale epoch) is rejected, and takes no part as `have`.
    sidecar.post(&Command { id: 4, apply_step: 8, ..cmd.clone() });
    let (have, got) = engine.have(8);
    assert_eq!(have, 0);
    assert_eq!(engine.decide(8, got, 0, 0), Decision::Rejected { id: 4 });
    assert_eq!(sidecar.ack(), (4, ack::REJECTED, 8));
    // While the engine reports a re-allocated tensor, it rejects every command.
    engine.set_table_fault(4);
    sidecar.post(&Command { id: 6, apply_step: 9, epoch: 2, ..cmd.clone() });
    let (have, got) = engine.have(9);
    assert_eq!((have, engine.decide(9, got, 0, 0)), (0, Decision::Rejected { id: 6 }));
    assert_eq!(sidecar.table_fault(), 5);
    sidecar.set(off::TABLE_FAULT, 0);
    // A post under way (a sidecar stopped in the middle of one): no command, and no waiting.
    sidecar.atomic(off::CMD_SEQ).fetch_add(1, Ordering::AcqRel);
    assert_eq!(engine.have(10), (0, None));
    sidecar.atomic(off::CMD_SEQ).fetch_add(1, Ordering::AcqRel);
    // A command still pending when the engine finishes is answered cancelled.
    sidecar.post(&Command { id: 7, apply_step: 20, epoch: 2, ..cmd.clone() });
    engine.finish();
    assert_eq!(sidecar.ack(), (7, ack::CANCELLED, 0));
    assert!(!region_path(&name, 0).exists());
    assert_eq!(sidecar.get(off::ENGINE_STATE), engine_state::FINISHED);
}

#[test]
fn a_dead_or_zombie_pid_is_not_alive() {
    assert!(pid_alive(std::process::id() as u64));
    assert!(!pid_alive(0));
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id() as u64;
    // Dead but not reaped: a zombie.
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(!pid_alive(pid));
    child.wait().unwrap();
    assert!(!pid_alive(pid));
}
