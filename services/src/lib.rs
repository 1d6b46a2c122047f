//! gRPC adapters (package `roe.v1`) around the roe domain core, plus the benchmarks and the
//! pieces of the `roe` command-line tool.

pub mod answer_service;
pub mod bench;
pub mod convert;
pub mod eval;
pub mod eval_chart;
pub mod expert_source;
pub mod inference_service;
pub mod library_service;
pub mod models;
pub mod router_service;
pub mod server;

pub mod proto {
    //! Generated from `proto/roe/v1/roe.proto`.
    tonic::include_proto!("roe.v1");
    /// Encoded descriptors for the reflection service.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("roe_descriptor");
}
