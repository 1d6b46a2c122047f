//! `roe.v1.ExpertLibrary`: register, read, list, delete experts and add instances.

use std::sync::Arc;

use roe_expert_library::library::{ExpertLibrary, NewExpert};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::convert::{
    expert_to_proto, instance_from_proto, instance_to_proto, merge_request, new_expert,
};
use crate::proto::{self, expert_library_server::ExpertLibrary as Api};
use crate::status::{library_status as status, serving_status};

pub struct LibraryService {
    library: Arc<ExpertLibrary>,
    /// Registrations in progress: each holds its adapter in memory until it is stored.
    uploads: Option<(usize, Arc<tokio::sync::Semaphore>)>,
}

impl LibraryService {
    /// `max_uploads`: registrations (unary or streamed) at once; 0 for no bound.
    pub fn new(library: Arc<ExpertLibrary>, max_uploads: usize) -> Self {
        Self {
            library,
            uploads: (max_uploads > 0).then(|| {
                (
                    max_uploads,
                    Arc::new(tokio::sync::Semaphore::new(max_uploads)),
                )
            }),
        }
    }

    /// A place among the registrations in progress, refused at once when none is free.
    fn upload_permit(&self) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, Status> {
        let Some((max, uploads)) = &self.uploads else {
            return Ok(None);
        };
        uploads.clone().try_acquire_owned().map(Some).map_err(|_| {
            Status::resource_exhausted(format!(
                "uploads: {max} registrations in progress (--max-concurrent-uploads); retry later"
            ))
        })
    }
}

/// Runs blocking domain work (embedding, sled flushes) off the async workers.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("worker failed: {e}")))?
}

/// An expert named by a request: an empty id names none, and an id no expert could have
/// been registered under (over 128 characters, outside the id alphabet) names none either;
/// both are INVALID_ARGUMENT naming `id`, not NOT_FOUND.
fn named(id: &str) -> Result<(), Status> {
    if id.is_empty() {
        return Err(Status::invalid_argument("id: empty; name an expert"));
    }
    roe_serving::check_expert_id("id", id).map_err(serving_status)
}

impl LibraryService {
    async fn register(
        &self,
        new: NewExpert,
        new_version: bool,
    ) -> Result<proto::RegisterExpertResponse, Status> {
        let library = self.library.clone();
        let meta = blocking(move || library.register(new, new_version).map_err(status)).await?;
        Ok(proto::RegisterExpertResponse {
            expert: Some(expert_to_proto(&meta)),
        })
    }
}

#[tonic::async_trait]
impl Api for LibraryService {
    async fn register_expert(
        &self,
        request: Request<proto::RegisterExpertRequest>,
    ) -> Result<Response<proto::RegisterExpertResponse>, Status> {
        let _upload = self.upload_permit()?;
        let (new, new_version) = new_expert(request.into_inner())?;
        self.library
            .check_adapter_bytes(new.adapter.safetensors.len())
            .map_err(status)?;
        Ok(Response::new(self.register(new, new_version).await?))
    }

    async fn register_expert_stream(
        &self,
        request: Request<Streaming<proto::RegisterExpertChunk>>,
    ) -> Result<Response<proto::RegisterExpertResponse>, Status> {
        use proto::register_expert_chunk::Part;
        let _upload = self.upload_permit()?;
        let mut stream = request.into_inner();
        let first = stream.next().await.ok_or_else(|| {
            Status::invalid_argument("stream: empty; the first message must be the header")
        })??;
        let Some(Part::Header(mut header)) = first.part else {
            return Err(Status::invalid_argument(
                "stream: the first message must be the header",
            ));
        };
        // A file that arrives in chunks is only known whole by what the client announced: a
        // lost, repeated or reordered chunk would otherwise be stored unnoticed.
        let Some(announced) = header.safetensors_bytes else {
            return Err(Status::invalid_argument(
                "safetensors_bytes: missing; a streamed registration's header announces the \
                 weights' length (and safetensors_sha256 their digest)",
            ));
        };
        if header.safetensors_sha256.trim().is_empty() {
            return Err(Status::invalid_argument(
                "safetensors_sha256: missing; a streamed registration's header announces the \
                 weights' SHA-256 in hex, as sha256sum prints it",
            ));
        }
        let mut adapter = header.adapter.take().unwrap_or_default();
        let max_instances = self.library.limits().max_instances_per_request;
        // The announced length is checked against the limit before any weights arrive, and
        // reserved exactly: a growing buffer would hold two copies while it moves.
        let announced = usize::try_from(announced).unwrap_or(usize::MAX);
        let max = self.library.limits().max_adapter_bytes;
        if announced > max {
            return Err(Status::resource_exhausted(format!(
                "safetensors_bytes: {announced} announced, the limit max_adapter_bytes is {max}"
            )));
        }
        let more = announced.saturating_sub(adapter.adapter_model_safetensors.len());
        adapter.adapter_model_safetensors.reserve_exact(more);
        while let Some(chunk) = stream.next().await {
            match chunk?.part {
                Some(Part::SafetensorsChunk(bytes)) => {
                    let total = adapter.adapter_model_safetensors.len() + bytes.len();
                    self.library.check_adapter_bytes(total).map_err(status)?;
                    adapter.adapter_model_safetensors.extend_from_slice(&bytes);
                }
                Some(Part::Instance(i)) => {
                    if header.instances.len() >= max_instances {
                        return Err(Status::resource_exhausted(format!(
                            "instances: more than {max_instances} in one registration"
                        )));
                    }
                    header.instances.push(i);
                }
                Some(Part::Header(_)) => {
                    return Err(Status::invalid_argument("stream: a second header was sent"))
                }
                None => return Err(Status::invalid_argument("stream: a message without a part")),
            }
        }
        header.adapter = Some(adapter);
        let (new, new_version) = new_expert(header)?;
        Ok(Response::new(self.register(new, new_version).await?))
    }

