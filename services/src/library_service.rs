//! `roe.v1.ExpertLibrary`: register, read, list, delete experts and add instances.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use roe_expert_library::library::{ExpertLibrary, NewExpert};
use roe_serving::metrics::{self, UploadRefusal};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::consistency::{self, Consistency};
use crate::convert::{
    expert_to_proto, instance_from_proto, instance_to_proto, merge_request, new_expert,
    write_options,
};
use crate::proto::{self, expert_library_server::ExpertLibrary as Api};
use crate::server::MAX_MESSAGE_BYTES;
use crate::status::{library_status as status, serving_status};

/// How long a registration waits for room by default (`--upload-queue-timeout-ms`).
pub const DEFAULT_UPLOAD_QUEUE_TIMEOUT: Duration = Duration::from_secs(10);

/// How registrations share the server's memory (`--max-upload-bytes-in-flight`,
/// `--upload-queue-timeout-ms`, `--max-concurrent-uploads`). The default bounds nothing.
#[derive(Debug, Clone)]
pub struct UploadLimits {
    /// Bytes that registrations in progress may hold at once (0: no bound): a unary one its
    /// encoded message, a streamed one its header and the weights it announced (or
    /// `max_adapter_bytes` unannounced) and then each instance it streams. At most 4 TiB.
    pub bytes_in_flight: u64,
    /// How long a registration waits for room in the budget (or for a place among the
    /// streamed ones) before RESOURCE_EXHAUSTED.
    pub queue_timeout: Duration,
    /// Streamed registrations at once (0: no bound). A stream holds its place for as long as
    /// its client takes to send; unary registrations are bounded by their bytes only, so a
    /// burst of small ones is never refused for their number.
    pub max_streams: usize,
}

impl Default for UploadLimits {
    fn default() -> Self {
        Self {
            bytes_in_flight: 0,
            queue_timeout: DEFAULT_UPLOAD_QUEUE_TIMEOUT,
            max_streams: 0,
        }
    }
}

/// The smallest byte budget that lets every registration the limits allow pass alone: the
/// largest unary message, or the largest weights file with 1 MiB for its header.
pub fn least_upload_budget(max_adapter_bytes: usize) -> u64 {
    (MAX_MESSAGE_BYTES as u64).max((max_adapter_bytes as u64).saturating_add(1 << 20))
}

/// What a unary registration takes of the budget: its encoded size, which is what the server
/// holds of it while it is checked and stored.
pub fn registration_bytes(req: &proto::RegisterExpertRequest) -> u64 {
    req.encoded_len() as u64
}

/// What a streamed registration takes of the budget once its header has arrived: the header
/// and the weights still to come, as announced in `safetensors_bytes` (a header without it
/// is refused before; counted as `max_adapter_bytes` should one get here). Each instance
/// streamed after the header adds its encoded size as it arrives.
pub fn streamed_registration_bytes(
    header: &proto::RegisterExpertRequest,
    max_adapter_bytes: usize,
) -> u64 {
    let inline = header
        .adapter
        .as_ref()
        .map_or(0, |a| a.adapter_model_safetensors.len() as u64);
    let weights = header.safetensors_bytes.unwrap_or(max_adapter_bytes as u64);
    (header.encoded_len() as u64).saturating_add(weights.saturating_sub(inline))
}

/// The budget counts KiB: tokio takes at most `u32::MAX` permits in one acquisition, and a
/// KiB unit lets one reach 4 TiB. A share rounds its bytes up, so units never undercount.
const UNIT: u64 = 1024;

/// The byte budget of `--max-upload-bytes-in-flight`.
struct Budget {
    bytes: u64,
    units: Arc<Semaphore>,
}

/// A registration's share of the byte budget, given back when it is dropped: the
/// registration was stored, refused, or its client went away.
#[derive(Default)]
struct Share {
    bytes: u64,
    permit: Option<OwnedSemaphorePermit>,
}

