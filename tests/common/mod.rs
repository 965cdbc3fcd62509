//! Helpers shared by the integration tests: the shared fixtures, a fresh folder per test, the
//! `mpirun` command line every MPI test starts from, and the JSON reports the binary writes.
//! Every test file that uses them declares `mod common;` (each compiles its own copy, so some of
//! them go unused in a given file).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// The worker binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_eplb-worker");

/// The shared fixtures folder (`../shared` beside the checkout, or `$EPLB_SHARED`): `None` when
/// it is absent, so that the suite still runs on a user's fresh machine; with
/// `EPLB_REQUIRE_SHARED=1` (CI sets it) a missing folder fails the test instead.
pub fn shared_dir() -> Option<PathBuf> {
    eplb::load::shared_dir_or_skip("integration test")
}

/// An empty folder of its own for one test: `$TMPDIR/eplb-<test file>-<pid>-<name>`, emptied
/// first (a folder left by an earlier run of the same pid never leaks into this one). The test
/// file's name keeps two files' tests of the same name apart; the pid, two runs at once.
pub fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("eplb-{}-{}-{name}", env!("CARGO_CRATE_NAME"), std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
    d
}

/// `mpirun -n RANKS --oversubscribe`, allowed to run as root (CI and containers) and to put more
/// ranks than cores on the 2-core machine; the caller adds the program and its arguments.
pub fn mpirun(ranks: usize) -> Command {
    let mut c = Command::new("mpirun");
    mpi_args(&mut c, ranks);
    c
}

/// [`mpirun`] under `timeout -k 5 LIMIT_S`: a hung job is killed, and reads as exit code 124.
pub fn mpirun_bounded(limit_s: u64, ranks: usize) -> Command {
    let mut c = Command::new("timeout");
    c.args(["-k", "5", &limit_s.to_string(), "mpirun"]);
    mpi_args(&mut c, ranks);
    c
}

fn mpi_args(c: &mut Command, ranks: usize) {
    c.args(["-n", &ranks.to_string(), "--oversubscribe"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1");
}

/// The JSON report at `path`; panics naming the file when it is missing or not JSON.
pub fn read_report(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}: {text}", path.display()))
}

/// The JSON report at `path`, or `None` when it is missing or not (yet) valid JSON.
pub fn try_read_report(path: &Path) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

/// A report's `status` (`running` from the start, then `ok` or `failed`), if it is readable.
pub fn report_status(path: &Path) -> Option<String> {
    try_read_report(path)?["status"].as_str().map(str::to_string)
}
