//! Writes the seed inputs of every target into `fuzz/corpus/<target>/seed-*` (not an AFL target):
//! small valid and near-valid files in the shapes the readers' unit tests use, so that the fuzzer
//! starts inside each format instead of having to find the magic numbers. Run by `scripts/fuzz.sh
//! --seeds`; the files are committed.

use std::path::Path;

use eplb::engine::shm::region::{counts_kind, round64, IpcHandle, IpcWeights, Layout, Shape, TensorDesc, TensorEntry, HEADER_BYTES};

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut seeds: Vec<(&str, String, Vec<u8>)> = Vec::new();
    let mut add = |target: &'static str, name: &str, data: Vec<u8>| seeds.push((target, name.to_string(), data));

    // region: host layouts (local and physical counts, padded rows, a global tensor) and one with
    // CUDA IPC handles; the bytes up to the end of the sections (the target pads with zeros).
    let shape = |num_layers, slots_per_rank, num_logical, world_size, rank, counts_kind| Shape {
        num_layers,
        slots_per_rank,
        num_logical,
        world_size,
        rank,
        ring_len: 16,
        counts_kind,
    };
    let tensors = [
        TensorDesc::expert("w13_weight", "bf16", 256),
        TensorDesc::expert("w13_weight_scale_inv", "f32", 12).strided(16),
        TensorDesc::global("w13_input_scale", "f32", 8, 10),
        TensorDesc::expert("w2_weight", "f8e4m3", 37),
    ];
    let host = Layout::host(&shape(3, 4, 10, 3, 1, counts_kind::LOCAL), &tensors);
    add("region", "host-3x4", region_image(&host));
    add("region", "host-1x1-physical", region_image(&Layout::contiguous(&shape(1, 1, 1, 1, 0, counts_kind::PHYSICAL), 64)));
    let mut next = [0u64; 2];
    let entries: Vec<TensorEntry> = host
        .tensors
        .iter()
        .enumerate()
        .map(|(i, e)| {
            if e.rows == 0 {
                return TensorEntry { handle: 0, ..e.clone() };
            }
            let h = i % 2;
            let offset = next[h];
            next[h] += round64((e.extent().1 - e.extent().0) as u64);
            TensorEntry { offset, handle: h as u16, ..e.clone() }
        })
        .collect();
    let ipc = IpcWeights {
        pci_bus_id: "0000:19:00.0".into(),
        uuid: [7; 16],
        handles: (0..2).map(|i| IpcHandle { handle: [i as u8 + 1; 64], bytes: 1 << 20 }).collect(),
    };
    add("region", "ipc-3x4", region_image(&Layout::cuda_ipc(&shape(3, 4, 10, 3, 1, counts_kind::LOCAL), entries, ipc)));

    // load_csv: one row per layer (with and without a header, fractions, CRLF), per-iteration.
    add("load_csv", "plain", b"1,2,3\n4, 5 ,6\n".to_vec());
    add("load_csv", "header-crlf", b"e0,e1,e2\r\n\r\n 1 ,2,3\r\n\n4,5,6.0\r\n\n".to_vec());
    add("load_csv", "fraction", b"0.1,2\n1e3,7\n".to_vec());
    add(
        "load_csv",
        "iteration",
        b",dataset,iteration,layer_idx,0,1,2\n0,wiki,1,0,10,11,12\n1,wiki,0,0,0,1,2\n2,books,0,0,100,101,102\n\
          3,wiki,1,1,13,14,15\n4,books,1,0,110,111,112\n5,wiki,0,1,3,4,5\n6,books,0,1,103,104,105\n7,books,1,1,113,114,115\n"
            .to_vec(),
    );
    add("load_csv", "iteration-noindex", b"dataset,iteration,layer_idx,a,b\nx,5,7,1,2\nx,5,3,3,4\n".to_vec());

    // load_json: each key, bare arrays, steps, floats.
    add("load_json", "weight", br#"{"other": 1, "weight": [[1, 2, 3], [4, 5, 6]]}"#.to_vec());
    add("load_json", "key-order", br#"{"logical_count": [[9]], "counts": [[7]], "weight": [[5]]}"#.to_vec());
    add("load_json", "bare2d", b"[[1, 2, 3], [4, 5, 6]]".to_vec());
    add("load_json", "steps", br#"{"logical_count": [[[1, 2], [3, 4], [5, 6]], [[10, 20], [30, 40], [50, 60]]]}"#.to_vec());
    add("load_json", "decayed", br#"{"weight": [[12.5, 1], [0.25, 3.0e2]]}"#.to_vec());
    add("load_json", "placement", br#"{"physical_to_logical_map": [[0, 1]], "logical_count": [[1, 1]]}"#.to_vec());

    // load_npy: integer and float dtypes, both byte orders, C and Fortran order, 2 and 3 dims.
    let f4: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    add("load_npy", "f4-2x3", npy("<f4", false, &[2, 3], &f4));
    let i8s: Vec<u8> = (0..12i64).flat_map(|v| v.to_le_bytes()).collect();
    add("load_npy", "i8-2x2x3", npy("<i8", false, &[2, 2, 3], &i8s));
    add("load_npy", "u2-be", npy(">u2", false, &[1, 2], &[0, 1, 1, 2]));
    let f8: Vec<u8> = [0.5f64, 1.0, 2.25, 3.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    add("load_npy", "f8-fortran", npy("<f8", true, &[2, 2], &f8));
    add("load_npy", "u1", npy("|u1", false, &[2, 2], &[1, 2, 3, 4]));

    // placement: first byte = num_logical, then a file `plan` writes.
    let mut p = vec![4u8];
    p.extend_from_slice(
        br#"{"physical_to_logical_map": [[0, 1, 2, 3, 0, 1], [3, 2, 1, 0, 3, 3]], "logical_to_physical_map": [], "logical_count": [], "metrics": {"balancedness": 0.9}}"#,
    );
    add("placement", "two-layers", p);
    let mut p = vec![1u8];
    p.extend_from_slice(br#"{"physical_to_logical_map": [[0]]}"#);
    add("placement", "one", p);

    for (target, name, data) in seeds {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).expect("create the corpus directory");
        std::fs::write(dir.join(format!("seed-{name}")), data).expect("write a seed");
    }
}

/// The bytes of a region of `l` up to the end of its header, table and IPC section, as the engine
/// writes them (the tensors' bytes, zeros here, are not what the sidecar parses).
fn region_image(l: &Layout) -> Vec<u8> {
    let table = l.table_bytes();
    let ipc = l.ipc_bytes();
    let end = (l.table_offset + table.len()).max(l.ipc_offset + ipc.len()).max(HEADER_BYTES);
    let mut b = vec![0u8; end];
    b[..HEADER_BYTES].copy_from_slice(&l.header_bytes(1));
    b[l.table_offset..l.table_offset + table.len()].copy_from_slice(&table);
    b[l.ipc_offset..l.ipc_offset + ipc.len()].copy_from_slice(&ipc);
    b
}

/// A version-1.0 .npy file of `shape` (as numpy writes it: the header padded to 64 bytes).
fn npy(descr: &str, fortran: bool, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let shape_text = match shape {
        [n] => format!("({n},)"),
        _ => format!("({})", shape.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")),
    };
    let order = if fortran { "True" } else { "False" };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': {order}, 'shape': {shape_text}, }}");
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}