impl Share {
    fn units(&self) -> u64 {
        self.permit.as_ref().map_or(0, |p| p.num_permits() as u64)
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        if self.permit.is_some() {
            metrics::upload_bytes_released(self.bytes);
        }
    }
}

/// The bounds on registrations in progress.
struct Uploads {
    budget: Option<Budget>,
    /// Streamed registrations at once, and its bound.
    streams: Option<(usize, Arc<Semaphore>)>,
    wait: Duration,
}

impl Uploads {
    fn new(limits: &UploadLimits) -> Self {
        let budget = (limits.bytes_in_flight > 0).then(|| {
            let units = limits
                .bytes_in_flight
                .div_ceil(UNIT)
                .min(u32::MAX as u64)
                .min(Semaphore::MAX_PERMITS as u64);
            if units * UNIT < limits.bytes_in_flight {
                tracing::warn!(
                    asked = limits.bytes_in_flight,
                    kept = units * UNIT,
                    "--max-upload-bytes-in-flight: at most 4 TiB"
                );
            }
            Budget {
                bytes: limits.bytes_in_flight.min(units * UNIT),
                units: Arc::new(Semaphore::new(units as usize)),
            }
        });
        Self {
            budget,
            streams: (limits.max_streams > 0).then(|| {
                (
                    limits.max_streams,
                    Arc::new(Semaphore::new(limits.max_streams)),
                )
            }),
            wait: limits.queue_timeout,
        }
    }

    /// Grows `share` by `bytes` (from nothing, for a new registration): at once when the
    /// budget has room, else after waiting up to the queue timeout for registrations in
    /// progress to end; RESOURCE_EXHAUSTED when the wait runs out, or at once when the share
    /// would be larger than the whole budget (no wait could make room for it).
    async fn reserve(&self, share: &mut Share, bytes: u64) -> Result<(), Status> {
        let Some(budget) = &self.budget else {
            return Ok(());
        };
        let total = share.bytes.saturating_add(bytes);
        if total > budget.bytes {
            metrics::upload_refused(UploadRefusal::OverBudget);
            tracing::warn!(
                needs = total,
                budget = budget.bytes,
                "registration larger than the whole upload budget refused"
            );
            return Err(Status::resource_exhausted(format!(
                "uploads: this registration needs {total} bytes, more than the whole budget of \
                 uploads in flight, {} bytes (--max-upload-bytes-in-flight); nothing waits for \
                 room that cannot exist",
                budget.bytes
            )));
        }
        // total <= budget.bytes, so this fits in u32 (the budget's units do).
        let more = total.div_ceil(UNIT).saturating_sub(share.units()) as u32;
        if more > 0 {
            let permit = match budget.units.clone().try_acquire_many_owned(more) {
                Ok(permit) => permit,
                Err(TryAcquireError::NoPermits) => {
                    let started = Instant::now();
                    // Registrations are served in arrival order: a large one waiting is not
                    // overtaken by smaller ones. If the client goes away meanwhile, tonic
                    // drops this handler's future, and with it the wait and its place in
                    // the queue.
                    match tokio::time::timeout(
                        self.wait,
                        budget.units.clone().acquire_many_owned(more),
                    )
                    .await
                    {
                        Ok(Ok(permit)) => {
                            tracing::debug!(
                                bytes = total,
                                waited_ms = started.elapsed().as_millis() as u64,
                                "upload budget granted after a wait"
                            );
                            permit
                        }
                        Ok(Err(_)) => return Err(Status::internal("uploads: the budget closed")),
                        Err(_) => {
                            let waited = started.elapsed().as_millis();
                            let free = budget.units.available_permits() as u64 * UNIT;
                            metrics::upload_refused(UploadRefusal::BudgetTimeout);
                            tracing::warn!(
                                needs = total,
                                budget = budget.bytes,
                                waited_ms = waited as u64,
                                "no room in the upload budget; registration refused"
                            );
                            return Err(Status::resource_exhausted(format!(
                                "uploads: waited {waited} ms (--upload-queue-timeout-ms) for \
                                 {total} bytes of the budget of uploads in flight, {} bytes \
                                 (--max-upload-bytes-in-flight), about {free} of them free; \
                                 retry later",
                                budget.bytes
                            )));
                        }
                    }
                }
                // Never closed: the service owns the semaphore.
                Err(TryAcquireError::Closed) => {
                    return Err(Status::internal("uploads: the budget closed"))
                }
            };
            share.permit = Some(match share.permit.take() {
                Some(mut held) => {
                    held.merge(permit);
                    held
                }
                None => permit,
            });
        }
        // The gauge follows the bytes, not the units (a share rounds up to a KiB); a share
        // from an unbounded budget holds no permit and counts nothing.
        if share.permit.is_some() {
            metrics::upload_bytes_held(total - share.bytes);
            share.bytes = total;
        }
        Ok(())
    }

