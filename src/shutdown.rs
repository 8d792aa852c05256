//! The shutdown signal the workers are handed (tests hand them their own
//! future instead), and the bound on how long a stop may take.

use std::time::Duration;

/// How long a worker may take to stop once asked, whatever its broker does:
/// the in-flight deliveries get most of it, the final commit and leaving the
/// group the rest.
pub const STOP_BOUND: Duration = Duration::from_secs(10);

/// [`signal`], and once it fired, a watchdog: a process still running
/// [`STOP_BOUND`] later (a frozen broker can hold a commit or the consumer's
/// close for minutes) logs why and exits with status 1. What was not
/// committed is replayed by the next owner, as after a crash.
pub async fn signal_with_stop_bound() {
    signal().await;
    std::thread::spawn(|| {
        std::thread::sleep(STOP_BOUND);
        tracing::error!(
            bound_s = STOP_BOUND.as_secs(),
            "the graceful stop did not finish in time (broker unresponsive?); exiting now; \
             what was not committed is replayed by the next owner"
        );
        std::process::exit(1);
    });
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM.
pub async fn signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the worker");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => tracing::info!("interrupted; shutting down"),
        () = terminate => tracing::info!("terminated; shutting down"),
    }
}
