//! Generated protobuf types and gRPC stubs for the Envoy delta discovery
//! subset, `istio.workload` and `istio.security`, from our own `.proto` files
//! in `xds/proto/` (see `build.rs`). Conversion into the mesh state lives in
//! `address`; everything here is plain wire data.

#![allow(clippy::all, missing_docs, rust_2018_idioms)]

pub mod envoy {
    pub mod config {
        pub mod core {
            pub mod v3 {
                tonic::include_proto!("envoy.config.core.v3");
            }
        }
    }
    pub mod service {
        pub mod discovery {
            pub mod v3 {
                tonic::include_proto!("envoy.service.discovery.v3");
            }
        }
    }
}

pub mod google {
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

pub mod istio {
    pub mod workload {
        tonic::include_proto!("istio.workload");
    }
    pub mod security {
        tonic::include_proto!("istio.security");
    }
}

/// The encoded `FileDescriptorSet` of every file above, for reflection in tests.
pub const DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));

/// Type URL of `istio.workload.Address` resources (workloads and services).
pub const ADDRESS_TYPE_URL: &str = "type.googleapis.com/istio.workload.Address";
/// Type URL of `istio.security.Authorization` resources.
pub const AUTHORIZATION_TYPE_URL: &str = "type.googleapis.com/istio.security.Authorization";