    /// A place among the streamed registrations, waiting up to the queue timeout for one.
    async fn stream_place(&self) -> Result<Option<OwnedSemaphorePermit>, Status> {
        let Some((max, streams)) = &self.streams else {
            return Ok(None);
        };
        let started = Instant::now();
        // As for the budget: a client that goes away ends the wait with the future.
        match tokio::time::timeout(self.wait, streams.clone().acquire_owned()).await {
            Ok(Ok(place)) => Ok(Some(place)),
            Ok(Err(_)) => Err(Status::internal("uploads: the streams' places closed")),
            Err(_) => {
                let waited = started.elapsed().as_millis();
                metrics::upload_refused(UploadRefusal::StreamsTimeout);
                tracing::warn!(
                    max,
                    waited_ms = waited as u64,
                    "no place for a streamed registration; refused"
                );
                Err(Status::resource_exhausted(format!(
                    "uploads: {max} streamed registrations in progress \
                     (--max-concurrent-uploads); waited {waited} ms \
                     (--upload-queue-timeout-ms); retry later"
                )))
            }
        }
    }
}

pub struct LibraryService {
    library: Arc<ExpertLibrary>,
    /// Registrations in progress: each holds its adapter in memory until it is stored.
    uploads: Uploads,
    /// How reads wait for their `min_library_seq`.
    consistency: Consistency,
}

impl LibraryService {
    pub fn new(library: Arc<ExpertLibrary>, uploads: &UploadLimits) -> Self {
        Self::with_min_seq_wait(library, uploads, consistency::DEFAULT_MIN_SEQ_WAIT)
    }

    /// [`Self::new`] whose reads wait at most `min_seq_wait` for their `min_library_seq`.
    pub fn with_min_seq_wait(
        library: Arc<ExpertLibrary>,
        uploads: &UploadLimits,
        min_seq_wait: Duration,
    ) -> Self {
        Self {
            consistency: Consistency::local(library.clone(), min_seq_wait),
            library,
            uploads: Uploads::new(uploads),
        }
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
        expected_version: Option<u64>,
    ) -> Result<proto::RegisterExpertResponse, Status> {
        let library = self.library.clone();
        let options = write_options(expected_version);
        let done = blocking(move || {
            library
                .register_with(new, new_version, None, options)
                .map_err(status)
        })
        .await?;
        Ok(proto::RegisterExpertResponse {
            expert: Some(expert_to_proto(&done.value)),
            library_seq: done.library_seq,
        })
    }
}

#[tonic::async_trait]
impl Api for LibraryService {
    async fn register_expert(
        &self,
        request: Request<proto::RegisterExpertRequest>,
    ) -> Result<Response<proto::RegisterExpertResponse>, Status> {
        let request = request.into_inner();
        // tonic has read the message whole by now (within the 64 MiB message limit and
        // --max-concurrent-requests); the budget bounds what checking and storing it holds,
        // so that a burst of small registrations queues instead of being refused.
        let bytes = registration_bytes(&request);
        let expected_version = request.expected_version;
        let (new, new_version) = new_expert(request)?;
        self.library
            .check_adapter_bytes(new.adapter.safetensors.len())
            .map_err(status)?;
        let mut share = Share::default();
        self.uploads.reserve(&mut share, bytes).await?;
        Ok(Response::new(
            self.register(new, new_version, expected_version).await?,
        ))
    }

