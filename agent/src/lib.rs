//! ambientd, the node agent: configuration, wiring and lifecycle, and the L4 proxy that
//! carries enrolled workloads' TCP traffic over HBONE.
//!
//! The mesh state comes from `xds`, certificates from `ca-client`; this crate turns them into
//! listeners, TLS sessions and proxied connections. See ARCHITECTURE.md for the runtime split
//! and the port table.

pub mod app;
pub mod bench;
pub mod ca;
pub mod capture;
pub mod cli;
pub mod config;
pub mod control_plane;
pub mod demo;
pub mod drain;
pub mod enrollment;
pub mod events;
pub mod mesh;
pub mod netns;
pub mod proxy;
pub mod readiness;
pub mod tls;
