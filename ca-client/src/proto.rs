//! Istio's CA messages and gRPC stubs (package `istio.v1.auth`), generated from
//! `proto/ca.proto` at build time. Field numbers follow protocol/wire.md §7.

#![allow(clippy::all, missing_docs, rust_2018_idioms)]

tonic::include_proto!("istio.v1.auth");

/// The `metadata` key naming the identity a node proxy asks a certificate for.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// The gRPC path of `CreateCertificate`, as istiod serves it.
pub const CREATE_CERTIFICATE_PATH: &str =
    "/istio.v1.auth.IstioCertificateService/CreateCertificate";
