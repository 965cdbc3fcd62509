//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// The shared fixtures folder (`../shared` beside the checkout, or `$EPLB_SHARED`).
///
/// Returns `None` when it is absent, so that the test suite still runs on a user's fresh machine;
/// with `EPLB_REQUIRE_SHARED=1` (CI sets it) a missing folder fails the test instead.
pub fn shared_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("EPLB_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"));
    if dir.join("golden").is_dir() {
        return Some(dir);
    }
    if std::env::var("EPLB_REQUIRE_SHARED").is_ok_and(|v| v == "1") {
        panic!("shared fixtures not found at {} and EPLB_REQUIRE_SHARED=1", dir.display());
    }
    eprintln!("SKIPPED: shared fixtures not found at {} (set EPLB_SHARED)", dir.display());
    None
}