    async fn get_expert(
        &self,
        request: Request<proto::GetExpertRequest>,
    ) -> Result<Response<proto::GetExpertResponse>, Status> {
        let req = request.into_inner();
        named(&req.id)?;
        let library = self.library.clone();
        blocking(move || {
            let meta = library.get(&req.id).map_err(status)?;
            let instances = if req.include_instances {
                library.instances(&req.id).map_err(status)?
            } else {
                Vec::new()
            };
            let adapter = if req.include_adapter {
                let a = library.adapter(&req.id).map_err(status)?;
                Some(proto::PeftAdapter {
                    adapter_config_json: a.config_json,
                    adapter_model_safetensors: a.safetensors,
                })
            } else {
                None
            };
            Ok(Response::new(proto::GetExpertResponse {
                expert: Some(expert_to_proto(&meta)),
                instances: instances.into_iter().map(instance_to_proto).collect(),
                adapter,
            }))
        })
        .await
    }

    async fn list_experts(
        &self,
        request: Request<proto::ListExpertsRequest>,
    ) -> Result<Response<proto::ListExpertsResponse>, Status> {
        let req = request.into_inner();
        // 0 means the default; the library checks the rest (1..=1000, as the proto says).
        let size = if req.page_size == 0 {
            100
        } else {
            req.page_size as usize
        };
        let library = self.library.clone();
        blocking(move || {
            let after = (!req.page_token.is_empty()).then_some(req.page_token.as_str());
            let (page, more) = library.list(after, size).map_err(status)?;
            let next_page_token = if more {
                page.last().map(|m| m.id.clone()).unwrap_or_default()
            } else {
                String::new()
            };
            Ok(Response::new(proto::ListExpertsResponse {
                experts: page.iter().map(expert_to_proto).collect(),
                next_page_token,
                total: library.len() as u64,
            }))
        })
        .await
    }

    async fn delete_expert(
        &self,
        request: Request<proto::DeleteExpertRequest>,
    ) -> Result<Response<proto::DeleteExpertResponse>, Status> {
        let id = request.into_inner().id;
        named(&id)?;
        let library = self.library.clone();
        let meta = blocking(move || library.delete(&id).map_err(status)).await?;
        Ok(Response::new(proto::DeleteExpertResponse {
            expert: Some(expert_to_proto(&meta)),
        }))
    }

    async fn merge_experts(
        &self,
        request: Request<proto::MergeExpertsRequest>,
    ) -> Result<Response<proto::MergeExpertsResponse>, Status> {
        let req = merge_request(request.into_inner())?;
        let library = self.library.clone();
        let meta = blocking(move || library.merge(req).map_err(status)).await?;
        Ok(Response::new(proto::MergeExpertsResponse {
            expert: Some(expert_to_proto(&meta)),
        }))
    }

    async fn add_instances(
        &self,
        request: Request<proto::AddInstancesRequest>,
    ) -> Result<Response<proto::AddInstancesResponse>, Status> {
        let req = request.into_inner();
        named(&req.id)?;
        let library = self.library.clone();
        let meta = blocking(move || {
            library
                .add_instances(
                    &req.id,
                    req.instances.into_iter().map(instance_from_proto).collect(),
                )
                .map_err(status)
        })
        .await?;
        Ok(Response::new(proto::AddInstancesResponse {
            expert: Some(expert_to_proto(&meta)),
        }))
    }
}
