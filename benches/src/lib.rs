//! Inputs for the benchmarks, built here so they are tested like any other code; the benches
//! in `benches/` only time them.
//!
//! - [`policy`]: a state with many authorization policies, few of them applying;
//! - [`mesh`]: a large mesh of workloads and services to look destinations up in;
//! - [`tunnel`]: two agents' HBONE ends joined in memory, with loopback applications;
//! - [`relay`]: single-threaded TCP relays (epoll, splice, io_uring) for the relay binary.

pub mod mesh;
pub mod policy;
pub mod relay;
pub mod tunnel;