    async fn register_expert_stream(
        &self,
        request: Request<Streaming<proto::RegisterExpertChunk>>,
    ) -> Result<Response<proto::RegisterExpertResponse>, Status> {
        use proto::register_expert_chunk::Part;
        let _place = self.uploads.stream_place().await?;
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
        let max_instances = self.library.limits().max_instances_per_request;
        let max_adapter_bytes = self.library.limits().max_adapter_bytes;
        // The announced length is checked against the limit before any weights arrive.
        let announced = usize::try_from(announced).unwrap_or(usize::MAX);
        if announced > max_adapter_bytes {
            return Err(Status::resource_exhausted(format!(
                "safetensors_bytes: {announced} announced, the limit max_adapter_bytes is \
                 {max_adapter_bytes}"
            )));
        }
        // The header and the weights to come take their share of the budget before any
        // chunk is read: the client's chunks wait in its flow-control window meanwhile.
        let mut share = Share::default();
        self.uploads
            .reserve(
                &mut share,
                streamed_registration_bytes(&header, max_adapter_bytes),
            )
            .await?;
        let mut adapter = header.adapter.take().unwrap_or_default();
        // Reserved exactly: a growing buffer would hold two copies while it moves.
        let more = announced.saturating_sub(adapter.adapter_model_safetensors.len());
        adapter.adapter_model_safetensors.reserve_exact(more);
        while let Some(chunk) = stream.next().await {
            match chunk?.part {
                Some(Part::SafetensorsChunk(bytes)) => {
                    let total = adapter.adapter_model_safetensors.len() + bytes.len();
                    // The share covers what was announced: more is refused as it arrives,
                    // not after it is held.
                    self.library.check_adapter_bytes(total).map_err(status)?;
                    if total > announced {
                        return Err(Status::invalid_argument(format!(
                            "safetensors_bytes: {announced} announced, {total} received so far"
                        )));
                    }
                    adapter.adapter_model_safetensors.extend_from_slice(&bytes);
                }
                Some(Part::Instance(i)) => {
                    if header.instances.len() >= max_instances {
                        return Err(Status::resource_exhausted(format!(
                            "instances: more than {max_instances} in one registration"
                        )));
                    }
                    // Instances were not announced: each takes its share as it arrives.
                    self.uploads
                        .reserve(&mut share, i.encoded_len() as u64)
                        .await?;
                    header.instances.push(i);
                }
                Some(Part::Header(_)) => {
                    return Err(Status::invalid_argument("stream: a second header was sent"))
                }
                None => return Err(Status::invalid_argument("stream: a message without a part")),
            }
        }
        header.adapter = Some(adapter);
        let expected_version = header.expected_version;
        let (new, new_version) = new_expert(header)?;
        Ok(Response::new(
            self.register(new, new_version, expected_version).await?,
        ))
    }

    async fn get_expert(
        &self,
        request: Request<proto::GetExpertRequest>,
    ) -> Result<Response<proto::GetExpertResponse>, Status> {
        let deadline = consistency::deadline(request.metadata());
        let req = request.into_inner();
        named(&req.id)?;
        self.consistency.wait(req.min_library_seq, deadline).await?;
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
        let deadline = consistency::deadline(request.metadata());
        let req = request.into_inner();
        self.consistency.wait(req.min_library_seq, deadline).await?;
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
        let req = request.into_inner();
        named(&req.id)?;
        let library = self.library.clone();
        let options = write_options(req.expected_version);
        let done = blocking(move || library.delete_with(&req.id, options).map_err(status)).await?;
        Ok(Response::new(proto::DeleteExpertResponse {
            expert: Some(expert_to_proto(&done.value)),
            library_seq: done.library_seq,
        }))
    }

