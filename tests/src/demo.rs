//! What the demos share: a stop flag that SIGINT and SIGTERM set, and
//! `main`'s error report.

use std::sync::atomic::{AtomicBool, Ordering};

/// Set on SIGINT or SIGTERM: the demo winds down and cleans up.
pub static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// Sets [`STOP`] on SIGINT and SIGTERM instead of dying, so the demo's
/// namespaces are removed.
pub fn stop_on_signals() {
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

/// Whether a signal asked the demo to stop.
#[must_use]
pub fn stopping() -> bool {
    STOP.load(Ordering::Relaxed)
}

/// `main`'s end: success, or the error with its causes on stderr.
#[must_use]
pub fn exit(name: &str, result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
