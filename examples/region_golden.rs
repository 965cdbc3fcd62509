//! The cross-language golden test's Rust reader (issue 21): the worker's own reader of a
//! contract-2 region (`Region::open`, which checks the header and every rule of the tensor table,
//! `read_step` under the ring's sequence locks, `read_command` under `cmd_seq`), dumping every
//! field as JSON in the form `python/tests/golden_region.py` and `tests/golden/region_golden.c`
//! print, so that `python/tests/test_golden.py` can compare the three readers field by field.
//!
//!     cargo run --release --example region_golden -- dump PATH
//!     cargo run --release --example region_golden -- layout
//!
//! `layout` prints the layout's constants and byte offsets as this crate defines them.
use std::path::Path;
use std::process::ExitCode;

use eplb::engine::shm::region::{
    ack, counts_kind, engine_state, ipc, off, phase, sidecar_state, tensor_kind, weights_kind, Region, RingRead,
    HEADER_BYTES, MAGIC, MAX_TENSORS, MINOR_VERSION, MIN_RING_LEN, TENSOR_ENTRY_BYTES, VERSION,
};
use serde_json::{json, Map, Value};

fn fnv1a64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

fn nonzero(r: &Region, lo: usize, hi: usize) -> u64 {
    if hi <= lo {
        return 0;
    }
    r.bytes(lo, hi - lo).iter().filter(|&&b| b != 0).count() as u64
}

fn u32_at(r: &Region, at: usize) -> u32 {
    u32::from_le_bytes(r.bytes(at, 4).try_into().expect("4 bytes"))
}

fn cstr(bytes: &[u8]) -> (String, usize) {
    let n = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    (String::from_utf8_lossy(&bytes[..n]).into_owned(), n)
}

