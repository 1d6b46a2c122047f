//! Domain core of roe: experts and their durable library, the instance index and
//! Retrieval-of-Experts routing over any sentence [`embedding::Encoder`] (the model itself
//! lives in `roe-encoder`). Nothing here knows about gRPC; the services are
//! thin adapters around [`library::ExpertLibrary`].

mod compaction;
pub mod embedding;
pub mod engine;
mod error;
pub mod expert;
pub mod follow;
mod graph;
mod hnsw_rs_engine;
pub mod index;
mod lexical;
pub mod library;
pub mod library_store;
pub mod merge;
pub mod metrics;
pub mod persist;
pub mod retrieval;
mod route_cache;
pub mod store;

pub use compaction::CompactionHold;
pub use error::{LibraryError, Result};
pub use expert::{
    validate_expert_id, BackboneSpec, ExpertKind, ExpertMeta, Instance, PeftAdapter, TextFormat,
    TrainingRecord,
};
pub use follow::ReplicationStatus;
pub use library::{Committed, ExpertLibrary, LibraryConfig, NewExpert, WriteOptions};
pub use merge::{MergeRequest, PromptMergeMode};
pub use retrieval::{Query, RouteOptions, RouteResult, Strategy};
pub use route_cache::RouteCacheStats;
