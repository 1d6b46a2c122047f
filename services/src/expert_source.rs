//! Where the Inference service gets experts from: the expert library of this process
//! ([`LocalExpertSource`], single-process mode) or a `roe.v1.ExpertLibrary` served by another
//! process ([`RemoteExpertSource`], `roe serve --role inference --library-url URL`).
//!
//! Both answer with the same statuses: NOT_FOUND for an unknown expert (the library's own
//! status travels back unchanged over gRPC); a remote library that cannot be reached is
//! UNAVAILABLE.

use std::sync::Arc;

use roe_expert_library::expert::{ExpertKind, ExpertMeta};
use roe_expert_library::library::ExpertLibrary;
use roe_expert_library::PeftAdapter;
use tonic::transport::{Channel, Endpoint};
use tonic::Status;

use crate::convert::status;
use crate::library_service::blocking;
use crate::proto::{self, expert_library_client::ExpertLibraryClient};
use crate::server::MAX_MESSAGE_BYTES;

/// What inference needs to know about an expert before loading it: its kind, the backbone it
/// fits, and the version and weight digest that key the loaded-expert cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertRef {
    pub id: String,
    pub kind: ExpertKind,
    pub backbone: String,
    pub version: u64,
    pub weights_sha256: String,
    pub weights_bytes: usize,
}

impl From<&ExpertMeta> for ExpertRef {
    fn from(m: &ExpertMeta) -> Self {
        Self {
            id: m.id.clone(),
            kind: m.kind,
            backbone: m.backbone.clone(),
            version: m.version,
            weights_sha256: m.weights_sha256.clone(),
            weights_bytes: m.weights_bytes,
        }
    }
}

/// A source of registered experts for the Inference service.
#[tonic::async_trait]
pub trait ExpertSource: Send + Sync + 'static {
    /// The metadata of expert `id`; NOT_FOUND when there is none. Called on every request
    /// that names an expert, so it must be cheap (no weights).
    async fn meta(&self, id: &str) -> Result<ExpertRef, Status>;

    /// The adapter of expert `id`, with the metadata read alongside it (the version the
    /// weights belong to, even when a new version was registered since [`Self::meta`]).
    async fn adapter(&self, id: &str) -> Result<(ExpertRef, PeftAdapter), Status>;
}

/// The expert library of this process; reads run off the async workers (sled is blocking).
pub struct LocalExpertSource {
    library: Arc<ExpertLibrary>,
}

impl LocalExpertSource {
    pub fn new(library: Arc<ExpertLibrary>) -> Self {
        Self { library }
    }
}

#[tonic::async_trait]
impl ExpertSource for LocalExpertSource {
    async fn meta(&self, id: &str) -> Result<ExpertRef, Status> {
        let library = self.library.clone();
        let id = id.to_string();
        blocking(move || {
            library
                .get(&id)
                .map(|m| ExpertRef::from(&m))
                .map_err(status)
        })
        .await
    }

    async fn adapter(&self, id: &str) -> Result<(ExpertRef, PeftAdapter), Status> {
        let library = self.library.clone();
        let id = id.to_string();
        blocking(move || {
            let meta = library.get(&id).map_err(status)?;
            let adapter = library.adapter(&id).map_err(status)?;
            Ok((ExpertRef::from(&meta), adapter))
        })
        .await
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExpertSourceError {
    #[error("library URL {url:?} is invalid: {source}")]
    InvalidUrl {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// A `roe.v1.ExpertLibrary` served by another process (`roe serve --role router`).
#[derive(Clone)]
pub struct RemoteExpertSource {
    client: ExpertLibraryClient<Channel>,
}

impl RemoteExpertSource {
    /// A client of the library at `url` (e.g. `http://roe-router:50051`). It connects lazily,
    /// so this process may start before the library; while it is unreachable, requests naming
    /// an expert fail with UNAVAILABLE (the bare backbone keeps working).
    pub fn new(url: &str) -> Result<Self, ExpertSourceError> {
        let endpoint = Endpoint::from_shared(url.to_string()).map_err(|source| {
            ExpertSourceError::InvalidUrl {
                url: url.to_string(),
                source,
            }
        })?;
        Ok(Self::from_channel(endpoint.connect_lazy()))
    }

    pub fn from_channel(channel: Channel) -> Self {
        Self {
            // Adapters travel in one GetExpert response, as large as the server sends.
            client: ExpertLibraryClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        }
    }

    async fn get(
        &self,
        id: &str,
        include_adapter: bool,
    ) -> Result<proto::GetExpertResponse, Status> {
        // Clones share the channel; the generated client needs `&mut self` per call.
        self.client
            .clone()
            .get_expert(proto::GetExpertRequest {
                id: id.to_string(),
                include_instances: false,
                include_adapter,
            })
            .await
            .map(tonic::Response::into_inner)
    }
}

/// The metadata in a GetExpert response; a response without it is the library's fault.
fn expert_ref(id: &str, e: Option<proto::Expert>) -> Result<ExpertRef, Status> {
    let e = e.ok_or_else(|| {
        Status::internal(format!("the expert library sent no metadata for {id:?}"))
    })?;
    let kind = match proto::ExpertKind::try_from(e.kind) {
        Ok(proto::ExpertKind::Prompt) => ExpertKind::Prompt,
        Ok(proto::ExpertKind::Lora) => ExpertKind::Lora,
        _ => {
            return Err(Status::internal(format!(
                "the expert library sent expert {id:?} with kind {}",
                e.kind
            )))
        }
    };
    Ok(ExpertRef {
        id: e.id,
        kind,
        backbone: e.backbone,
        version: e.version,
        weights_sha256: e.weights_sha256,
        weights_bytes: e.weights_bytes as usize,
    })
}

#[tonic::async_trait]
impl ExpertSource for RemoteExpertSource {
    async fn meta(&self, id: &str) -> Result<ExpertRef, Status> {
        expert_ref(id, self.get(id, false).await?.expert)
    }

    async fn adapter(&self, id: &str) -> Result<(ExpertRef, PeftAdapter), Status> {
        let r = self.get(id, true).await?;
        let meta = expert_ref(id, r.expert)?;
        let a = r.adapter.ok_or_else(|| {
            Status::internal(format!("the expert library sent no adapter for {id:?}"))
        })?;
        Ok((
            meta,
            PeftAdapter {
                config_json: a.adapter_config_json,
                safetensors: a.adapter_model_safetensors,
            },
        ))
    }
}