fn dump(path: &Path) -> Result<Value, String> {
    let r = Region::open(path).map_err(|e| e.to_string())?;
    let l = &r.layout;
    let mut header = Map::new();
    for (name, at) in [
        ("magic", off::MAGIC),
        ("expert_bytes", off::EXPERT_BYTES),
        ("total_bytes", off::TOTAL_BYTES),
        ("ring_offset", off::RING_OFFSET),
        ("ring_entry_bytes", off::RING_ENTRY_BYTES),
        ("placement_offset", off::PLACEMENT_OFFSET),
        ("epochs_offset", off::EPOCHS_OFFSET),
        ("command_offset", off::COMMAND_OFFSET),
        ("table_offset", off::TABLE_OFFSET),
        ("ipc_offset", off::IPC_OFFSET),
        ("engine_pid", off::ENGINE_PID),
        ("engine_step", off::ENGINE_STEP),
        ("engine_heartbeat_ns", off::ENGINE_HEARTBEAT_NS),
        ("engine_state", off::ENGINE_STATE),
        ("sidecar_pid", off::SIDECAR_PID),
        ("sidecar_heartbeat_ns", off::SIDECAR_HEARTBEAT_NS),
        ("sidecar_state", off::SIDECAR_STATE),
        ("table_fault", off::TABLE_FAULT),
    ] {
        header.insert(name.into(), json!(r.get(at)));
    }
    for (name, at) in [
        ("version", off::VERSION),
        ("header_bytes", off::HEADER_BYTES),
        ("num_layers", off::NUM_LAYERS),
        ("slots_per_rank", off::SLOTS_PER_RANK),
        ("num_logical", off::NUM_LOGICAL),
        ("world_size", off::WORLD_SIZE),
        ("rank", off::RANK),
        ("ring_len", off::RING_LEN),
        ("num_tensors", off::NUM_TENSORS),
        ("weights_kind", off::WEIGHTS_KIND),
        ("minor_version", off::MINOR_VERSION),
        ("counts_kind", off::COUNTS_KIND),
        ("num_handles", off::NUM_HANDLES),
        ("reserved0", off::NUM_HANDLES + 4),
    ] {
        header.insert(name.into(), json!(u32_at(&r, at)));
    }
    // The parsed layout agrees with the raw header.
    let h = |k: &str| header[k].as_u64().expect("a number") as usize;
    assert_eq!(
        (l.num_layers, l.slots_per_rank, l.num_logical, l.world_size, l.rank, l.ring_len, l.num_tensors),
        (
            h("num_layers"),
            h("slots_per_rank"),
            h("num_logical"),
            h("world_size"),
            h("rank"),
            h("ring_len"),
            h("num_tensors")
        )
    );
    assert_eq!(
        (l.expert_bytes, l.table_offset, l.counts_kind as usize),
        (h("expert_bytes"), h("table_offset"), h("counts_kind"))
    );
    let cmd = r.read_command().ok_or("no command under cmd_seq")?;
    let (ack_id, ack_result, ack_step) = r.ack();
    let mailbox = json!({
        "cmd_seq": r.get(off::CMD_SEQ), "cmd_id": cmd.id, "cmd_layer": cmd.layer, "cmd_apply_step": cmd.apply_step,
        "cmd_epoch": cmd.epoch, "ack_id": ack_id, "ack_result": ack_result, "ack_step": ack_step,
        "new_row": cmd.new_row, "copy_mask": cmd.copy_mask.iter().map(|&m| m as u8).collect::<Vec<_>>(),
    });
    let mut nz = 0u64;
    let mut table = Vec::new();
    for (i, e) in l.tensors.iter().enumerate() {
        let at = l.table_offset + i * TENSOR_ENTRY_BYTES;
        let mut entry = json!({
            "layer": i / l.num_tensors, "index": i % l.num_tensors, "name": e.name, "dtype": e.dtype,
            "offset": e.offset, "row_stride": e.row_stride, "row_bytes": e.row_bytes, "rows": e.rows,
            "kind": e.kind, "reserved": r.bytes(at + 61, 1)[0], "handle": e.handle,
        });
        if l.weights_kind == weights_kind::HOST {
            let mut data = Vec::new();
            for k in 0..e.rows as usize {
                data.extend_from_slice(r.bytes(e.row_at(k) as usize, e.row_bytes as usize));
            }
            entry["rows_fnv1a64"] = json!(fnv1a64(&data));
        }
        table.push(entry);
        nz += nonzero(&r, at + e.name.len(), at + 24) + nonzero(&r, at + 24 + e.dtype.len(), at + 32);
    }
    let ipc_json = match &l.ipc {
        None => Value::Null,
        Some(w) => {
            let io = l.ipc_offset;
            let (bus, n) = cstr(r.bytes(io + ipc::PCI_BUS_ID, 16));
            assert_eq!(bus, w.pci_bus_id);
            nz += nonzero(&r, io + n, io + 16) + nonzero(&r, io + 32, io + ipc::HANDLES);
            let mut handles = Vec::new();
            for (k, hd) in w.handles.iter().enumerate() {
                let at = io + ipc::HANDLES + k * ipc::ENTRY_BYTES;
                nz += nonzero(&r, at + ipc::ENTRY_SIZE + 8, at + ipc::ENTRY_BYTES);
                let hex: String = hd.handle.iter().map(|b| format!("{b:02x}")).collect();
                handles.push(json!({"handle": hex, "bytes": hd.bytes}));
            }
            let uuid: String = w.uuid.iter().map(|b| format!("{b:02x}")).collect();
            json!({"pci_bus_id": w.pci_bus_id, "uuid": uuid, "handles": handles})
        }
    };
    let (nl, cols) = (l.num_layers, l.count_cols());
    let grid = |v: &[u64]| v.chunks(cols).map(|c| c.to_vec()).collect::<Vec<_>>();
    let mut ring = Vec::new();
    for i in 0..l.ring_len {
        let base = l.ring_offset + i * l.ring_entry_bytes;
        let counts: Vec<u64> = (0..nl * cols).map(|k| r.read_u64(base + off::ENTRY_COUNTS + 8 * k)).collect();
        ring.push(json!({
            "index": i, "seq": r.get(base + off::ENTRY_SEQ), "step": r.read_u64(base + off::ENTRY_STEP),
            "phase": r.read_u64(base + off::ENTRY_PHASE), "tokens": r.read_u64(base + off::ENTRY_TOKENS),
            "moe_ns": r.read_u64(base + off::ENTRY_MOE_NS), "counts": grid(&counts),
        }));
        nz += nonzero(&r, base + off::ENTRY_MOE_NS + 8, base + off::ENTRY_COUNTS);
    }
    let engine_step = r.get(off::ENGINE_STEP);
    let mut steps = Vec::new();
    for t in engine_step.saturating_sub(l.ring_len as u64)..engine_step {
        match r.read_step(t) {
            RingRead::Step { phase, tokens, counts, .. } => {
                steps.push(json!({"step": t, "phase": phase, "tokens": tokens, "counts": grid(&counts)}))
            }
            other => return Err(format!("step {t}: {other:?}")),
        }
    }
    nz += nonzero(&r, off::TABLE_FAULT + 8, off::CMD_SEQ) + nonzero(&r, off::CMD_EPOCH + 8, off::ACK_ID);
    nz += nonzero(&r, off::ACK_STEP + 8, HEADER_BYTES);
    let p = l.num_physical();
    let phy2log = r.phy2log();
    let placement: Vec<Vec<i32>> = phy2log.chunks(p).map(|c| c.to_vec()).collect();
    let epochs: Vec<u64> = (0..nl).map(|k| r.epoch(k).load(std::sync::atomic::Ordering::Acquire)).collect();
    Ok(json!({
        "header": header, "mailbox": mailbox, "table": table, "ipc": ipc_json, "placement": placement,
        "epochs": epochs, "ring": ring, "steps": steps, "reserved_nonzero_bytes": nz,
    }))
}

