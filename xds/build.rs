//! Compiles our own `.proto` files (written from shared/protocol/wire.md) with
//! protox, a pure-Rust compiler, so a fresh machine builds with cargo alone.
//! The descriptor set is also written out for the wire-compatibility tests.

use prost::Message;

const PROTOS: &[&str] = &[
    "proto/envoy/service/discovery/v3/discovery.proto",
    "proto/istio/workload/workload.proto",
    "proto/istio/security/authorization.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(false)
        .compile_fds(fds)?;
    Ok(())
}
