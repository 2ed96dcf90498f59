//! Drain: stop accepting, let open connections finish until a deadline, then close them.
//!
//! A [`Trigger`] owns the shutdown; every listener and connection holds a [`Watch`]. A
//! connection that still holds its `Watch` counts as open, so dropping the `Watch` (when the
//! connection ends) is what lets the drain finish early.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
enum Phase {
    Running = 0,
    /// Stop accepting; finish what is open.
    Draining = 1,
    /// The deadline passed: close everything now.
    Closed = 2,
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every connection finished before the deadline.
    Clean,
    /// The deadline passed and the remaining connections were closed.
    Forced,
}

/// What a drain's [`Trigger`] and its [`Watch`]es share.
///
/// Every connection task holds a `Watch` for the whole connection, so it is one pointer, and
/// waiting (done by listeners, not by connections: see `proxy::serve`) is one `Notify` waiter.
/// (A `watch` channel receiver and an mpsc sender to count the open ones cost more in every
/// connection's task.)
struct Shared {
    phase: AtomicU8,
    /// Live `Watch`es.
    open: AtomicUsize,
    /// Woken on every phase change.
    changed: Notify,
    /// Given a permit when the last `Watch` is dropped.
    idle: Notify,
}

pub struct Trigger {
    shared: Arc<Shared>,
}

/// A listener's or connection's hold on the drain: it counts as open until dropped.
pub struct Watch {
    shared: Arc<Shared>,
}

pub fn channel() -> (Trigger, Watch) {
    let shared = Arc::new(Shared {
        phase: AtomicU8::new(Phase::Running as u8),
        open: AtomicUsize::new(1),
        changed: Notify::new(),
        idle: Notify::new(),
    });
    (
        Trigger {
            shared: shared.clone(),
        },
        Watch { shared },
    )
}

impl Shared {
    fn phase(&self) -> u8 {
        self.phase.load(Ordering::Acquire)
    }

    fn enter(&self, phase: Phase) {
        self.phase.fetch_max(phase as u8, Ordering::AcqRel);
        self.changed.notify_waiters();
    }

    /// Resolves once no `Watch` is left.
    async fn idle(&self) {
        // A `Watch` is only made from a live one, so once the count reaches zero it stays
        // there; the permit `notify_one` leaves covers a last drop before this waits.
        while self.open.load(Ordering::Acquire) != 0 {
            self.idle.notified().await;
        }
    }
}

impl Trigger {
    /// Starts draining and waits until every [`Watch`] is dropped or `deadline` passes; then
    /// tells the rest to close and gives them a moment to do so.
    pub async fn drain(self, deadline: Duration) -> Outcome {
        self.shared.enter(Phase::Draining);
        if tokio::time::timeout(deadline, self.shared.idle())
            .await
            .is_ok()
        {
            return Outcome::Clean;
        }
        self.shared.enter(Phase::Closed);
        // Closing is immediate for well-behaved tasks; bound the wait anyway.
        let _ = tokio::time::timeout(Duration::from_secs(1), self.shared.idle()).await;
        Outcome::Forced
    }
}

impl Drop for Trigger {
    /// A trigger dropped without draining (its owner failed or went away) closes everything,
    /// as a drain past its deadline would; after [`Trigger::drain`] this is already so.
    fn drop(&mut self) {
        self.shared.enter(Phase::Closed);
    }
}

impl Clone for Watch {
    fn clone(&self) -> Self {
        self.shared.open.fetch_add(1, Ordering::Relaxed);
        Watch {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if self.shared.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.idle.notify_one();
        }
    }
}

impl Shared {
    async fn reached(&self, phase: Phase) {
        let changed = self.changed.notified();
        tokio::pin!(changed);
        loop {
            // Registered before the phase is read, so a change in between still wakes it.
            changed.as_mut().enable();
            if self.phase() >= phase as u8 {
                return;
            }
            changed.as_mut().await;
            changed.set(self.changed.notified());
        }
    }
}

impl Watch {
    /// Resolves when the agent starts draining: stop accepting new work.
    pub async fn draining(&self) {
        self.shared.reached(Phase::Draining).await
    }

    /// Resolves when the drain deadline passed: abandon open work.
    pub async fn closed(&self) {
        self.shared.reached(Phase::Closed).await
    }

    /// Follows the drain without counting as open: for whoever abandons others' work at the
    /// deadline but has none of its own.
    pub fn observer(&self) -> Observer {
        Observer {
            shared: self.shared.clone(),
        }
    }

    pub fn is_draining(&self) -> bool {
        self.shared.phase() >= Phase::Draining as u8
    }
}

/// A drain's phases seen from outside: unlike a [`Watch`], it does not hold the drain open.
pub struct Observer {
    shared: Arc<Shared>,
}

impl Observer {
    /// Resolves when the drain deadline passed (or the trigger was dropped).
    pub async fn closed(&self) {
        self.shared.reached(Phase::Closed).await
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

    /// The last watch going away before the drain starts still lets it end at once.
    #[tokio::test(start_paused = true)]
    async fn drain_is_clean_when_the_watches_were_gone_before_it_started() {
        let (trigger, watch) = channel();
        let more = watch.clone();
        drop((watch, more));
        let started = tokio::time::Instant::now();
        assert_eq!(trigger.drain(Duration::from_secs(5)).await, Outcome::Clean);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    /// Every waiting task wakes at each phase, not only the first one.
    #[tokio::test(start_paused = true)]
    async fn every_watch_sees_draining_then_closed() {
        let (trigger, watch) = channel();
        let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..3 {
            let (watch, seen) = (watch.clone(), seen_tx.clone());
            tokio::spawn(async move {
                watch.draining().await;
                seen.send("draining").unwrap();
                watch.closed().await;
                seen.send("closed").unwrap();
            });
        }
        drop((watch, seen_tx));
        tokio::task::yield_now().await;
        assert!(seen_rx.try_recv().is_err(), "nothing before the drain");
        let drain = tokio::spawn(trigger.drain(Duration::from_secs(5)));
        let mut seen = Vec::new();
        while let Some(phase) = seen_rx.recv().await {
            seen.push(phase);
        }
        assert_eq!(
            seen,
            ["draining"; 3]
                .into_iter()
                .chain(["closed"; 3])
                .collect::<Vec<_>>()
        );
        assert_eq!(drain.await.unwrap(), Outcome::Forced);
    }

    /// An observer sees the deadline but does not keep the drain from ending cleanly.
    #[tokio::test(start_paused = true)]
    async fn an_observer_does_not_hold_the_drain_open() {
        let (trigger, watch) = channel();
        let observer = watch.observer();
        drop(watch);
        assert_eq!(trigger.drain(Duration::from_secs(5)).await, Outcome::Clean);
        // The trigger is gone once drained: the observer is told to close what is left.
        observer.closed().await;
    }

    /// A trigger that is dropped instead of drained closes its watches.
    #[tokio::test(start_paused = true)]
    async fn dropping_the_trigger_closes_the_watches() {
        let (trigger, watch) = channel();
        assert!(!watch.is_draining());
        drop(trigger);
        watch.closed().await;
        assert!(watch.is_draining());
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
