//! The committed C header is exactly what cbindgen generates from this crate: a stale header
//! fails here, with the command that regenerates it. `EPLB_WRITE_HEADER=1` rewrites it instead
//! (what scripts/gen_header.sh does).

use std::path::Path;

fn generate() -> String {
    let dir = env!("CARGO_MANIFEST_DIR");
    let config =
        cbindgen::Config::from_file(Path::new(dir).join("cbindgen.toml")).expect("client/cbindgen.toml parses");
    let bindings =
        cbindgen::Builder::new().with_crate(dir).with_config(config).generate().expect("cbindgen generates the header");
    let mut out = Vec::new();
    bindings.write(&mut out);
    String::from_utf8(out).expect("the header is UTF-8")
}

#[test]
fn committed_header_is_current() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("include/eplb_client.h");
    let want = generate();
    if std::env::var_os("EPLB_WRITE_HEADER").is_some() {
        std::fs::write(&path, &want).expect("write the header");
        return;
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == want,
        "client/include/eplb_client.h is stale (or missing): regenerate it with scripts/gen_header.sh and commit it"
    );
}

#[test]
fn header_names_the_agreed_interface() {
    let h = generate();
    for name in [
        "typedef struct eplb_region eplb_region;",
        "EPLB_ERR_PANIC = 6",
        "eplb_tensor_desc",
        "eplb_config",
        "eplb_agree_fn",
        "eplb_apply_fn",
        "eplb_header",
        "eplb_table_entry",
        "eplb_create(",
        "eplb_tensor_ptr(",
        "eplb_publish(",
        "eplb_record(",
        "eplb_at_step_boundary(",
        "eplb_boundary_begin(",
        "eplb_boundary_end(",
        "eplb_phy2log(",
        "eplb_heartbeat(",
        "eplb_table_fault(",
        "eplb_finish(",
        "eplb_fail(",
        "eplb_close(",
        "eplb_last_error(",
        "eplb_abi_version(",
        "#define EPLB_MAGIC",
        "#define EPLB_KIND_EXPERT 1",
        "#define EPLB_WEIGHTS_CUDA_IPC 1",
        "#define EPLB_PHASE_DECODE 2",
        "#define EPLB_OFF_ENGINE_STEP 128",
    ] {
        assert!(h.contains(name), "the generated header lacks {name:?}");
    }
}
