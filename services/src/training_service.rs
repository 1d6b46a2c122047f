//! `roe.v1.Training`: start, watch, list and cancel training jobs.

use std::pin::Pin;
use std::sync::Arc;

use roe_trainer::data::MAX_ROWS;
use roe_trainer::TrainingJobs;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::convert::{training_job_from_proto, training_job_to_proto};
use crate::library_service::blocking;
use crate::proto::{self, training_server::Training as Api};
use crate::status::training_status as status;

pub struct TrainingService {
    jobs: Arc<TrainingJobs>,
}

impl TrainingService {
    pub fn new(jobs: Arc<TrainingJobs>) -> Self {
        Self { jobs }
    }

    async fn submit(
        &self,
        req: proto::StartTrainingRequest,
    ) -> Result<Response<proto::StartTrainingResponse>, Status> {
        let (spec, rows) = training_job_from_proto(req)?;
        let jobs = self.jobs.clone();
        // Writing the rows durably is file work: off the async workers.
        let job = blocking(move || jobs.submit(spec, rows).map_err(status)).await?;
        Ok(Response::new(proto::StartTrainingResponse {
            job: Some(training_job_to_proto(&job)),
        }))
    }
}

type JobStream = Pin<Box<dyn Stream<Item = Result<proto::TrainingJob, Status>> + Send>>;

/// A job named by a request: an empty id names none (INVALID_ARGUMENT, not NOT_FOUND).
fn job_id(id: &str) -> Result<&str, Status> {
    if id.is_empty() {
        return Err(Status::invalid_argument(
            "job_id: empty; name a training job",
        ));
    }
    Ok(id)
}

#[tonic::async_trait]
impl Api for TrainingService {
    async fn start_training(
        &self,
        req: Request<proto::StartTrainingRequest>,
    ) -> Result<Response<proto::StartTrainingResponse>, Status> {
        self.submit(req.into_inner()).await
    }

    async fn start_training_stream(
        &self,
        req: Request<Streaming<proto::StartTrainingChunk>>,
    ) -> Result<Response<proto::StartTrainingResponse>, Status> {
        use proto::start_training_chunk::Part;
        let mut stream = req.into_inner();
        let first = stream.next().await.ok_or_else(|| {
            Status::invalid_argument("stream: empty; the first message must be the header")
        })??;
        let Some(Part::Header(mut header)) = first.part else {
            return Err(Status::invalid_argument(
                "stream: the first message must be the header",
            ));
        };
        while let Some(chunk) = stream.next().await {
            match chunk?.part {
                Some(Part::Row(row)) => {
                    // Refused as the limit is passed, before the rest of the stream is read.
                    if header.rows.len() >= MAX_ROWS {
                        return Err(Status::resource_exhausted(format!(
                            "rows: more than {MAX_ROWS} in one job"
                        )));
                    }
                    header.rows.push(row);
                }
                Some(Part::Header(_)) => {
                    return Err(Status::invalid_argument("stream: a second header was sent"))
                }
                None => return Err(Status::invalid_argument("stream: a message without a part")),
            }
        }
        self.submit(header).await
    }

    async fn get_training_job(
        &self,
        req: Request<proto::GetTrainingJobRequest>,
    ) -> Result<Response<proto::GetTrainingJobResponse>, Status> {
        let job = self
            .jobs
            .get(job_id(&req.into_inner().job_id)?)
            .map_err(status)?;
        Ok(Response::new(proto::GetTrainingJobResponse {
            job: Some(training_job_to_proto(&job)),
        }))
    }

    type WatchTrainingStream = JobStream;

    async fn watch_training(
        &self,
        req: Request<proto::WatchTrainingRequest>,
    ) -> Result<Response<Self::WatchTrainingStream>, Status> {
        let mut rx = self
            .jobs
            .watch(job_id(&req.into_inner().job_id)?)
            .map_err(status)?;
        let stream = async_stream(move |tx| async move {
            loop {
                let job = rx.borrow_and_update().clone();
                let done = job.state.is_finished();
                if tx.send(Ok(training_job_to_proto(&job))).await.is_err() || done {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn list_training_jobs(
        &self,
        _req: Request<proto::ListTrainingJobsRequest>,
    ) -> Result<Response<proto::ListTrainingJobsResponse>, Status> {
        Ok(Response::new(proto::ListTrainingJobsResponse {
            jobs: self.jobs.list().iter().map(training_job_to_proto).collect(),
        }))
    }

    async fn cancel_training(
        &self,
        req: Request<proto::CancelTrainingRequest>,
    ) -> Result<Response<proto::CancelTrainingResponse>, Status> {
        let job = self
            .jobs
            .cancel(job_id(&req.into_inner().job_id)?)
            .map_err(status)?;
        Ok(Response::new(proto::CancelTrainingResponse {
            job: Some(training_job_to_proto(&job)),
        }))
    }
}

/// A stream fed by a task: it ends when the task returns, and the task sees the client go
/// (its sends fail) and stops.
fn async_stream<F, Fut>(f: F) -> JobStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<proto::TrainingJob, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
