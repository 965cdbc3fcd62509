//! The C API from C: `tests/c/smoke.c` compiled with `cc` against the generated header and the
//! static library, run without a sidecar (create, bad input refused with a message, fill,
//! publish, boundaries, records, read-back, out-of-order calls refused, finish). The same
//! program runs beside the real worker in the root crate's tests/capi.rs.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The target folder and profile this test was built in (`target/<profile>/deps/<test>`).
fn target_profile() -> (PathBuf, String) {
    let exe = std::env::current_exe().expect("the test's path");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps");
    let profile = profile_dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug").to_string();
    (profile_dir.parent().expect("target").to_path_buf(), profile)
}

/// Builds `libeplb_client.a` (cargo, same profile and target folder) and `smoke.c` against it.
pub fn build_smoke(out: &Path) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (target, profile) = target_profile();
    let mut cargo = Command::new(env!("CARGO"));
    cargo.args(["build", "-p", "eplb-client", "--lib", "--target-dir"]).arg(&target);
    if profile == "release" {
        cargo.arg("--release");
    }
    let st = cargo.status().expect("cargo runs");
    assert!(st.success(), "cargo build -p eplb-client failed");
    let lib = target.join(&profile).join("libeplb_client.a");
    assert!(lib.exists(), "{} was not built", lib.display());
    std::fs::create_dir_all(out).expect("the output folder");
    let exe = out.join("smoke");
    let o = Command::new("cc")
        .args(["-std=c11", "-D_DEFAULT_SOURCE", "-Wall", "-Wextra", "-Werror", "-O1", "-o"])
        .arg(&exe)
        .arg(dir.join("tests/c/smoke.c"))
        .arg("-I")
        .arg(dir.join("include"))
        .arg(&lib)
        .args(["-lpthread", "-ldl", "-lm", "-lrt", "-lgcc_s", "-lc"])
        .output()
        .expect("cc (gcc) must be installed: scripts/test.sh installs build-essential");
    assert!(o.status.success(), "cc failed:\n{}", String::from_utf8_lossy(&o.stderr));
    exe
}

#[test]
fn the_c_smoke_engine_runs_without_a_sidecar() {
    let out = std::env::temp_dir().join(format!("eplb-client-c-smoke-{}", std::process::id()));
    let exe = build_smoke(&out);
    let name = format!("csmoke{}", std::process::id());
    let o = Command::new(&exe).args([&name, "50", "0", "0"]).output().expect("the smoke program runs");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "smoke failed: {}\n{stdout}", String::from_utf8_lossy(&o.stderr));
    assert!(
        stdout.contains("\"steps\": 50")
            && stdout.contains("\"applied\": 0")
            && stdout.contains("\"outputs_match\": true"),
        "{stdout}"
    );
    assert!(!Path::new(&format!("/dev/shm/eplb-{name}-0")).exists(), "finish removes the region");
    let _ = std::fs::remove_dir_all(&out);
}
