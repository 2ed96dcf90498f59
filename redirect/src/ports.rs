//! The agent's well-known ports inside every enrolled pod's netns (Istio ambient's numbers).
//! Binding them is the agent's job; the capture rules only point traffic at them.

/// Outbound capture: every TCP connection the pod opens is redirected here.
pub const OUTBOUND: u16 = 15001;
/// Inbound plaintext capture: TCP arriving at the pod from outside the mesh.
pub const INBOUND_PLAINTEXT: u16 = 15006;
/// Inbound HBONE (mTLS + HTTP/2 CONNECT); never redirected to another port.
pub const INBOUND_HBONE: u16 = 15008;
/// DNS proxy, localhost only (later milestone; no rule points here yet).
pub const DNS: u16 = 15053;
