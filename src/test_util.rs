//! Helpers the unit tests share. It owns nothing the daemon runs.

use std::time::Duration;

/// Whether `check` comes true within `limit`, looking every 10 ms.
pub(crate) async fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while !check() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}
