//! Compiles `proto/ca.proto` (Istio's `istio.v1.auth`) into client and server code, with the
//! pure-Rust `protox` compiler so that a machine without `protoc` builds with cargo alone.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/ca.proto");
    let descriptors = protox::compile(["ca.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
