//! Wire compatibility of the CA messages: Istio's own bytes decode with our types to what the
//! vectors' JSON says, re-encode losslessly, and our encoding uses the field numbers and wire
//! types of protocol/wire.md §7 (written out below, not taken from our .proto).

use std::time::Duration;

use ca_client::proto::{IMPERSONATED_IDENTITY, IstioCertificateRequest, IstioCertificateResponse};
use ca_client::{LocalCa, x509};
use prost::Message;
use serde_json::Value;

const REQUEST_BIN: &[u8] = include_bytes!("../testdata/wire/ca_request.binpb");
const REQUEST_JSON: &str = include_str!("../testdata/wire/ca_request.json");
const RESPONSE_BIN: &[u8] = include_bytes!("../testdata/wire/ca_response.binpb");
const RESPONSE_JSON: &str = include_str!("../testdata/wire/ca_response.json");

const LEN: u8 = 2;
const VARINT: u8 = 0;

/// wire.md §7.1: `IstioCertificateRequest` = 1 csr string, (2 unused), 3 validity_duration int64,
/// 4 metadata Struct.
const REQUEST_FIELDS: &[(u32, u8)] = &[(1, LEN), (3, VARINT), (4, LEN)];
/// wire.md §7.1: `IstioCertificateResponse` = 1 cert_chain repeated string.
const RESPONSE_FIELDS: &[(u32, u8)] = &[(1, LEN)];

/// `(field number, wire type)` of each top-level field of an encoded message, in order.
fn tags(mut bytes: &[u8]) -> Vec<(u32, u8)> {
    fn varint(bytes: &mut &[u8]) -> u64 {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (byte, rest) = bytes.split_first().expect("truncated varint");
            *bytes = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return value;
            }
        }
        panic!("varint longer than 64 bits")
    }
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let key = varint(&mut bytes);
        let (number, wire_type) = ((key >> 3) as u32, (key & 7) as u8);
        match wire_type {
            VARINT => {
                varint(&mut bytes);
            }
            LEN => {
                let len = varint(&mut bytes) as usize;
                bytes = &bytes[len..];
            }
            other => panic!("unexpected wire type {other} for field {number}"),
        }
        out.push((number, wire_type));
    }
    out
}

fn expectation(json: &str) -> Value {
    serde_json::from_str::<Value>(json).unwrap()["json"].clone()
}

fn distinct(tags: Vec<(u32, u8)>) -> Vec<(u32, u8)> {
    let mut tags = tags;
    tags.sort();
    tags.dedup();
    tags
}

#[test]
fn istio_request_bytes_decode_to_the_expected_fields() {
    let expected = expectation(REQUEST_JSON);
    assert_eq!(
        distinct(tags(REQUEST_BIN)),
        REQUEST_FIELDS,
        "the vector itself"
    );

    let request = IstioCertificateRequest::decode(REQUEST_BIN).unwrap();
    assert_eq!(request.csr, expected["csr"].as_str().unwrap());
    assert_eq!(
        request.validity_duration.to_string(),
        expected["validity_duration"].as_str().unwrap()
    );
    let metadata = request.metadata.as_ref().unwrap();
    assert_eq!(metadata.fields.len(), 1);
    let impersonated = match &metadata.fields[IMPERSONATED_IDENTITY].kind {
        Some(prost_types::value::Kind::StringValue(s)) => s.clone(),
        other => panic!("ImpersonatedIdentity is {other:?}"),
    };
    assert_eq!(
        impersonated,
        expected["metadata"][IMPERSONATED_IDENTITY]
            .as_str()
            .unwrap()
    );

    let again = IstioCertificateRequest::decode(request.encode_to_vec().as_slice()).unwrap();
    assert_eq!(again, request);
}

