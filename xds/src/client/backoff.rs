//! Reconnect delays: 10 ms doubling to 15 s, back to 10 ms once a stream
//! has carried a response (wire.md §3.3).

use std::time::Duration;

pub(crate) const INITIAL: Duration = Duration::from_millis(10);
pub(crate) const MAX: Duration = Duration::from_secs(15);

#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: INITIAL }
    }
}

impl Backoff {
    /// The delay before the next attempt; doubles the one after it.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(MAX);
        delay
    }

    pub(crate) fn reset(&mut self) {
        self.next = INITIAL;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_10ms_caps_at_15s_and_resets() {
        let mut b = Backoff::default();
        let delays: Vec<_> = (0..13).map(|_| b.next_delay()).collect();
        let ms: Vec<u128> = delays.iter().map(|d| d.as_millis()).collect();
        assert_eq!(
            ms,
            [
                10, 20, 40, 80, 160, 320, 640, 1280, 2560, 5120, 10240, 15000, 15000
            ]
        );
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(10));
    }
}
