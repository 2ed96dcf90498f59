//! The narrow interface between the delta xDS client and whatever keeps the
//! resources: the client decodes each response into typed updates and
//! removals and hands them over; the handler says which updates it rejected
//! and why, so the client can NACK them by name while the rest stay applied.
//! The client knows nothing about workloads, services or policies.

/// One added or changed resource, by its xDS name.
#[derive(Debug, Clone, PartialEq)]
pub struct Update<T> {
    pub name: String,
    pub resource: T,
}

/// A resource that was not applied, with the reason sent back in the NACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub name: String,
    pub reason: String,
}

impl Rejection {
    pub fn new(name: impl Into<String>, reason: impl ToString) -> Self {
        Self {
            name: name.into(),
            reason: reason.to_string(),
        }
    }
}

/// Applies the resources of one xDS type.
pub trait Handler<T>: Send + Sync + 'static {
    /// Applies one response: every update that is valid, then the removals
    /// (names not held are ignored). Returns the updates it refused; an
    /// update it refuses must leave any earlier version of that resource
    /// as it was, unless the handler documents a stricter stand-in (the
    /// authorization handler fails closed instead).
    fn apply(&self, updates: Vec<Update<T>>, removals: &[String]) -> Vec<Rejection>;
}
