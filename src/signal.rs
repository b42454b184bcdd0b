//! Process signals: SIGINT/SIGTERM end the process gracefully, SIGHUP reloads the server
//! certificate files (the nginx convention).

use tokio::signal::unix::{SignalKind, signal};

/// Resolves on the first SIGINT or SIGTERM.
pub async fn shutdown() {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install SIGTERM/SIGINT handlers; stop the process with SIGKILL");
        return std::future::pending().await;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = name, "shutdown requested");
}

/// Calls `reload` on every SIGHUP until the process ends.
pub fn on_hangup(reload: impl Fn() + Send + 'static) {
    tokio::spawn(async move {
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::error!(
                "cannot install the SIGHUP handler; certificate reload by signal is unavailable"
            );
            return;
        };
        while hup.recv().await.is_some() {
            reload();
        }
    });
}
