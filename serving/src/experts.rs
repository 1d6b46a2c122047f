//! Where the serving core gets experts from: the library of this process
//! ([`LocalExpertSource`]) or one served by another process (the gRPC client in
//! `roe-services`, `roe serve --role inference --library-url URL`). Both answer alike:
//! NOT_FOUND for an unknown expert, UNAVAILABLE / DEADLINE_EXCEEDED when a remote library
//! cannot be reached in time.

use std::sync::Arc;

use roe_expert_library::{ExpertKind, ExpertLibrary, ExpertMeta, PeftAdapter};

use crate::error::{blocking, Result};

/// What serving needs to know about an expert before loading it: its kind, the backbone it
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

/// A source of registered experts.
#[async_trait::async_trait]
pub trait ExpertSource: Send + Sync + 'static {
    /// The metadata of expert `id`; NOT_FOUND when there is none. Called on every request
    /// that names an expert, so it must be cheap (no weights).
    async fn meta(&self, id: &str) -> Result<ExpertRef>;

    /// The adapter of expert `id`, with the metadata read alongside it (the version the
    /// weights belong to, even when a new version was registered since [`Self::meta`]).
    async fn adapter(&self, id: &str) -> Result<(ExpertRef, PeftAdapter)>;
}

/// The expert library of this process; reads run off the async workers (sled blocks).
pub struct LocalExpertSource {
    library: Arc<ExpertLibrary>,
}

impl LocalExpertSource {
    pub fn new(library: Arc<ExpertLibrary>) -> Self {
        Self { library }
    }
}

#[async_trait::async_trait]
impl ExpertSource for LocalExpertSource {
    async fn meta(&self, id: &str) -> Result<ExpertRef> {
        let (library, id) = (self.library.clone(), id.to_string());
        blocking(move || Ok(ExpertRef::from(&library.get(&id)?))).await
    }

    async fn adapter(&self, id: &str) -> Result<(ExpertRef, PeftAdapter)> {
        let (library, id) = (self.library.clone(), id.to_string());
        blocking(move || {
            let meta = library.get(&id)?;
            let adapter = library.adapter(&id)?;
            Ok((ExpertRef::from(&meta), adapter))
        })
        .await
    }
}
