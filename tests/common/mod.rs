//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// The shared fixtures folder (`../shared` beside the checkout, or `$EPLB_SHARED`): `None` when
/// it is absent, so that the suite still runs on a user's fresh machine; with
/// `EPLB_REQUIRE_SHARED=1` (CI sets it) a missing folder fails the test instead.
pub fn shared_dir() -> Option<PathBuf> {
    eplb::load::shared_dir_or_skip("integration test")
}