#[test]
fn istio_response_bytes_decode_to_leaf_intermediate_and_root() {
    let expected = expectation(RESPONSE_JSON);
    assert_eq!(
        distinct(tags(RESPONSE_BIN)),
        RESPONSE_FIELDS,
        "the vector itself"
    );

    let response = IstioCertificateResponse::decode(RESPONSE_BIN).unwrap();
    let want: Vec<&str> = expected["cert_chain"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(response.cert_chain, want);
    assert!(response.cert_chain.iter().all(|pem| pem.ends_with('\n')));

    // Istio's layout, read as the client reads it: leaf, intermediates, root bundle last.
    let chain: Vec<_> = response.cert_chain[..2]
        .iter()
        .flat_map(|pem| x509::certs_from_pem(pem.as_bytes()).unwrap())
        .collect();
    let roots = x509::certs_from_pem(response.cert_chain[2].as_bytes()).unwrap();
    assert_eq!(
        x509::spiffe_ids(&chain[0]).unwrap(),
        vec!["spiffe://cluster.local/ns/demo/sa/reviews".parse().unwrap()]
    );
    let (not_before, _) = x509::validity(&chain[0]).unwrap();
    x509::verify_chain(&chain, &roots, not_before + Duration::from_secs(3600)).unwrap();

    let again = IstioCertificateResponse::decode(response.encode_to_vec().as_slice()).unwrap();
    assert_eq!(again, response);
}

#[test]
fn our_encoding_uses_istios_field_numbers() {
    let request = IstioCertificateRequest {
        csr: "csr".into(),
        validity_duration: 86_400,
        metadata: Some(prost_types::Struct::default()),
    };
    assert_eq!(tags(&request.encode_to_vec()), REQUEST_FIELDS);
    let response = IstioCertificateResponse {
        cert_chain: vec!["a".into(), "b".into()],
    };
    assert_eq!(tags(&response.encode_to_vec()), [(1, LEN), (1, LEN)]);
}

#[test]
fn the_openssl_csr_of_the_vector_is_accepted_by_our_ca() {
    let request = IstioCertificateRequest::decode(REQUEST_BIN).unwrap();
    assert_eq!(
        x509::csr_spiffe_ids(&request.csr).unwrap(),
        vec!["spiffe://cluster.local/ns/demo/sa/reviews".parse().unwrap()]
    );
    let ca = LocalCa::generate().unwrap();
    let identity = "spiffe://cluster.local/ns/demo/sa/reviews".parse().unwrap();
    let chain = ca
        .sign_csr(&request.csr, &identity, Duration::from_secs(600))
        .unwrap();
    let leaf = x509::certs_from_pem(chain[0].as_bytes()).unwrap();
    assert_eq!(x509::spiffe_ids(&leaf[0]).unwrap(), vec![identity]);
}

/// The RPC path is the one name that matters on the wire: wire.md §1 gives istiod's.
#[tokio::test]
async fn the_client_calls_istiods_rpc_path() {
    use ca_client::proto::istio_certificate_service_client::IstioCertificateServiceClient;
    use std::sync::{Arc, Mutex};

    const ISTIOD_PATH: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";
    assert_eq!(ca_client::proto::CREATE_CERTIFICATE_PATH, ISTIOD_PATH);

    let seen = Arc::new(Mutex::new(Vec::new()));
    let recorder = {
        let seen = seen.clone();
        tower::service_fn(move |request: http::Request<tonic::body::Body>| {
            seen.lock().unwrap().push(request.uri().path().to_owned());
            async {
                // An immediate gRPC error, so that the call ends at once.
                Ok::<_, std::convert::Infallible>(
                    http::Response::builder()
                        .header("content-type", "application/grpc")
                        .header("grpc-status", "12")
                        .body(tonic::body::Body::empty())
                        .unwrap(),
                )
            }
        })
    };
    let mut client = IstioCertificateServiceClient::new(recorder);
    let status = client
        .create_certificate(IstioCertificateRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented);
    assert_eq!(*seen.lock().unwrap(), vec![ISTIOD_PATH.to_owned()]);

    use tonic::server::NamedService;
    type Server = ca_client::proto::istio_certificate_service_server::IstioCertificateServiceServer<
        ca_client::server::Service,
    >;
    assert_eq!(
        format!("/{}/CreateCertificate", Server::NAME),
        ISTIOD_PATH,
        "the server mounts the same path"
    );
}
