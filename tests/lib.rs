//! Shared fixtures for the end-to-end tests: the real encoder (loaded once), bundled tasks and
//! PEFT experts, and a real gRPC server on 127.0.0.1 over a sled library in a temp dir.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use roe_encoder::{BatchingEncoder, BertEncoder, Encoder, DEFAULT_ENCODER_DIR};
use roe_expert_library::library::{ExpertLibrary, LibraryConfig};
use roe_services::library_service::{UploadLimits, DEFAULT_UPLOAD_QUEUE_TIMEOUT};
use roe_services::proto::{
    self, answerer_client::AnswererClient, expert_library_client::ExpertLibraryClient,
    inference_client::InferenceClient, router_client::RouterClient,
    training_client::TrainingClient,
};
use roe_services::server::{serve, ServeOptions};
use roe_serving::{BackboneInference, ServingConfig};
use roe_task_suite::{sample, Task};
use tonic::transport::Channel;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn models_dir() -> PathBuf {
    std::env::var_os("ROE_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("models"))
}

pub fn encoder() -> Arc<dyn Encoder> {
    static ENCODER: OnceLock<Arc<dyn Encoder>> = OnceLock::new();
    ENCODER
        .get_or_init(|| {
            // As the server runs it: one worker batching concurrent requests.
            let bert: Arc<dyn Encoder> = Arc::new(
                BertEncoder::load(models_dir().join(DEFAULT_ENCODER_DIR), 256)
                    .expect("encoder (run scripts/fetch-models.sh)"),
            );
            Arc::new(BatchingEncoder::new(bert, 256))
        })
        .clone()
}

/// The backbone GGUF file (ROE_BACKBONE or `<models>/SmolLM2-135M-Instruct/...Q4_1.gguf`).
pub fn backbone_path() -> PathBuf {
    std::env::var_os("ROE_BACKBONE")
        .map(PathBuf::from)
        .unwrap_or_else(|| roe_cli::models::backbone_path(&models_dir()))
}

/// The real backbone, loaded once per test binary.
pub fn backbone() -> Arc<roe_backbone::Backbone> {
    static BACKBONE: OnceLock<Arc<roe_backbone::Backbone>> = OnceLock::new();
    BACKBONE
        .get_or_init(|| {
            Arc::new(
                roe_backbone::Backbone::load(backbone_path(), None)
                    .expect("backbone (run scripts/fetch-models.sh)"),
            )
        })
        .clone()
}

pub fn task(name: &str) -> Task {
    let dev = repo().join("assets/tasks").join(name);
    let dir = if dev.is_dir() {
        dev
    } else {
        repo().join("assets/tasks-routing").join(name)
    };
    Task::load(dir).expect("bundled task")
}

pub fn peft_dir(kind: &str, task: &str) -> PathBuf {
    repo()
        .join("assets/experts/smollm2-135m")
        .join(kind)
        .join(task)
}

pub fn peft(kind: &str, task: &str) -> proto::PeftAdapter {
    let dir = peft_dir(kind, task);
    proto::PeftAdapter {
        adapter_config_json: std::fs::read_to_string(dir.join("adapter_config.json")).unwrap(),
        adapter_model_safetensors: std::fs::read(dir.join("adapter_model.safetensors")).unwrap(),
    }
}

pub fn instances(task: &Task, n: usize, seed: u64) -> Vec<proto::Instance> {
    sample(&task.train, n, seed)
        .into_iter()
        .map(|i| proto::Instance {
            input: i.input,
            target: i.target,
            choices: i.choices,
        })
        .collect()
}

pub fn queries(task: &Task, n: usize, seed: u64) -> Vec<proto::Query> {
    sample(&task.test, n, seed)
        .into_iter()
        .map(|i| proto::Query {
            input: i.input,
            choices: i.choices,
            target: None,
        })
        .collect()
}

pub fn register_request(
    id: &str,
    kind: &str,
    task_name: &str,
    s: usize,
) -> proto::RegisterExpertRequest {
    let t = task(task_name);
    proto::RegisterExpertRequest {
        id: id.to_string(),
        name: id.to_string(),
        description: t.info.description.clone(),
        backbone: String::new(),
        adapter: Some(peft(kind, task_name)),
        instances: instances(&t, s, 0),
        new_version: false,
        safetensors_bytes: None,
        safetensors_sha256: String::new(),
        expected_version: None,
    }
}

/// `req` as a streamed registration's header carries it: the weights' length and SHA-256 (hex)
/// announced, which RegisterExpertStream requires. Announced from the weights in `req`, so
/// clear them afterwards to send them as chunks.
pub fn announced(mut req: proto::RegisterExpertRequest) -> proto::RegisterExpertRequest {
    use sha2::Digest;
    let weights: &[u8] = req
        .adapter
        .as_ref()
        .map(|a| a.adapter_model_safetensors.as_slice())
        .unwrap_or_default();
    let (bytes, sha256) = (
        weights.len() as u64,
        format!("{:x}", sha2::Sha256::digest(weights)),
    );
    req.safetensors_bytes = Some(bytes);
    req.safetensors_sha256 = sha256;
    req
}

/// What a test server may add to the defaults of [`ServeOptions`].
#[derive(Default)]
pub struct ServerExtras {
    pub auth: roe_services::auth::AuthLayer,
    pub concurrency: roe_services::load_shed::ConcurrencyLimitLayer,
    /// `--max-concurrent-uploads`: streamed registrations at once (0: no bound).
    pub max_uploads: usize,
    /// `--max-upload-bytes-in-flight` (0: no bound).
    pub upload_budget_bytes: u64,
    /// `--upload-queue-timeout-ms` (None: the server's default).
    pub upload_queue_timeout: Option<std::time::Duration>,
    /// Serve over TLS (the URL is then https://127.0.0.1:port; its certificate names
    /// `localhost`).
    pub tls: Option<tonic::transport::ServerTlsConfig>,
}

/// A real roe server on an ephemeral loopback port; stops when dropped.
pub struct TestServer {
    pub url: String,
    /// The Inference service, when started with it.
    pub inference: Option<Arc<BackboneInference>>,
    pub dir: PathBuf,
    /// Not an owner: stopping the server must release the library.
    library: std::sync::Weak<ExpertLibrary>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<()>>,
    _tmp: Option<tempfile::TempDir>,
}

impl TestServer {
    pub async fn start() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("library");
        let mut s = Self::start_in(dir).await;
        s._tmp = Some(tmp);
        s
    }

    pub async fn start_in(dir: PathBuf) -> Self {
        Self::start_in_with(dir, LibraryConfig::default(), false).await
    }

    /// A server that also runs the Inference service over the real backbone.
    pub async fn start_with_inference() -> Self {
        Self::start_with_inference_config(LibraryConfig::default()).await
    }

    /// [`Self::start_with_inference`] over a library with `config`.
    pub async fn start_with_inference_config(config: LibraryConfig) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("library");
        let mut s = Self::start_in_with(dir, config, true).await;
        s._tmp = Some(tmp);
        s
    }

    /// [`Self::start_with_inference`] whose Answerer falls back to `fallback_expert` when
    /// routing abstains (unchecked here, so the test may register it after the start).
    pub async fn start_with_fallback(fallback_expert: &str) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("library");
        let mut s = Self::start_full(
            dir,
            LibraryConfig::default(),
            true,
            fallback_expert.into(),
            Default::default(),
        )
        .await;
        s._tmp = Some(tmp);
        s
    }

    /// A server over a library with `config` (and the backbone when `with_inference`).
    pub async fn start_with(
        config: LibraryConfig,
        with_inference: bool,
        extras: ServerExtras,
    ) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("library");
        let mut s = Self::start_full(dir, config, with_inference, String::new(), extras).await;
        s._tmp = Some(tmp);
        s
    }

    /// [`Self::start_with_inference`] checking API keys with `auth`.
    pub async fn start_with_auth(auth: roe_services::auth::AuthLayer) -> Self {
        Self::start_with_layers(true, auth, Default::default()).await
    }

    /// A server (with inference or not) behind the given key check and concurrency bound.
    pub async fn start_with_layers(
        with_inference: bool,
        auth: roe_services::auth::AuthLayer,
        concurrency: roe_services::load_shed::ConcurrencyLimitLayer,
    ) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("library");
        let mut s = Self::start_full(
            dir,
            LibraryConfig::default(),
            with_inference,
            String::new(),
            ServerExtras {
                auth,
                concurrency,
                ..Default::default()
            },
        )
        .await;
        s._tmp = Some(tmp);
        s
    }

    async fn start_in_with(dir: PathBuf, config: LibraryConfig, with_inference: bool) -> Self {
        Self::start_full(
            dir,
            config,
            with_inference,
            String::new(),
            Default::default(),
        )
        .await
    }

    async fn start_full(
        dir: PathBuf,
        config: LibraryConfig,
        with_inference: bool,
        fallback_expert: String,
        extras: ServerExtras,
    ) -> Self {
        let (library, _) = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || ExpertLibrary::open(&dir, encoder(), config))
                .await
                .unwrap()
                .expect("library opens")
        };
        let library = Arc::new(library);
        let inference = if with_inference {
            let bb = tokio::task::spawn_blocking(backbone).await.unwrap();
            Some(Arc::new(BackboneInference::over_library(
                bb,
                library.clone(),
                ServingConfig::default(),
            )))
        } else {
            None
        };
        // With the backbone comes the training queue, beside the library's folder.
        let training = if with_inference {
            let jobs_dir = dir.with_file_name("training");
            let library = library.clone();
            let jobs = tokio::task::spawn_blocking(move || {
                roe_trainer::TrainingJobs::open(
                    jobs_dir,
                    backbone(),
                    "HuggingFaceTB/SmolLM2-135M-Instruct",
                    library,
                    roe_trainer::JobsConfig::default(),
                )
            })
            .await
            .unwrap()
            .expect("training jobs open");
            Some(Arc::new(jobs))
        } else {
            None
        };
        let weak_library = Arc::downgrade(&library);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let scheme = if extras.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let url = format!("{scheme}://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let inference_handle = inference.clone();
        let handle = tokio::spawn(async move {
            serve(
                listener,
                library,
                ServeOptions {
                    inference,
                    fallback_expert,
                    training,
                    auth: extras.auth,
                    concurrency: extras.concurrency,
                    uploads: UploadLimits {
                        bytes_in_flight: extras.upload_budget_bytes,
                        queue_timeout: extras
                            .upload_queue_timeout
                            .unwrap_or(DEFAULT_UPLOAD_QUEUE_TIMEOUT),
                        max_streams: extras.max_uploads,
                    },
                    tls: extras.tls,
                    ..ServeOptions::default()
                },
                async {
                    let _ = rx.await;
                },
            )
            .await
            .expect("server runs");
        });
        Self {
            url,
            inference: inference_handle,
            dir,
            library: weak_library,
            stop: Some(tx),
            handle: Some(handle),
            _tmp: None,
        }
    }

    /// Bytes the library holds by its quota's count.
    pub fn stored_bytes(&self) -> u64 {
        self.library
            .upgrade()
            .expect("the server is running")
            .stored_bytes()
    }

    pub async fn library(&self) -> ExpertLibraryClient<Channel> {
        ExpertLibraryClient::connect(self.url.clone())
            .await
            .unwrap()
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    pub async fn inference(&self) -> InferenceClient<Channel> {
        InferenceClient::connect(self.url.clone()).await.unwrap()
    }

    pub async fn router(&self) -> RouterClient<Channel> {
        RouterClient::connect(self.url.clone()).await.unwrap()
    }

    pub async fn answerer(&self) -> AnswererClient<Channel> {
        AnswererClient::connect(self.url.clone()).await.unwrap()
    }

    pub async fn training(&self) -> TrainingClient<Channel> {
        TrainingClient::connect(self.url.clone())
            .await
            .unwrap()
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    /// Stops the server and waits until the library (and its sled lock) is released.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            let _ = h.await;
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}
