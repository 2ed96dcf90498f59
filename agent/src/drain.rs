//! Drain: stop accepting, let open connections finish until a deadline, then close them.
//!
//! A [`Trigger`] owns the shutdown; every listener and connection holds a [`Watch`]. A
//! connection that still holds its `Watch` counts as open, so dropping the `Watch` (when the
//! connection ends) is what lets the drain finish early.

use std::convert::Infallible;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Running,
    /// Stop accepting; finish what is open.
    Draining,
    /// The deadline passed: close everything now.
    Closed,
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every connection finished before the deadline.
    Clean,
    /// The deadline passed and the remaining connections were closed.
    Forced,
}

pub struct Trigger {
    phase: watch::Sender<Phase>,
    open: mpsc::Receiver<Infallible>,
}

#[derive(Clone)]
pub struct Watch {
    phase: watch::Receiver<Phase>,
    _open: mpsc::Sender<Infallible>,
}

pub fn channel() -> (Trigger, Watch) {
    let (phase_tx, phase_rx) = watch::channel(Phase::Running);
    let (open_tx, open_rx) = mpsc::channel(1);
    (
        Trigger {
            phase: phase_tx,
            open: open_rx,
        },
        Watch {
            phase: phase_rx,
            _open: open_tx,
        },
    )
}

impl Trigger {
    /// Starts draining and waits until every [`Watch`] is dropped or `deadline` passes; then
    /// tells the rest to close and gives them a moment to do so.
    pub async fn drain(mut self, deadline: Duration) -> Outcome {
        let _ = self.phase.send(Phase::Draining);
        if tokio::time::timeout(deadline, self.open.recv())
            .await
            .is_ok()
        {
            return Outcome::Clean;
        }
        let _ = self.phase.send(Phase::Closed);
        // Closing is immediate for well-behaved tasks; bound the wait anyway.
        let _ = tokio::time::timeout(Duration::from_secs(1), self.open.recv()).await;
        Outcome::Forced
    }
}

impl Watch {
    async fn reached(&self, phase: Phase) {
        let mut rx = self.phase.clone();
        // An error means the trigger is gone, which only happens once drained.
        let _ = rx.wait_for(|p| *p >= phase).await;
    }

    /// Resolves when the agent starts draining: stop accepting new work.
    pub async fn draining(&self) {
        self.reached(Phase::Draining).await
    }

    /// Resolves when the drain deadline passed: abandon open work.
    pub async fn closed(&self) {
        self.reached(Phase::Closed).await
    }

    pub fn is_draining(&self) -> bool {
        *self.phase.borrow() >= Phase::Draining
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn drain_is_clean_when_every_watch_is_dropped() {
        let (trigger, watch) = channel();
        let conn = watch.clone();
        drop(watch);
        let task = tokio::spawn(async move {
            conn.draining().await;
            drop(conn);
        });
        assert_eq!(trigger.drain(Duration::from_secs(5)).await, Outcome::Clean);
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn drain_forces_close_at_the_deadline() {
        let (trigger, watch) = channel();
        let task = tokio::spawn(async move {
            watch.draining().await;
            // A connection that does not finish by itself...
            watch.closed().await;
            // ...is told to close at the deadline, and does.
            drop(watch);
        });
        assert_eq!(trigger.drain(Duration::from_secs(5)).await, Outcome::Forced);
        task.await.unwrap();
    }
}