/// The constants and offsets of the layout, as this crate defines them.
fn layout() -> Value {
    let consts: [(&str, u64); 30] = [
        ("MAGIC", MAGIC),
        ("VERSION", VERSION as u64),
        ("MINOR_VERSION", MINOR_VERSION as u64),
        ("HEADER_BYTES", HEADER_BYTES as u64),
        ("TENSOR_ENTRY_BYTES", TENSOR_ENTRY_BYTES as u64),
        ("MAX_TENSORS", MAX_TENSORS as u64),
        ("MIN_RING_LEN", MIN_RING_LEN as u64),
        ("IPC_HEAD_BYTES", ipc::HANDLES as u64),
        ("IPC_ENTRY_BYTES", ipc::ENTRY_BYTES as u64),
        ("IPC_MAX_HANDLES", ipc::MAX_HANDLES as u64),
        ("WEIGHTS_HOST", weights_kind::HOST as u64),
        ("WEIGHTS_CUDA_IPC", weights_kind::CUDA_IPC as u64),
        ("COUNTS_LOCAL", counts_kind::LOCAL as u64),
        ("COUNTS_PHYSICAL", counts_kind::PHYSICAL as u64),
        ("KIND_EXPERT", tensor_kind::EXPERT as u64),
        ("KIND_GLOBAL", tensor_kind::GLOBAL as u64),
        ("ENGINE_STARTING", engine_state::STARTING),
        ("ENGINE_RUNNING", engine_state::RUNNING),
        ("ENGINE_FINISHED", engine_state::FINISHED),
        ("ENGINE_FAILED", engine_state::FAILED),
        ("SIDECAR_ATTACHED", sidecar_state::ATTACHED),
        ("SIDECAR_EXITED_OK", sidecar_state::EXITED_OK),
        ("SIDECAR_FAILED", sidecar_state::FAILED),
        ("ACK_APPLIED", ack::APPLIED),
        ("ACK_CANCELLED", ack::CANCELLED),
        ("ACK_MISSED", ack::MISSED),
        ("ACK_REJECTED", ack::REJECTED),
        ("PHASE_PREFILL", phase::PREFILL),
        ("PHASE_DECODE", phase::DECODE),
        ("PHASE_MIXED", phase::MIXED),
    ];
    let offsets: [(&str, usize); 45] = [
        ("magic", off::MAGIC),
        ("version", off::VERSION),
        ("header_bytes", off::HEADER_BYTES),
        ("num_layers", off::NUM_LAYERS),
        ("slots_per_rank", off::SLOTS_PER_RANK),
        ("num_logical", off::NUM_LOGICAL),
        ("world_size", off::WORLD_SIZE),
        ("rank", off::RANK),
        ("ring_len", off::RING_LEN),
        ("expert_bytes", off::EXPERT_BYTES),
        ("num_tensors", off::NUM_TENSORS),
        ("weights_kind", off::WEIGHTS_KIND),
        ("total_bytes", off::TOTAL_BYTES),
        ("ring_offset", off::RING_OFFSET),
        ("ring_entry_bytes", off::RING_ENTRY_BYTES),
        ("placement_offset", off::PLACEMENT_OFFSET),
        ("epochs_offset", off::EPOCHS_OFFSET),
        ("command_offset", off::COMMAND_OFFSET),
        ("table_offset", off::TABLE_OFFSET),
        ("ipc_offset", off::IPC_OFFSET),
        ("engine_pid", off::ENGINE_PID),
        ("engine_step", off::ENGINE_STEP),
        ("engine_heartbeat_ns", off::ENGINE_HEARTBEAT_NS),
        ("engine_state", off::ENGINE_STATE),
        ("sidecar_pid", off::SIDECAR_PID),
        ("sidecar_heartbeat_ns", off::SIDECAR_HEARTBEAT_NS),
        ("sidecar_state", off::SIDECAR_STATE),
        ("minor_version", off::MINOR_VERSION),
        ("counts_kind", off::COUNTS_KIND),
        ("num_handles", off::NUM_HANDLES),
        ("table_fault", off::TABLE_FAULT),
        ("cmd_seq", off::CMD_SEQ),
        ("cmd_id", off::CMD_ID),
        ("cmd_layer", off::CMD_LAYER),
        ("cmd_apply_step", off::CMD_APPLY_STEP),
        ("cmd_epoch", off::CMD_EPOCH),
        ("ack_id", off::ACK_ID),
        ("ack_result", off::ACK_RESULT),
        ("ack_step", off::ACK_STEP),
        ("entry_seq", off::ENTRY_SEQ),
        ("entry_step", off::ENTRY_STEP),
        ("entry_phase", off::ENTRY_PHASE),
        ("entry_tokens", off::ENTRY_TOKENS),
        ("entry_moe_ns", off::ENTRY_MOE_NS),
        ("entry_counts", off::ENTRY_COUNTS),
    ];
    let mut out: Map<String, Value> = consts.iter().map(|&(k, v)| (k.to_string(), json!(v))).collect();
    out.insert("offsets".into(), offsets.iter().map(|&(k, v)| (k.to_string(), json!(v))).collect());
    Value::Object(out)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["dump", path] => match dump(Path::new(path)) {
            Ok(v) => {
                println!("{v}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {path}: {e}");
                ExitCode::from(1)
            }
        },
        ["layout"] => {
            println!("{}", layout());
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("usage: region_golden dump PATH | region_golden layout");
            ExitCode::from(2)
        }
    }
}