    async fn merge_experts(
        &self,
        request: Request<proto::MergeExpertsRequest>,
    ) -> Result<Response<proto::MergeExpertsResponse>, Status> {
        let request = request.into_inner();
        let options = write_options(request.expected_version);
        let req = merge_request(request)?;
        let library = self.library.clone();
        let done = blocking(move || library.merge_with(req, options).map_err(status)).await?;
        Ok(Response::new(proto::MergeExpertsResponse {
            expert: Some(expert_to_proto(&done.value)),
            library_seq: done.library_seq,
        }))
    }

    async fn add_instances(
        &self,
        request: Request<proto::AddInstancesRequest>,
    ) -> Result<Response<proto::AddInstancesResponse>, Status> {
        let req = request.into_inner();
        named(&req.id)?;
        let library = self.library.clone();
        let options = write_options(req.expected_version);
        let done = blocking(move || {
            library
                .add_instances_with(
                    &req.id,
                    req.instances.into_iter().map(instance_from_proto).collect(),
                    options,
                )
                .map_err(status)
        })
        .await?;
        Ok(Response::new(proto::AddInstancesResponse {
            expert: Some(expert_to_proto(&done.value)),
            library_seq: done.library_seq,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uploads(bytes: u64, wait_ms: u64) -> Uploads {
        Uploads::new(&UploadLimits {
            bytes_in_flight: bytes,
            queue_timeout: Duration::from_millis(wait_ms),
            max_streams: 0,
        })
    }

    #[tokio::test]
    async fn a_share_without_room_waits_then_is_refused() {
        let u = uploads(10 * 1024, 100);
        let mut a = Share::default();
        u.reserve(&mut a, 6 * 1024).await.unwrap();
        let started = Instant::now();
        let e = u
            .reserve(&mut Share::default(), 5 * 1024)
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(started.elapsed() >= Duration::from_millis(100));
        assert!(e.message().starts_with("uploads: waited"), "{e:?}");
        assert!(e.message().contains("for 5120 bytes"), "{e:?}");
        assert!(e.message().contains("10240 bytes"), "{e:?}");
        // A share grows by what it is given, rounded to whole units once.
        u.reserve(&mut a, 100).await.unwrap();
        assert_eq!((a.bytes, a.units()), (6 * 1024 + 100, 7));
        // Dropped, it gives everything back.
        drop(a);
        u.reserve(&mut Share::default(), 10 * 1024).await.unwrap();
    }

    #[tokio::test]
    async fn a_share_larger_than_the_budget_is_refused_without_waiting() {
        let u = uploads(10 * 1024, 60_000);
        let started = Instant::now();
        let e = u
            .reserve(&mut Share::default(), 10 * 1024 + 1)
            .await
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().contains("more than the whole budget"), "{e:?}");
        // What a share already holds counts.
        let mut s = Share::default();
        u.reserve(&mut s, 8 * 1024).await.unwrap();
        let e = u.reserve(&mut s, 3 * 1024).await.unwrap_err();
        assert!(e.message().contains("needs 11264 bytes"), "{e:?}");
    }

    #[tokio::test]
    async fn a_waiting_share_gets_the_room_given_back() {
        let u = Arc::new(uploads(10 * 1024, 5_000));
        let mut a = Share::default();
        u.reserve(&mut a, 8 * 1024).await.unwrap();
        let waiter = {
            let u = u.clone();
            tokio::spawn(async move {
                let mut b = Share::default();
                u.reserve(&mut b, 8 * 1024).await?;
                Ok::<_, Status>(b.bytes)
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        drop(a);
        assert_eq!(waiter.await.unwrap().unwrap(), 8 * 1024);
    }

    #[test]
    fn no_budget_bounds_nothing() {
        let u = uploads(0, 0);
        assert!(u.budget.is_none());
        assert!(least_upload_budget(60 << 20) >= MAX_MESSAGE_BYTES as u64);
        assert_eq!(least_upload_budget(100 << 20), (101 << 20) as u64);
    }
}
