//! roe's gRPC layer (package `roe.v1`), as text-embeddings-inference's `router/` and qdrant's
//! api layer: one handler file per service ([`library_service`], [`router_service`],
//! [`inference_service`], [`answer_service`], [`training_service`]) over the expert library and the serving core
//! (`roe-serving`); every proto conversion in [`convert`]; every error-to-status mapping in
//! [`status`]; the clients of another roe process in [`remote`]; reads as of a library seq
//! (`min_library_seq`, read-your-writes across replicas) in [`consistency`]; server assembly
//! per role, with health following the workers, in [`server`].

pub mod answer_service;
pub mod auth;
pub mod consistency;
pub mod convert;
pub mod inference_service;
pub mod library_service;
pub mod load_shed;
pub mod message_limit;
pub mod remote;
pub mod request_metrics;
pub mod router_service;
pub mod server;
pub mod status;
pub mod tls;
pub mod training_service;

pub mod proto {
    //! Generated from `proto/roe/v1/roe.proto`.
    tonic::include_proto!("roe.v1");
    // serde for every message, in the proto3 JSON mapping (the HTTP API's roe endpoints).
    include!(concat!(env!("OUT_DIR"), "/roe.v1.serde.rs"));
    /// Encoded descriptors for the reflection service.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("roe_descriptor");
}
