//! The service manager's readiness protocol (systemd `Type=notify`): the
//! packaged unit counts the agent started only once the data path is
//! attached and the API answers, so `systemctl start` returns when traffic
//! is steered and units ordered after Sluice find it serving. Every call
//! is a no-op without `NOTIFY_SOCKET` (a shell, a test).

use sd_notify::NotifyState;

/// Start-up is done: `status` says what runs.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A reload began; [`ready`] ends it, whether it was applied or refused.
pub fn reloading() {
    send(&[
        NotifyState::Reloading,
        NotifyState::Status("reloading the config"),
    ]);
}

/// Shutting down: the manager waits for the exit, not for readiness.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

fn send(states: &[NotifyState<'_>]) {
    // NOTIFY_SOCKET stays in the environment (unsetting it races with
    // threads reading it): the unit's NotifyAccess=main ignores what
    // children would send.
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "telling the service manager our state failed");
    }
}
