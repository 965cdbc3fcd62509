//! SIGTERM and SIGINT end a run cleanly instead of leaving a report that says `running` forever
//! and a region whose `sidecar_state` says attached with a dead pid.
//!
//! The handler does only what is async-signal-safe: it records the signal (the loop sees it at
//! its next step, agrees on it with the other ranks and ends with a `failed` report naming the
//! signal; every wait on the engine sees it too), and marks the engine's region `sidecar_state =
//! failed` with one atomic store, so that the engine knows at once that its sidecar is leaving.
//! A second signal of either kind ends the process at once (the default action), for a run that
//! does not get to its next step.

use std::sync::atomic::{AtomicI32, AtomicPtr, AtomicU64, Ordering};

/// The signal received (0: none).
static RECEIVED: AtomicI32 = AtomicI32::new(0);

/// The region's `sidecar_state` field while the sidecar is attached (null otherwise).
static SIDECAR_STATE: AtomicPtr<AtomicU64> = AtomicPtr::new(std::ptr::null_mut());

/// The value the handler stores there: `sidecar_state::FAILED`.
static LEFT_STATE: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    if RECEIVED.swap(sig, Ordering::SeqCst) != 0 {
        // SAFETY: signal(2) and raise(3) are async-signal-safe.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
        return;
    }
    let field = SIDECAR_STATE.load(Ordering::SeqCst);
    if !field.is_null() {
        // SAFETY: the pointer is cleared (by `forget_region`) before the mapping goes away.
        unsafe { (*field).store(LEFT_STATE.load(Ordering::Relaxed), Ordering::SeqCst) };
    }
}

/// Installs the handler for SIGTERM and SIGINT (once per process).
pub fn install() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for sig in [libc::SIGTERM, libc::SIGINT] {
            // SAFETY: a plain handler that only touches atomics and async-signal-safe calls.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
                action.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut action.sa_mask);
                libc::sigaction(sig, &action, std::ptr::null_mut());
            }
        }
    });
}

/// The signal received, if any.
pub(crate) fn received() -> Option<i32> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// The signal's name for a message.
pub fn name(sig: i32) -> &'static str {
    match sig {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        _ => "a signal",
    }
}

/// The message of a run or wait ended by `sig`.
pub fn interrupted(sig: i32) -> String {
    format!("interrupted by {}: the run was stopped before its end; nothing is half applied", name(sig))
}

/// Has the handler mark `field` (a region's `sidecar_state`) with `state` on a signal.
///
/// # Safety
/// `field` must stay valid until [`forget_region`] is called.
pub(crate) unsafe fn watch_region(field: &AtomicU64, state: u64) {
    LEFT_STATE.store(state, Ordering::SeqCst);
    SIDECAR_STATE.store(field as *const AtomicU64 as *mut AtomicU64, Ordering::SeqCst);
}

/// Stops marking the region (before it is unmapped).
pub(crate) fn forget_region() {
    SIDECAR_STATE.store(std::ptr::null_mut(), Ordering::SeqCst);
}
