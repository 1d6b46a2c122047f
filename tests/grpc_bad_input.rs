//! Bad input over every RPC of `roe.v1`, table-driven, against one real server (library,
//! router, inference over the real backbone, answerer and training). Each case must be refused
//! with its code and a status message that starts with the field it names, at most ~1 KiB
//! long. After each case the server must still answer, and nothing stored may have changed:
//! the experts (ids, versions, instance counts, weight digests), one expert's instances, and
//! the training jobs (none). Every failing case is collected and reported at the end, so one
//! run shows them all.
//!
//! No case may reach the backbone or the trainer. A request that only one check should refuse
//! is built on a base that a later check refuses anyway: Score, ScoreEnsemble and Generate
//! name an unknown expert (NOT_FOUND after the input checks), Answer asks for `top_k` past its
//! limit (refused while routing, before any scoring), StartTraining trains an expert that
//! exists (FAILED_PRECONDITION after every other check). A check that lets its input through
//! then shows up as a wrong status, not as work done.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use proto::register_expert_chunk::Part as RegPart;
use proto::start_training_chunk::Part as TrainPart;
use roe_services::proto::{
    self, answerer_client::AnswererClient, expert_library_client::ExpertLibraryClient,
    inference_client::InferenceClient, router_client::RouterClient,
    training_client::TrainingClient,
};
use roe_tests::{instances, peft, queries, register_request, task, TestServer};
use sha2::Digest;
use tokio_stream::Stream;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// roe-expert-library writes its INVALID_ARGUMENT messages as `invalid <field>: …`
/// (`LibraryError::InvalidArgument`'s Display), every other layer as `<field>: …`. Cases
/// refused by the library expect that form through [`lib`]; set this to "" once the library
/// writes `<field>: …` like the rest.
const LIBRARY_INVALID: &str = "invalid ";

/// Longest status message accepted: the server cuts messages at 1024 bytes and marks the cut.
const MAX_STATUS_BYTES: usize = 1100;

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

/// The start of an INVALID_ARGUMENT message from the library naming `field`.
fn lib(field: &str) -> String {
    format!("{LIBRARY_INVALID}{field}")
}

type Call = Pin<Box<dyn Future<Output = Result<(), Status>> + Send>>;

/// One bad request: the call that must fail, with the code and message start it must fail with.
struct Case {
    name: String,
    code: Code,
    field: String,
    call: Call,
}

#[derive(Clone)]
struct Clients {
    lib: ExpertLibraryClient<Channel>,
    router: RouterClient<Channel>,
    inference: InferenceClient<Channel>,
    answerer: AnswererClient<Channel>,
    training: TrainingClient<Channel>,
}

fn done<T>(r: Result<T, Status>) -> Result<(), Status> {
    r.map(|_| ())
}

/// `base` with one change.
fn with<T: Clone>(base: &T, change: impl FnOnce(&mut T)) -> T {
    let mut t = base.clone();
    change(&mut t);
    t
}

fn strings(n: usize, prefix: &str) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

fn reg_chunk(part: RegPart) -> proto::RegisterExpertChunk {
    proto::RegisterExpertChunk { part: Some(part) }
}

fn train_chunk(part: TrainPart) -> proto::StartTrainingChunk {
    proto::StartTrainingChunk { part: Some(part) }
}

/// A streamed registration: the header, the weight chunks, then the instances.
fn reg_stream(
    header: &proto::RegisterExpertRequest,
    weights: &[Vec<u8>],
    rows: &[proto::Instance],
) -> Vec<proto::RegisterExpertChunk> {
    std::iter::once(reg_chunk(RegPart::Header(header.clone())))
        .chain(
            weights
                .iter()
                .map(|w| reg_chunk(RegPart::SafetensorsChunk(w.clone()))),
        )
        .chain(rows.iter().map(|i| reg_chunk(RegPart::Instance(i.clone()))))
        .collect()
}

fn train_stream(req: &proto::StartTrainingRequest) -> Vec<proto::StartTrainingChunk> {
    roe_services::convert::start_training_chunks(req.clone()).collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A prompt-tuning weights file: `rows` x `cols` F32 values, all `value`.
fn prompt_weights(rows: usize, cols: usize, value: f32) -> Vec<u8> {
    let data: Vec<u8> = std::iter::repeat_n(value.to_le_bytes(), rows * cols)
        .flatten()
        .collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![rows, cols], &data)
            .unwrap();
    safetensors::serialize([("prompt_embeddings", view)], None).unwrap()
}

/// `json` (an adapter config) with `key` set to `value`.
fn config_with(json: &str, key: &str, value: serde_json::Value) -> String {
    let mut v: serde_json::Value = serde_json::from_str(json).unwrap();
    v[key] = value;
    v.to_string()
}

fn instance(input: &str, target: Option<&str>, choices: &[&str]) -> proto::Instance {
    proto::Instance {
        input: input.into(),
        target: target.map(str::to_string),
        choices: choices.iter().map(|c| c.to_string()).collect(),
    }
}

fn query(input: &str, choices: &[&str]) -> proto::Query {
    proto::Query {
        input: input.into(),
        choices: choices.iter().map(|c| c.to_string()).collect(),
        target: None,
    }
}

fn answer_input(input: &str, choices: &[&str]) -> proto::AnswerInput {
    proto::AnswerInput {
        input: input.into(),
        choices: choices.iter().map(|c| c.to_string()).collect(),
    }
}

/// The table, and how each kind of call is made.
struct Suite {
    c: Clients,
    cases: Vec<Case>,
}

impl Suite {
    fn push(
        &mut self,
        name: &str,
        code: Code,
        field: impl Into<String>,
        call: impl Future<Output = Result<(), Status>> + Send + 'static,
    ) {
        self.cases.push(Case {
            name: name.to_string(),
            code,
            field: field.into(),
            call: Box::pin(call),
        });
    }

    fn register(
        &mut self,
        name: &str,
        code: Code,
        field: impl Into<String>,
        req: proto::RegisterExpertRequest,
    ) {
        let mut c = self.c.lib.clone();
        let name = format!("RegisterExpert: {name}");
        self.push(&name, code, field, async move {
            done(c.register_expert(req).await)
        });
    }

    fn register_stream<S>(&mut self, name: &str, code: Code, field: impl Into<String>, messages: S)
    where
        S: Stream<Item = proto::RegisterExpertChunk> + Send + 'static,
    {
        let mut c = self.c.lib.clone();
        let name = format!("RegisterExpertStream: {name}");
        self.push(&name, code, field, async move {
            done(c.register_expert_stream(messages).await)
        });
    }

    fn get(
        &mut self,
        name: &str,
        code: Code,
        field: impl Into<String>,
        req: proto::GetExpertRequest,
    ) {
        let mut c = self.c.lib.clone();
        let name = format!("GetExpert: {name}");
        self.push(
            &name,
            code,
            field,
            async move { done(c.get_expert(req).await) },
        );
    }

    fn list(
        &mut self,
        name: &str,
        code: Code,
        field: impl Into<String>,
        req: proto::ListExpertsRequest,
    ) {
        let mut c = self.c.lib.clone();
        let name = format!("ListExperts: {name}");
        self.push(&name, code, field, async move {
            done(c.list_experts(req).await)
        });
    }

    fn delete(&mut self, name: &str, code: Code, field: impl Into<String>, id: String) {
        let mut c = self.c.lib.clone();
        let name = format!("DeleteExpert: {name}");
        self.push(&name, code, field, async move {
            done(
                c.delete_expert(proto::DeleteExpertRequest {
                    id,
                    expected_version: None,
                })
                .await,
            )
        });
    }

    fn add(
        &mut self,
        name: &str,
        code: Code,
        field: impl Into<String>,
        req: proto::AddInstancesRequest,
    ) {
        let mut c = self.c.lib.clone();
        let name = format!("AddInstances: {name}");
        self.push(&name, code, field, async move {
            done(c.add_instances(req).await)
        });
    }

    fn merge(
        &mut self,
        name: &str,
        code: Code,
        field: impl Into<String>,
        req: proto::MergeExpertsRequest,
    ) {
        let mut c = self.c.lib.clone();
        let name = format!("MergeExperts: {name}");
        self.push(&name, code, field, async move {
            done(c.merge_experts(req).await)
        });
    }

    fn route(
        &mut self,
        name: &str,
        code: Code,
        field: impl Into<String>,
        req: proto::RouteRequest,
    ) {
        let mut c = self.c.router.clone();
        let name = format!("Route: {name}");
        self.push(&name, code, field, async move { done(c.route(req).await) });
    }

    fn score(
        &mut self,
        name: &str,
        code: Code,
        field: impl Into<String>,
        req: proto::ScoreRequest,
    ) {
        let mut c = self.c.inference.clone();
        let name = format!("Score: {name}");
        self.push(&name, code, field, async move { done(c.score(req).await) });
    }

    fn ensemble(
        &mut self,
        name: &str,
        code: Code,
        field: impl Into<String>,
        req: proto::ScoreEnsembleRequest,
    ) {
        let mut c = self.c.inference.clone();
        let name = format!("ScoreEnsemble: {name}");
        self.push(&name, code, field, async move {
            done(c.score_ensemble(req).await)
        });
    }

    /// A refusal may come as the call's status or as the stream's first item.
    fn generate(
        &mut self,
        name: &str,
        code: Code,
        field: impl Into<String>,
        req: proto::GenerateRequest,
    ) {
        let mut c = self.c.inference.clone();
        let name = format!("Generate: {name}");
        self.push(&name, code, field, async move {
            let mut tokens = c.generate(req).await?.into_inner();
            done(tokens.message().await)
        });
    }

    fn answer(
        &mut self,
        name: &str,
        code: Code,
        field: impl Into<String>,
        req: proto::AnswerRequest,
    ) {
        let mut c = self.c.answerer.clone();
        let name = format!("Answer: {name}");
        self.push(&name, code, field, async move { done(c.answer(req).await) });
    }

    fn start(
        &mut self,
        name: &str,
        code: Code,
        field: impl Into<String>,
        req: proto::StartTrainingRequest,
    ) {
        let mut c = self.c.training.clone();
        let name = format!("StartTraining: {name}");
        self.push(&name, code, field, async move {
            done(c.start_training(req).await)
        });
    }

    fn start_stream<S>(&mut self, name: &str, code: Code, field: impl Into<String>, messages: S)
    where
        S: Stream<Item = proto::StartTrainingChunk> + Send + 'static,
    {
        let mut c = self.c.training.clone();
        let name = format!("StartTrainingStream: {name}");
        self.push(&name, code, field, async move {
            done(c.start_training_stream(messages).await)
        });
    }

    fn get_job(&mut self, name: &str, code: Code, field: impl Into<String>, job_id: String) {
        let mut c = self.c.training.clone();
        let name = format!("GetTrainingJob: {name}");
        self.push(&name, code, field, async move {
            done(
                c.get_training_job(proto::GetTrainingJobRequest { job_id })
                    .await,
            )
        });
    }

    fn cancel_job(&mut self, name: &str, code: Code, field: impl Into<String>, job_id: String) {
        let mut c = self.c.training.clone();
        let name = format!("CancelTraining: {name}");
        self.push(&name, code, field, async move {
            done(
                c.cancel_training(proto::CancelTrainingRequest { job_id })
                    .await,
            )
        });
    }

    /// A refusal may come as the call's status or as the stream's first item.
    fn watch_job(&mut self, name: &str, code: Code, field: impl Into<String>, job_id: String) {
        let mut c = self.c.training.clone();
        let name = format!("WatchTraining: {name}");
        self.push(&name, code, field, async move {
            let mut jobs = c
                .watch_training(proto::WatchTrainingRequest { job_id })
                .await?
                .into_inner();
            done(jobs.message().await)
        });
    }
}

/// What must not change: every expert (id, version, instances, weights digest), one expert
/// with its instances, and the training jobs.
#[derive(Debug, Clone, PartialEq)]
struct Snapshot {
    experts: Vec<(String, u64, u64, String)>,
    total: u64,
    spam: proto::GetExpertResponse,
    jobs: Vec<(String, i32)>,
}

impl Snapshot {
    fn ids(&self) -> Vec<(&str, u64, u64)> {
        self.experts
            .iter()
            .map(|(id, version, n, _)| (id.as_str(), *version, *n))
            .collect()
    }

    /// What differs from `before`, in words.
    fn changes_since(&self, before: &Snapshot) -> String {
        let mut out = Vec::new();
        if self.experts != before.experts || self.total != before.total {
            out.push(format!(
                "experts {:?} (total {}) became {:?} (total {})",
                before.ids(),
                before.total,
                self.ids(),
                self.total
            ));
        }
        if self.spam != before.spam {
            out.push(format!(
                "GetExpert(spam) changed: version {:?} with {} instances became version {:?} \
                 with {}",
                before.spam.expert.as_ref().map(|e| e.version),
                before.spam.instances.len(),
                self.spam.expert.as_ref().map(|e| e.version),
                self.spam.instances.len()
            ));
        }
        if self.jobs != before.jobs {
            out.push(format!(
                "training jobs {:?} became {:?}",
                before.jobs, self.jobs
            ));
        }
        out.join("; ")
    }
}

async fn snapshot(c: &mut Clients) -> Result<Snapshot, Status> {
    let list = c
        .lib
        .list_experts(proto::ListExpertsRequest {
            page_size: 1000,
            page_token: String::new(),
            min_library_seq: 0,
        })
        .await?
        .into_inner();
    let spam = c
        .lib
        .get_expert(proto::GetExpertRequest {
            id: "spam".into(),
            include_instances: true,
            include_adapter: false,
            min_library_seq: 0,
        })
        .await?
        .into_inner();
    let jobs = c
        .training
        .list_training_jobs(proto::ListTrainingJobsRequest {})
        .await?
        .into_inner()
        .jobs;
    Ok(Snapshot {
        experts: list
            .experts
            .into_iter()
            .map(|e| (e.id, e.version, e.num_instances, e.weights_sha256))
            .collect(),
        total: list.total,
        spam,
        jobs: jobs.into_iter().map(|j| (j.id, j.state)).collect(),
    })
}

/// After a case changed something: removes the experts it added and cancels the jobs it
/// started (waiting until they stop), so that the next cases start from the same library.
/// Returns the state to compare the next cases with.
async fn restore(c: &mut Clients, baseline: &Snapshot, now: Snapshot) -> Snapshot {
    for (id, ..) in &now.experts {
        if !baseline.experts.iter().any(|(b, ..)| b == id) {
            let _ = c
                .lib
                .delete_expert(proto::DeleteExpertRequest {
                    id: id.clone(),
                    expected_version: None,
                })
                .await;
        }
    }
    let finished = |state: i32| {
        [
            proto::TrainingState::Succeeded as i32,
            proto::TrainingState::Failed as i32,
            proto::TrainingState::Cancelled as i32,
        ]
        .contains(&state)
    };
    for (id, state) in &now.jobs {
        if !finished(*state) {
            let _ = c
                .training
                .cancel_training(proto::CancelTrainingRequest { job_id: id.clone() })
                .await;
        }
    }
    let mut latest = now;
    for _ in 0..300 {
        match snapshot(c).await {
            Ok(s) => {
                let settled = s.jobs.iter().all(|(_, state)| finished(*state));
                latest = s;
                if settled {
                    break;
                }
            }
            Err(_) => break,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    latest
}

fn clip(s: &str) -> String {
    if s.len() <= 300 {
        return s.to_string();
    }
    let mut cut = 300;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}… ({} bytes)", &s[..cut], s.len())
}

/// What is wrong with a case's outcome, if anything.
fn verdict(case_code: Code, field: &str, outcome: Result<(), Status>) -> Option<String> {
    let status = match outcome {
        Ok(()) => return Some("succeeded".to_string()),
        Err(s) => s,
    };
    let msg = status.message();
    let mut wrong = Vec::new();
    if status.code() != case_code {
        wrong.push(format!("code {:?}, expected {case_code:?}", status.code()));
    }
    if !msg.starts_with(field) {
        wrong.push(format!("message does not start with {field:?}"));
    }
    if msg.len() > MAX_STATUS_BYTES {
        wrong.push(format!(
            "message is {} bytes, over {MAX_STATUS_BYTES}",
            msg.len()
        ));
    }
    if wrong.is_empty() {
        return None;
    }
    Some(format!(
        "{}; got {:?} {:?}",
        wrong.join(", "),
        status.code(),
        clip(msg)
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_refuses_bad_input_by_field_and_changes_nothing() {
    let server = TestServer::start_with_inference().await;
    let mut c = Clients {
        lib: server.library().await,
        router: server.router().await,
        inference: server.inference().await,
        answerer: server.answerer().await,
        training: server.training().await,
    };
    // Something real for NOT_FOUND, ALREADY_EXISTS, merges and routing to hit.
    for req in [
        register_request("spam", "prompt", "sms_spam", 8),
        register_request("qt", "lora", "question_type", 8),
    ] {
        c.lib.register_expert(req).await.expect("setup registers");
    }
    let sms = task("sms_spam");
    let qt = task("question_type");
    let prompt = peft("prompt", "sms_spam");
    let lora = peft("lora", "question_type");

    let mut s = Suite {
        c: c.clone(),
        cases: Vec::new(),
    };
    let huge_id = "x".repeat(16 * KIB);
    // Past the 128 characters an id may have: INVALID_ARGUMENT wherever it is read, never a
    // lookup that ends NOT_FOUND.
    let id_200 = "x".repeat(200);
    let long_text = |n: usize| "x".repeat(n);

    // ------------------------------------------------------------ RegisterExpert
    let reg = register_request("bad", "prompt", "sms_spam", 8);
    let reg_lora = register_request("bad", "lora", "question_type", 8);
    let with_adapter = |config: &str, weights: Vec<u8>| {
        with(&reg, |r| {
            r.adapter = Some(proto::PeftAdapter {
                adapter_config_json: config.to_string(),
                adapter_model_safetensors: weights,
            })
        })
    };
    let lora_config = |key: &str, value: serde_json::Value| {
        with(&reg_lora, |r| {
            let a = r.adapter.as_mut().unwrap();
            a.adapter_config_json = config_with(&a.adapter_config_json, key, value);
        })
    };
    for (name, id) in [
        ("id empty", String::new()),
        ("id of 129 characters", "a".repeat(129)),
        ("id .", ".".into()),
        ("id ..", "..".into()),
        ("id a/../b", "a/../b".into()),
        ("id a/./b", "a/./b".into()),
        ("id /", "/".into()),
        ("id a//b", "a//b".into()),
        ("id a/", "a/".into()),
        ("id /a", "/a".into()),
        ("id with a space", "sp ace".into()),
        ("id with a newline", "a\nb".into()),
        ("id with a tab", "a\tb".into()),
        ("id unicode", "spam\u{e9}".into()),
        ("id ../../etc/passwd", "../../etc/passwd".into()),
        ("id of 16 KiB", huge_id.clone()),
    ] {
        s.register(
            name,
            Code::InvalidArgument,
            lib("id"),
            with(&reg, |r| r.id = id),
        );
    }
    s.register(
        "adapter missing",
        Code::InvalidArgument,
        "adapter",
        with(&reg, |r| r.adapter = None),
    );
    s.register(
        "config not JSON",
        Code::InvalidArgument,
        lib("adapter_config"),
        with_adapter("{not json", prompt.adapter_model_safetensors.clone()),
    );
    s.register(
        "config empty",
        Code::InvalidArgument,
        lib("adapter_config"),
        with_adapter("", prompt.adapter_model_safetensors.clone()),
    );
    s.register(
        "config a JSON array",
        Code::InvalidArgument,
        lib("adapter_config"),
        with_adapter("[1, 2]", prompt.adapter_model_safetensors.clone()),
    );
    s.register(
        "peft_type unknown",
        Code::InvalidArgument,
        lib("adapter_config.peft_type"),
        with_adapter(
            r#"{"peft_type":"IA3"}"#,
            prompt.adapter_model_safetensors.clone(),
        ),
    );
    for (name, peft_type) in [
        (
            "peft_type lower case (PEFT writes PROMPT_TUNING)",
            "prompt_tuning",
        ),
        ("peft_type mixed case", "Prompt_Tuning"),
    ] {
        s.register(
            name,
            Code::InvalidArgument,
            lib("adapter_config.peft_type"),
            with_adapter(
                &config_with(&prompt.adapter_config_json, "peft_type", peft_type.into()),
                prompt.adapter_model_safetensors.clone(),
            ),
        );
    }
    s.register(
        "lora peft_type lower case (PEFT writes LORA)",
        Code::InvalidArgument,
        lib("adapter_config.peft_type"),
        lora_config("peft_type", "lora".into()),
    );
    s.register(
        "peft_type missing",
        Code::InvalidArgument,
        lib("adapter_config.peft_type"),
        with_adapter(
            r#"{"num_virtual_tokens":20}"#,
            prompt.adapter_model_safetensors.clone(),
        ),
    );
    s.register(
        "token_dim of another model",
        Code::FailedPrecondition,
        "expert does not fit",
        with_adapter(
            r#"{"peft_type":"PROMPT_TUNING","num_virtual_tokens":20,"token_dim":512}"#,
            prompt_weights(20, 512, 0.1),
        ),
    );
    s.register(
        "prompt rows of another width",
        Code::FailedPrecondition,
        "expert does not fit",
        with_adapter(
            r#"{"peft_type":"PROMPT_TUNING","num_virtual_tokens":20}"#,
            prompt_weights(20, 512, 0.1),
        ),
    );
    s.register(
        "prompt with too many virtual tokens",
        Code::ResourceExhausted,
        "adapter_config.num_virtual_tokens",
        with_adapter(
            r#"{"peft_type":"PROMPT_TUNING","num_virtual_tokens":600,"token_dim":576}"#,
            prompt_weights(600, 576, 0.1),
        ),
    );
    s.register(
        "prompt with no virtual tokens",
        Code::InvalidArgument,
        lib("adapter_config.num_virtual_tokens"),
        with_adapter(
            r#"{"peft_type":"PROMPT_TUNING","num_virtual_tokens":0,"token_dim":576}"#,
            prompt.adapter_model_safetensors.clone(),
        ),
    );
    s.register(
        "prompt row count not the config's",
        Code::InvalidArgument,
        lib("adapter_config.num_virtual_tokens"),
        with_adapter(&prompt.adapter_config_json, prompt_weights(10, 576, 0.1)),
    );
    s.register(
        "prompt holding NaN",
        Code::InvalidArgument,
        lib("weights"),
        with_adapter(
            &prompt.adapter_config_json,
            prompt_weights(20, 576, f32::NAN),
        ),
    );
    s.register(
        "prompt of I32 values",
        Code::InvalidArgument,
        lib("weights"),
        with_adapter(&prompt.adapter_config_json, {
            let data = vec![0u8; 20 * 576 * 4];
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::I32, vec![20, 576], &data)
                    .unwrap();
            safetensors::serialize([("prompt_embeddings", view)], None).unwrap()
        }),
    );
    s.register(
        "prompt with an extra tensor",
        Code::InvalidArgument,
        lib("weights"),
        with_adapter(&prompt.adapter_config_json, {
            let data: Vec<u8> = std::iter::repeat_n(0.1f32.to_le_bytes(), 20 * 576)
                .flatten()
                .collect();
            let view = || {
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![20, 576], &data)
                    .unwrap()
            };
            safetensors::serialize([("prompt_embeddings", view()), ("extra", view())], None)
                .unwrap()
        }),
    );
    s.register(
        "safetensors garbage",
        Code::InvalidArgument,
        lib("weights"),
        with_adapter(&prompt.adapter_config_json, b"garbage".to_vec()),
    );
    s.register(
        "safetensors empty",
        Code::InvalidArgument,
        lib("weights"),
        with_adapter(&prompt.adapter_config_json, Vec::new()),
    );
    s.register(
        "safetensors truncated",
        Code::InvalidArgument,
        lib("weights"),
        with_adapter(
            &prompt.adapter_config_json,
            prompt.adapter_model_safetensors[..prompt.adapter_model_safetensors.len() / 2].to_vec(),
        ),
    );
    s.register(
        "LoRA config on prompt weights",
        Code::InvalidArgument,
        lib("weights"),
        with_adapter(
            &lora.adapter_config_json,
            prompt.adapter_model_safetensors.clone(),
        ),
    );
    s.register(
        "LoRA rank over 256",
        Code::ResourceExhausted,
        "adapter_config.r",
        lora_config("r", 300.into()),
    );
    s.register(
        "LoRA rank 0",
        Code::InvalidArgument,
        lib("adapter_config.r"),
        lora_config("r", 0.into()),
    );
    s.register(
        "LoRA rank not the tensors'",
        Code::FailedPrecondition,
        "expert does not fit",
        lora_config("r", 8.into()),
    );
    s.register(
        "LoRA with DoRA",
        Code::InvalidArgument,
        lib("adapter_config.use_dora"),
        lora_config("use_dora", true.into()),
    );
    s.register(
        "LoRA on lm_head",
        Code::InvalidArgument,
        lib("adapter_config.target_modules"),
        lora_config("target_modules", serde_json::json!(["lm_head"])),
    );
    s.register(
        "LoRA training biases",
        Code::InvalidArgument,
        lib("adapter_config.bias"),
        lora_config("bias", "all".into()),
    );
    s.register(
        "LoRA alpha not a number",
        Code::InvalidArgument,
        lib("adapter_config.lora_alpha"),
        lora_config("lora_alpha", "eight".into()),
    );
    s.register(
        "LoRA layer the model lacks",
        Code::FailedPrecondition,
        "expert does not fit",
        lora_config("layers_to_transform", serde_json::json!([99])),
    );
    s.register(
        "LoRA missing its last layer",
        Code::FailedPrecondition,
        "expert does not fit",
        with(&reg_lora, |r| {
            let a = r.adapter.as_mut().unwrap();
            let st =
                safetensors::SafeTensors::deserialize(&lora.adapter_model_safetensors).unwrap();
            let kept: Vec<(String, safetensors::tensor::TensorView)> = st
                .tensors()
                .into_iter()
                .filter(|(n, _)| !n.contains("layers.29."))
                .collect();
            a.adapter_model_safetensors = safetensors::serialize(kept, None).unwrap();
        }),
    );
    s.register(
        "safetensors_bytes not what arrived",
        Code::InvalidArgument,
        "safetensors_bytes",
        with(&reg, |r| r.safetensors_bytes = Some(5)),
    );
    s.register(
        "safetensors_sha256 not what arrived",
        Code::InvalidArgument,
        "safetensors_sha256",
        with(&reg, |r| r.safetensors_sha256 = sha256_hex(b"another file")),
    );
    s.register(
        "safetensors_sha256 not hex",
        Code::InvalidArgument,
        "safetensors_sha256",
        with(&reg, |r| r.safetensors_sha256 = "not a digest ".repeat(100)),
    );
    s.register(
        "no instances",
        Code::InvalidArgument,
        lib("instances"),
        with(&reg, |r| r.instances.clear()),
    );
    s.register(
        "instance input empty",
        Code::InvalidArgument,
        lib("instances[1].input"),
        with(&reg, |r| r.instances[1].input.clear()),
    );
    s.register(
        "instance input blank",
        Code::InvalidArgument,
        lib("instances[3].input"),
        with(&reg, |r| r.instances[3].input = " \n\t ".into()),
    );
    s.register(
        "instance with 65 choices",
        Code::InvalidArgument,
        lib("instances[0].choices"),
        with(&reg, |r| r.instances[0].choices = strings(65, "c")),
    );
    s.register(
        "instance choice over 4096 bytes",
        Code::ResourceExhausted,
        "instances[2].choices[1]",
        with(&reg, |r| {
            r.instances[2].choices = vec!["ham".into(), long_text(4 * KIB + 1)]
        }),
    );
    s.register(
        "instance input over 64 KiB",
        Code::ResourceExhausted,
        "instances[0].input",
        with(&reg, |r| r.instances[0].input = long_text(64 * KIB + 1)),
    );
    s.register(
        "instance target over 64 KiB",
        Code::ResourceExhausted,
        "instances[0].target",
        with(&reg, |r| {
            r.instances[0].target = Some(long_text(64 * KIB + 1))
        }),
    );
    s.register(
        "10001 instances",
        Code::ResourceExhausted,
        "instances",
        with(&reg, |r| {
            r.instances = (0..10_001)
                .map(|i| instance(&format!("row {i}"), Some("ham"), &["ham", "spam"]))
                .collect()
        }),
    );
    s.register(
        "name over 1024 bytes",
        Code::InvalidArgument,
        lib("name"),
        with(&reg, |r| r.name = long_text(KIB + 1)),
    );
    s.register(
        "description over 64 KiB",
        Code::InvalidArgument,
        lib("description"),
        with(&reg, |r| r.description = long_text(64 * KIB + 1)),
    );
    s.register(
        "unknown backbone",
        Code::InvalidArgument,
        lib("backbone"),
        with(&reg, |r| r.backbone = "llama-70b".into()),
    );
    s.register(
        "existing id without new_version",
        Code::AlreadyExists,
        "expert spam already exists",
        with(&reg, |r| r.id = "spam".into()),
    );
    {
        let base = reg.clone();
        let mut lib_client = s.c.lib.clone();
        s.push(
            "RegisterExpert: adapter over max_adapter_bytes (61 MiB)",
            Code::ResourceExhausted,
            "adapter.adapter_model_safetensors",
            async move {
                let mut r = base;
                r.adapter.as_mut().unwrap().adapter_model_safetensors = vec![0; 61 * MIB];
                done(lib_client.register_expert(r).await)
            },
        );
    }

    // ------------------------------------------------------------ RegisterExpertStream
    let file = lora.adapter_model_safetensors.clone();
    let file_chunks: Vec<Vec<u8>> = file.chunks(10_000).map(<[u8]>::to_vec).collect();
    assert!(file_chunks.len() > 2);
    let header = with(&reg_lora, |r| {
        r.adapter
            .as_mut()
            .unwrap()
            .adapter_model_safetensors
            .clear();
        r.instances.clear();
        r.safetensors_bytes = Some(file.len() as u64);
        r.safetensors_sha256 = sha256_hex(&file);
    });
    let rows = instances(&qt, 3, 1);
    s.register_stream(
        "empty stream",
        Code::InvalidArgument,
        "stream",
        tokio_stream::iter(Vec::new()),
    );
    s.register_stream(
        "first message a chunk",
        Code::InvalidArgument,
        "stream",
        tokio_stream::iter(vec![reg_chunk(RegPart::SafetensorsChunk(vec![1, 2, 3]))]),
    );
    s.register_stream(
        "first message an instance",
        Code::InvalidArgument,
        "stream",
        tokio_stream::iter(vec![reg_chunk(RegPart::Instance(rows[0].clone()))]),
    );
    s.register_stream(
        "first message without a part",
        Code::InvalidArgument,
        "stream",
        tokio_stream::iter(vec![proto::RegisterExpertChunk { part: None }]),
    );
    s.register_stream(
        "second header",
        Code::InvalidArgument,
        "stream",
        tokio_stream::iter(vec![
            reg_chunk(RegPart::Header(header.clone())),
            reg_chunk(RegPart::Header(header.clone())),
        ]),
    );
    s.register_stream(
        "message without a part after the header",
        Code::InvalidArgument,
        "stream",
        tokio_stream::iter(vec![
            reg_chunk(RegPart::Header(header.clone())),
            proto::RegisterExpertChunk { part: None },
        ]),
    );
    s.register_stream(
        "announced safetensors_bytes over the limit",
        Code::ResourceExhausted,
        "safetensors_bytes",
        tokio_stream::iter(reg_stream(
            &with(&header, |h| h.safetensors_bytes = Some(61 * MIB as u64)),
            &[],
            &rows,
        )),
    );
    s.register_stream(
        "announced safetensors_bytes u64::MAX",
        Code::ResourceExhausted,
        "safetensors_bytes",
        tokio_stream::iter(reg_stream(
            &with(&header, |h| h.safetensors_bytes = Some(u64::MAX)),
            &[],
            &rows,
        )),
    );
    s.register_stream(
        "a chunk lost",
        Code::InvalidArgument,
        "safetensors_bytes",
        tokio_stream::iter(reg_stream(&header, &file_chunks[1..], &rows)),
    );
    s.register_stream(
        "a chunk repeated",
        Code::InvalidArgument,
        "safetensors_bytes",
        tokio_stream::iter(reg_stream(
            &header,
            &[&file_chunks[..2], &file_chunks[1..]].concat(),
            &rows,
        )),
    );
    s.register_stream(
        "chunks reordered",
        Code::InvalidArgument,
        "safetensors_sha256",
        tokio_stream::iter(reg_stream(
            &header,
            &with(&file_chunks, |c| c.swap(0, 1)),
            &rows,
        )),
    );
    s.register_stream(
        "safetensors_bytes missing",
        Code::InvalidArgument,
        "safetensors_bytes",
        tokio_stream::iter(reg_stream(
            &with(&header, |h| h.safetensors_bytes = None),
            &file_chunks,
            &rows,
        )),
    );
    s.register_stream(
        "safetensors_sha256 missing",
        Code::InvalidArgument,
        "safetensors_sha256",
        tokio_stream::iter(reg_stream(
            &with(&header, |h| h.safetensors_sha256.clear()),
            &file_chunks,
            &rows,
        )),
    );
    s.register_stream(
        "safetensors_bytes and safetensors_sha256 missing",
        Code::InvalidArgument,
        "safetensors_bytes",
        tokio_stream::iter(reg_stream(
            &with(&header, |h| {
                h.safetensors_bytes = None;
                h.safetensors_sha256.clear();
            }),
            &file_chunks,
            &rows,
        )),
    );
    {
        // Announced under the limit but sent past it (61 chunks of 1 MiB, made as they are
        // sent): refused at the first chunk past what was announced, long before the limit.
        let h = with(&header, |h| h.safetensors_bytes = Some(MIB as u64));
        s.register_stream(
            "chunks over max_adapter_bytes past what was announced",
            Code::InvalidArgument,
            "safetensors_bytes: 1048576 announced, 2097152 received",
            tokio_stream::iter(
                std::iter::once(reg_chunk(RegPart::Header(h)))
                    .chain((0..61).map(|_| reg_chunk(RegPart::SafetensorsChunk(vec![0; MIB])))),
            ),
        );
    }
    s.register_stream(
        "10001 streamed instances",
        Code::ResourceExhausted,
        "instances",
        tokio_stream::iter(reg_stream(&header, &file_chunks, &[]).into_iter().chain(
            (0..10_001).map(|i| {
                reg_chunk(RegPart::Instance(instance(
                    &format!("What is {i} ?"),
                    Some("NUM"),
                    &[],
                )))
            }),
        )),
    );
    s.register_stream(
        "no instances",
        Code::InvalidArgument,
        lib("instances"),
        tokio_stream::iter(reg_stream(&header, &file_chunks, &[])),
    );
    s.register_stream(
        "streamed instance blank",
        Code::InvalidArgument,
        lib("instances[1].input"),
        tokio_stream::iter(reg_stream(
            &header,
            &file_chunks,
            &with(&rows, |r| r[1].input = "  ".into()),
        )),
    );
    s.register_stream(
        "header without an adapter",
        Code::InvalidArgument,
        lib("adapter_config"),
        tokio_stream::iter(reg_stream(
            &with(&header, |h| h.adapter = None),
            &file_chunks,
            &rows,
        )),
    );
    s.register_stream(
        "header with a bad id",
        Code::InvalidArgument,
        lib("id"),
        tokio_stream::iter(reg_stream(
            &with(&header, |h| h.id = "a//b".into()),
            &file_chunks,
            &rows,
        )),
    );
    s.register_stream(
        "existing id without new_version",
        Code::AlreadyExists,
        "expert qt already exists",
        tokio_stream::iter(reg_stream(
            &with(&header, |h| h.id = "qt".into()),
            &file_chunks,
            &rows,
        )),
    );

    // ------------------------------------------------------------ GetExpert
    let get_req = |id: &str| proto::GetExpertRequest {
        id: id.to_string(),
        include_instances: true,
        include_adapter: true,
        min_library_seq: 0,
    };
    s.get("id empty", Code::InvalidArgument, "id", get_req(""));
    s.get(
        "id empty, nothing included",
        Code::InvalidArgument,
        "id",
        proto::GetExpertRequest::default(),
    );
    s.get(
        "unknown id",
        Code::NotFound,
        "expert not found",
        get_req("nope"),
    );
    s.get(
        "id of 200 characters",
        Code::InvalidArgument,
        "id",
        get_req(&id_200),
    );
    s.get(
        "id of 16 KiB",
        Code::InvalidArgument,
        "id",
        get_req(&huge_id),
    );
    s.get(
        "id ../../etc/passwd",
        Code::InvalidArgument,
        "id",
        get_req("../../etc/passwd"),
    );
    s.get(
        "id unicode",
        Code::InvalidArgument,
        "id",
        get_req("sp\u{e4}m"),
    );
    s.get(
        "id a prefix of an expert's",
        Code::NotFound,
        "expert not found",
        get_req("spa"),
    );

    // ------------------------------------------------------------ ListExperts
    s.list(
        "page_size 1001",
        Code::InvalidArgument,
        lib("page_size"),
        proto::ListExpertsRequest {
            page_size: 1001,
            page_token: String::new(),
            min_library_seq: 0,
        },
    );
    s.list(
        "page_size u32::MAX",
        Code::InvalidArgument,
        lib("page_size"),
        proto::ListExpertsRequest {
            page_size: u32::MAX,
            page_token: "spam".into(),
            min_library_seq: 0,
        },
    );

    // ------------------------------------------------------------ DeleteExpert
    s.delete("id empty", Code::InvalidArgument, "id", String::new());
    s.delete(
        "unknown id",
        Code::NotFound,
        "expert not found",
        "nope".into(),
    );
    s.delete(
        "id of 200 characters",
        Code::InvalidArgument,
        "id",
        id_200.clone(),
    );
    s.delete("id of 16 KiB", Code::InvalidArgument, "id", huge_id.clone());
    s.delete(
        "id an expert's with a trailing /",
        Code::InvalidArgument,
        "id",
        "qt/".into(),
    );
    s.delete(
        "id a prefix of an expert's",
        Code::NotFound,
        "expert not found",
        "q".into(),
    );

    // ------------------------------------------------------------ AddInstances
    let add = |id: &str, instances: Vec<proto::Instance>| proto::AddInstancesRequest {
        id: id.to_string(),
        instances,
        expected_version: None,
    };
    let good = instances(&sms, 2, 5);
    s.add(
        "id empty",
        Code::InvalidArgument,
        "id",
        add("", good.clone()),
    );
    s.add(
        "id empty, instances bad too",
        Code::InvalidArgument,
        "id",
        add("", vec![instance(" ", None, &[])]),
    );
    s.add(
        "unknown id",
        Code::NotFound,
        "expert not found",
        add("nope", good.clone()),
    );
    s.add(
        "id of 200 characters",
        Code::InvalidArgument,
        "id",
        add(&id_200, good.clone()),
    );
    s.add(
        "no instances",
        Code::InvalidArgument,
        lib("instances"),
        add("spam", vec![]),
    );
    s.add(
        "instance input empty",
        Code::InvalidArgument,
        lib("instances[1].input"),
        add("spam", with(&good, |g| g[1].input.clear())),
    );
    s.add(
        "instance with 65 choices",
        Code::InvalidArgument,
        lib("instances[0].choices"),
        add("spam", with(&good, |g| g[0].choices = strings(65, "c"))),
    );
    s.add(
        "instance choice over 4096 bytes",
        Code::ResourceExhausted,
        "instances[0].choices[0]",
        add(
            "spam",
            with(&good, |g| g[0].choices = vec![long_text(4 * KIB + 1)]),
        ),
    );
    s.add(
        "instance input over 64 KiB",
        Code::ResourceExhausted,
        "instances[1].input",
        add(
            "spam",
            with(&good, |g| g[1].input = long_text(64 * KIB + 1)),
        ),
    );
    s.add(
        "instance target over 64 KiB",
        Code::ResourceExhausted,
        "instances[0].target",
        add(
            "spam",
            with(&good, |g| g[0].target = Some(long_text(64 * KIB + 1))),
        ),
    );
    s.add(
        "10001 instances",
        Code::ResourceExhausted,
        "instances",
        add(
            "spam",
            (0..10_001)
                .map(|i| instance(&format!("row {i}"), Some("ham"), &["ham", "spam"]))
                .collect(),
        ),
    );

    // ------------------------------------------------------------ MergeExperts
    let src = |id: &str, weight: Option<f64>| proto::MergeSource {
        expert_id: id.to_string(),
        weight,
    };
    let merge = |id: &str, sources: Vec<proto::MergeSource>| proto::MergeExpertsRequest {
        id: id.to_string(),
        sources,
        ..Default::default()
    };
    s.merge(
        "no sources",
        Code::InvalidArgument,
        lib("sources"),
        merge("m", vec![]),
    );
    s.merge(
        "unknown source",
        Code::NotFound,
        "expert not found",
        merge("m", vec![src("qt", None), src("nope", None)]),
    );
    s.merge(
        "sources of two kinds",
        Code::InvalidArgument,
        lib("sources"),
        merge("m", vec![src("spam", None), src("qt", None)]),
    );
    s.merge(
        "a source twice",
        Code::InvalidArgument,
        lib("sources"),
        merge("m", vec![src("qt", None), src("qt", None)]),
    );
    s.merge(
        "65 sources",
        Code::InvalidArgument,
        lib("sources"),
        merge(
            "m",
            strings(65, "s").iter().map(|id| src(id, None)).collect(),
        ),
    );
    s.merge(
        "source id empty",
        Code::InvalidArgument,
        lib("sources[0].expert_id"),
        merge("m", vec![src("", None)]),
    );
    s.merge(
        "source id of 200 characters",
        Code::InvalidArgument,
        lib("sources[1].expert_id"),
        merge("m", vec![src("qt", None), src(&id_200, None)]),
    );
    s.merge(
        "weight on some sources only",
        Code::InvalidArgument,
        "sources[1].weight",
        merge("m", vec![src("spam", Some(1.0)), src("qt", None)]),
    );
    for (name, w) in [
        ("weight negative", -1.0),
        ("weight zero", 0.0),
        ("weight NaN", f64::NAN),
        ("weight infinite", f64::INFINITY),
    ] {
        s.merge(
            name,
            Code::InvalidArgument,
            lib("sources[1].weight"),
            merge("m", vec![src("spam", Some(1.0)), src("qt", Some(w))]),
        );
    }
    s.merge(
        "weights too large to add up",
        Code::InvalidArgument,
        lib("sources"),
        merge("m", vec![src("spam", Some(1e308)), src("qt", Some(1e308))]),
    );
    for (name, mode) in [("prompt_mode 7", 7), ("prompt_mode -1", -1)] {
        s.merge(
            name,
            Code::InvalidArgument,
            "prompt_mode",
            proto::MergeExpertsRequest {
                prompt_mode: mode,
                ..merge("m", vec![src("spam", None)])
            },
        );
    }
    s.merge(
        "concatenating LoRAs",
        Code::InvalidArgument,
        lib("prompt_mode"),
        proto::MergeExpertsRequest {
            prompt_mode: proto::PromptMergeMode::Concat as i32,
            ..merge("m", vec![src("qt", None)])
        },
    );
    s.merge(
        "weights on a concatenation",
        Code::InvalidArgument,
        lib("sources[0].weight"),
        proto::MergeExpertsRequest {
            prompt_mode: proto::PromptMergeMode::Concat as i32,
            ..merge("m", vec![src("spam", Some(1.0))])
        },
    );
    s.merge(
        "existing id without new_version",
        Code::AlreadyExists,
        "expert spam already exists",
        merge("spam", vec![src("qt", None)]),
    );
    s.merge(
        "id empty",
        Code::InvalidArgument,
        lib("id"),
        merge("", vec![src("qt", None)]),
    );
    s.merge(
        "id with a space",
        Code::InvalidArgument,
        lib("id"),
        merge("a b", vec![src("qt", None)]),
    );
    s.merge(
        "id ..",
        Code::InvalidArgument,
        lib("id"),
        merge("..", vec![src("qt", None)]),
    );
    s.merge(
        "name over 1024 bytes",
        Code::InvalidArgument,
        lib("name"),
        proto::MergeExpertsRequest {
            name: long_text(KIB + 1),
            ..merge("m", vec![src("qt", None)])
        },
    );
    s.merge(
        "description over 64 KiB",
        Code::InvalidArgument,
        lib("description"),
        proto::MergeExpertsRequest {
            description: long_text(64 * KIB + 1),
            ..merge("m", vec![src("qt", None)])
        },
    );

    // ------------------------------------------------------------ Route
    let route_queries = queries(&sms, 4, 1);
    let route =
        |queries: Vec<proto::Query>, options: Option<proto::RouteOptions>| proto::RouteRequest {
            queries,
            options,
            min_library_seq: 0,
        };
    let options = |change: fn(&mut proto::RouteOptions)| {
        route(
            route_queries.clone(),
            Some(with(&proto::RouteOptions::default(), change)),
        )
    };
    s.route(
        "no queries",
        Code::InvalidArgument,
        lib("queries"),
        route(vec![], None),
    );
    s.route(
        "1025 queries",
        Code::ResourceExhausted,
        "queries",
        route(
            (0..1025)
                .map(|i| query(&format!("query {i}"), &[]))
                .collect(),
            None,
        ),
    );
    s.route(
        "query input empty",
        Code::InvalidArgument,
        lib("queries[0].input"),
        route(with(&route_queries, |q| q[0].input.clear()), None),
    );
    s.route(
        "query input blank",
        Code::InvalidArgument,
        lib("queries[2].input"),
        route(with(&route_queries, |q| q[2].input = "\n  ".into()), None),
    );
    s.route(
        "query with 65 choices",
        Code::InvalidArgument,
        lib("queries[0].choices"),
        route(
            with(&route_queries, |q| q[0].choices = strings(65, "c")),
            None,
        ),
    );
    s.route(
        "query choice over 4096 bytes",
        Code::ResourceExhausted,
        "queries[1].choices[0]",
        route(
            with(&route_queries, |q| {
                q[1].choices = vec![long_text(4 * KIB + 1)]
            }),
            None,
        ),
    );
    s.route(
        "query input over 64 KiB",
        Code::ResourceExhausted,
        "queries[0].input",
        route(
            with(&route_queries, |q| q[0].input = long_text(64 * KIB + 1)),
            None,
        ),
    );
    s.route(
        "query target over 64 KiB",
        Code::ResourceExhausted,
        "queries[0].target",
        route(
            with(&route_queries, |q| {
                q[0].target = Some(long_text(64 * KIB + 1))
            }),
            None,
        ),
    );
    s.route(
        "text over 1 MiB in all",
        Code::ResourceExhausted,
        "queries",
        route(vec![query(&"x ".repeat(30_000), &[]); 20], None),
    );
    s.route(
        "top_k 1001",
        Code::InvalidArgument,
        "options.top_k",
        options(|o| o.top_k = 1001),
    );
    s.route(
        "top_k u32::MAX",
        Code::InvalidArgument,
        "options.top_k",
        options(|o| o.top_k = u32::MAX),
    );
    for (name, change) in [
        (
            "abstain_threshold 1.5",
            (|o: &mut proto::RouteOptions| o.abstain_threshold = Some(1.5))
                as fn(&mut proto::RouteOptions),
        ),
        ("abstain_threshold -0.1", |o| {
            o.abstain_threshold = Some(-0.1)
        }),
        ("abstain_threshold NaN", |o| {
            o.abstain_threshold = Some(f32::NAN)
        }),
        ("abstain_threshold infinite", |o| {
            o.abstain_threshold = Some(f32::INFINITY)
        }),
    ] {
        s.route(
            name,
            Code::InvalidArgument,
            "options.abstain_threshold",
            options(change),
        );
    }
    s.route(
        "evidence_per_query 101",
        Code::InvalidArgument,
        "options.evidence_per_query",
        options(|o| o.evidence_per_query = 101),
    );
    s.route(
        "strategy 9",
        Code::InvalidArgument,
        "options.strategy",
        options(|o| o.strategy = 9),
    );
    s.route(
        "strategy -1",
        Code::InvalidArgument,
        "options.strategy",
        options(|o| o.strategy = -1),
    );
    s.route(
        "aggregation 9",
        Code::InvalidArgument,
        "options.aggregation",
        options(|o| o.aggregation = 9),
    );
    s.route(
        "text_format 9",
        Code::InvalidArgument,
        "options.text_format",
        options(|o| o.text_format = 9),
    );
    s.route(
        "kind 9",
        Code::InvalidArgument,
        "options.kind",
        options(|o| o.kind = 9),
    );
    s.route(
        "bad options before bad queries",
        Code::InvalidArgument,
        "options.top_k",
        route(
            vec![],
            Some(proto::RouteOptions {
                top_k: 5000,
                ..Default::default()
            }),
        ),
    );

    // ------------------------------------------------------------ Score
    // An unknown expert: whatever the input checks let through is NOT_FOUND, never scored.
    let score = proto::ScoreRequest {
        expert_id: "no_such_expert".into(),
        input: "WINNER! Claim your prize now".into(),
        choices: vec!["ham".into(), "spam".into()],
        truncate: false,
        min_library_seq: 0,
    };
    s.score(
        "input empty",
        Code::InvalidArgument,
        "input",
        with(&score, |r| r.input.clear()),
    );
    s.score(
        "input blank",
        Code::InvalidArgument,
        "input",
        with(&score, |r| r.input = " \t\n".into()),
    );
    s.score(
        "no choices",
        Code::InvalidArgument,
        "choices",
        with(&score, |r| r.choices.clear()),
    );
    s.score(
        "65 choices",
        Code::InvalidArgument,
        "choices",
        with(&score, |r| r.choices = strings(65, "c")),
    );
    s.score(
        "choice over 4096 bytes",
        Code::ResourceExhausted,
        "choices[1]",
        with(&score, |r| r.choices[1] = long_text(4 * KIB + 1)),
    );
    s.score(
        "input over 64 KiB",
        Code::ResourceExhausted,
        "input",
        with(&score, |r| r.input = long_text(64 * KIB + 1)),
    );
    s.score(
        "input and choices over 64 KiB together",
        Code::ResourceExhausted,
        "input",
        with(&score, |r| {
            r.input = long_text(60 * KIB);
            r.choices = vec![long_text(4000), long_text(4000)];
        }),
    );
    s.score(
        "unknown expert",
        Code::NotFound,
        "expert not found",
        score.clone(),
    );
    s.score(
        "expert id of 200 characters",
        Code::InvalidArgument,
        "expert_id",
        with(&score, |r| r.expert_id = id_200.clone()),
    );
    s.score(
        "expert id of 16 KiB",
        Code::InvalidArgument,
        "expert_id",
        with(&score, |r| r.expert_id = huge_id.clone()),
    );

    // ------------------------------------------------------------ ScoreEnsemble
    // The bare backbone and an unknown expert: NOT_FOUND on the member once the checks pass.
    let ensemble = proto::ScoreEnsembleRequest {
        expert_ids: vec![String::new(), "no_such_expert".into()],
        input: "WINNER! Claim your prize now".into(),
        choices: vec!["ham".into(), "spam".into()],
        truncate: false,
        min_library_seq: 0,
    };
    s.ensemble(
        "no members",
        Code::InvalidArgument,
        "expert_ids",
        with(&ensemble, |r| r.expert_ids.clear()),
    );
    s.ensemble(
        "1 member",
        Code::InvalidArgument,
        "expert_ids",
        with(&ensemble, |r| r.expert_ids = vec!["spam".into()]),
    );
    s.ensemble(
        "17 members",
        Code::InvalidArgument,
        "expert_ids",
        with(&ensemble, |r| r.expert_ids = strings(17, "e")),
    );
    s.ensemble(
        "the bare backbone twice",
        Code::InvalidArgument,
        "expert_ids[1]",
        with(&ensemble, |r| {
            r.expert_ids = vec![String::new(), String::new()]
        }),
    );
    s.ensemble(
        "a member twice",
        Code::InvalidArgument,
        "expert_ids[2]",
        with(&ensemble, |r| {
            r.expert_ids = vec!["spam".into(), "qt".into(), "spam".into()]
        }),
    );
    s.ensemble(
        "unknown member",
        Code::NotFound,
        "expert_ids[1]",
        ensemble.clone(),
    );
    s.ensemble(
        "unknown first member",
        Code::NotFound,
        "expert_ids[0]",
        with(&ensemble, |r| r.expert_ids.reverse()),
    );
    s.ensemble(
        "member id of 200 characters",
        Code::InvalidArgument,
        "expert_ids[1]",
        with(&ensemble, |r| r.expert_ids[1] = id_200.clone()),
    );
    s.ensemble(
        "work over max_work_bytes",
        Code::ResourceExhausted,
        "expert_ids",
        with(&ensemble, |r| {
            r.expert_ids = std::iter::once(String::new())
                .chain(strings(15, "m"))
                .collect();
            r.input = "x ".repeat(10_000);
        }),
    );
    s.ensemble(
        "input blank",
        Code::InvalidArgument,
        "input",
        with(&ensemble, |r| r.input = " ".into()),
    );
    s.ensemble(
        "no choices",
        Code::InvalidArgument,
        "choices",
        with(&ensemble, |r| r.choices.clear()),
    );
    s.ensemble(
        "65 choices",
        Code::InvalidArgument,
        "choices",
        with(&ensemble, |r| r.choices = strings(65, "c")),
    );
    s.ensemble(
        "choice over 4096 bytes",
        Code::ResourceExhausted,
        "choices[0]",
        with(&ensemble, |r| r.choices[0] = long_text(4 * KIB + 1)),
    );
    s.ensemble(
        "input over 64 KiB",
        Code::ResourceExhausted,
        "input",
        with(&ensemble, |r| r.input = long_text(64 * KIB + 1)),
    );

    // ------------------------------------------------------------ Generate
    // An unknown expert: whatever the checks let through is NOT_FOUND, never generated.
    let generate = proto::GenerateRequest {
        expert_id: "no_such_expert".into(),
        input: "Say hello".into(),
        max_new_tokens: 2,
        ..Default::default()
    };
    s.generate(
        "input empty",
        Code::InvalidArgument,
        "input",
        with(&generate, |r| r.input.clear()),
    );
    s.generate(
        "input blank",
        Code::InvalidArgument,
        "input",
        with(&generate, |r| r.input = "   ".into()),
    );
    s.generate(
        "input over 64 KiB",
        Code::ResourceExhausted,
        "input",
        with(&generate, |r| r.input = long_text(64 * KIB + 1)),
    );
    s.generate(
        "input and stop strings over 64 KiB together",
        Code::ResourceExhausted,
        "input",
        with(&generate, |r| {
            r.input = long_text(63 * KIB);
            r.stop = vec![long_text(256); 16];
        }),
    );
    s.generate(
        "max_new_tokens 513",
        Code::InvalidArgument,
        "max_new_tokens",
        with(&generate, |r| r.max_new_tokens = 513),
    );
    s.generate(
        "max_new_tokens u32::MAX",
        Code::InvalidArgument,
        "max_new_tokens",
        with(&generate, |r| r.max_new_tokens = u32::MAX),
    );
    for (name, t) in [
        ("temperature negative", -0.1),
        ("temperature NaN", f32::NAN),
        ("temperature over 5", 5.01),
        ("temperature infinite", f32::INFINITY),
    ] {
        s.generate(
            name,
            Code::InvalidArgument,
            "temperature",
            with(&generate, |r| r.temperature = t),
        );
    }
    for (name, p) in [
        ("top_p over 1", 1.01),
        ("top_p negative", -0.5),
        ("top_p NaN", f32::NAN),
    ] {
        s.generate(
            name,
            Code::InvalidArgument,
            "top_p",
            with(&generate, |r| r.top_p = p),
        );
    }
    s.generate(
        "17 stop strings",
        Code::InvalidArgument,
        "stop",
        with(&generate, |r| r.stop = strings(17, "s")),
    );
    s.generate(
        "stop string empty",
        Code::InvalidArgument,
        "stop",
        with(&generate, |r| r.stop = vec!["ok".into(), String::new()]),
    );
    s.generate(
        "stop string over 256 bytes",
        Code::InvalidArgument,
        "stop[1]",
        with(&generate, |r| r.stop = vec!["ok".into(), long_text(257)]),
    );
    s.generate(
        "unknown expert",
        Code::NotFound,
        "expert not found",
        generate.clone(),
    );
    s.generate(
        "expert id of 200 characters",
        Code::InvalidArgument,
        "expert_id",
        with(&generate, |r| r.expert_id = id_200.clone()),
    );
    s.generate(
        "expert id of 16 KiB",
        Code::InvalidArgument,
        "expert_id",
        with(&generate, |r| r.expert_id = huge_id.clone()),
    );

    // ------------------------------------------------------------ Answer
    // top_k past its limit: refused while routing, so whatever the input checks let through is
    // never scored or generated. Cases of the routing itself set their own options.
    let answer = proto::AnswerRequest {
        queries: queries(&sms, 2, 1),
        inputs: vec![
            answer_input("WINNER! Claim your prize now", &["ham", "spam"]),
            answer_input("See you at lunch?", &["ham", "spam"]),
        ],
        route: Some(proto::RouteOptions {
            top_k: 1001,
            ..Default::default()
        }),
        ..Default::default()
    };
    let generate_mode = |change: fn(&mut proto::AnswerRequest)| {
        with(&answer, |r| {
            r.mode = proto::AnswerMode::Generate as i32;
            change(r);
        })
    };
    s.answer(
        "nothing to answer",
        Code::InvalidArgument,
        "inputs",
        proto::AnswerRequest::default(),
    );
    s.answer(
        "nothing to answer, options set",
        Code::InvalidArgument,
        "inputs",
        with(&answer, |r| {
            r.queries.clear();
            r.inputs.clear();
        }),
    );
    s.answer(
        "65 inputs to score",
        Code::ResourceExhausted,
        "inputs",
        with(&answer, |r| {
            r.inputs = (0..65).map(|_| answer_input("hi", &["a", "b"])).collect()
        }),
    );
    s.answer(
        "17 inputs to generate",
        Code::ResourceExhausted,
        "inputs",
        with(&answer, |r| {
            r.inputs = (0..17).map(|_| answer_input("hi", &[])).collect()
        }),
    );
    s.answer(
        "65 queries to score, no inputs",
        Code::ResourceExhausted,
        "inputs",
        with(&answer, |r| {
            r.inputs.clear();
            r.queries = (0..65)
                .map(|i| query(&format!("q {i}"), &["a", "b"]))
                .collect();
        }),
    );
    s.answer(
        "input blank",
        Code::InvalidArgument,
        "inputs[1].input",
        with(&answer, |r| r.inputs[1].input = "  ".into()),
    );
    s.answer(
        "input over 64 KiB",
        Code::ResourceExhausted,
        "inputs[0].input",
        with(&answer, |r| r.inputs[0].input = long_text(64 * KIB + 1)),
    );
    s.answer(
        "score mode, input without choices",
        Code::InvalidArgument,
        "inputs[1].choices",
        with(&answer, |r| {
            r.mode = proto::AnswerMode::Score as i32;
            r.inputs[1].choices.clear();
        }),
    );
    s.answer(
        "input with 65 choices",
        Code::InvalidArgument,
        "inputs[0].choices",
        with(&answer, |r| r.inputs[0].choices = strings(65, "c")),
    );
    s.answer(
        "input choice over 4096 bytes",
        Code::ResourceExhausted,
        "inputs[0].choices[1]",
        with(&answer, |r| r.inputs[0].choices[1] = long_text(4 * KIB + 1)),
    );
    s.answer(
        "query blank, no inputs",
        Code::InvalidArgument,
        "queries[0].input",
        with(&answer, |r| {
            r.inputs.clear();
            r.queries[0].input = " ".into();
        }),
    );
    s.answer(
        "mode 7",
        Code::InvalidArgument,
        "mode",
        with(&answer, |r| r.mode = 7),
    );
    s.answer(
        "mode -1",
        Code::InvalidArgument,
        "mode",
        with(&answer, |r| r.mode = -1),
    );
    s.answer(
        "score work over max_work_bytes",
        Code::ResourceExhausted,
        "inputs",
        with(&answer, |r| {
            r.inputs = (0..64)
                .map(|i| answer_input(&format!("{i} {}", "y ".repeat(2500)), &["yes", "no"]))
                .collect()
        }),
    );
    s.answer(
        "generate work over max_work_bytes",
        Code::ResourceExhausted,
        "inputs",
        generate_mode(|r| {
            r.inputs = (0..5)
                .map(|i| answer_input(&format!("{i} {}", "z".repeat(60_000)), &[]))
                .collect()
        }),
    );
    s.answer(
        "generate, input and stop strings over 64 KiB",
        Code::ResourceExhausted,
        "inputs[0].input",
        generate_mode(|r| {
            r.inputs[0].input = "w".repeat(63 * 1024);
            r.stop = vec!["v".repeat(256); 16];
        }),
    );
    s.answer(
        "generate, temperature 9",
        Code::InvalidArgument,
        "temperature",
        generate_mode(|r| r.temperature = 9.0),
    );
    s.answer(
        "generate, temperature NaN",
        Code::InvalidArgument,
        "temperature",
        generate_mode(|r| r.temperature = f32::NAN),
    );
    s.answer(
        "generate, max_new_tokens 513",
        Code::InvalidArgument,
        "max_new_tokens",
        generate_mode(|r| r.max_new_tokens = 513),
    );
    s.answer(
        "generate, top_p 1.5",
        Code::InvalidArgument,
        "top_p",
        generate_mode(|r| r.top_p = 1.5),
    );
    s.answer(
        "generate, stop string empty",
        Code::InvalidArgument,
        "stop",
        generate_mode(|r| r.stop = vec![String::new()]),
    );
    s.answer(
        "generate, 17 stop strings",
        Code::InvalidArgument,
        "stop",
        generate_mode(|r| r.stop = (0..17).map(|i| format!("s{i}")).collect()),
    );
    s.answer(
        "generate, stop string over 256 bytes",
        Code::InvalidArgument,
        "stop[1]",
        generate_mode(|r| r.stop = vec!["ok".into(), "u".repeat(257)]),
    );
    s.answer(
        "generate, input blank",
        Code::InvalidArgument,
        "inputs[0].input",
        generate_mode(|r| r.inputs[0].input = "\t".into()),
    );
    // The routing's own checks (valid options: these reach the router).
    s.answer(
        "1025 queries",
        Code::ResourceExhausted,
        "queries",
        with(&answer, |r| {
            r.route = None;
            r.queries = (0..1025)
                .map(|i| query(&format!("query {i}"), &[]))
                .collect();
        }),
    );
    s.answer(
        "query blank beside inputs",
        Code::InvalidArgument,
        lib("queries[1].input"),
        with(&answer, |r| {
            r.route = None;
            r.queries[1].input = " ".into();
        }),
    );
    s.answer(
        "query with 65 choices beside inputs",
        Code::InvalidArgument,
        lib("queries[0].choices"),
        with(&answer, |r| {
            r.route = None;
            r.queries[0].choices = strings(65, "c");
        }),
    );
    // The options are the request's `route` field.
    s.answer(
        "route top_k 1001",
        Code::InvalidArgument,
        "route.top_k",
        answer.clone(),
    );
    s.answer(
        "route strategy 9",
        Code::InvalidArgument,
        "route.strategy",
        with(&answer, |r| r.route.as_mut().unwrap().strategy = 9),
    );
    s.answer(
        "route kind 9",
        Code::InvalidArgument,
        "route.kind",
        with(&answer, |r| r.route.as_mut().unwrap().kind = 9),
    );
    s.answer(
        "route abstain_threshold 1.5",
        Code::InvalidArgument,
        "route.abstain_threshold",
        with(&answer, |r| {
            r.route = Some(proto::RouteOptions {
                abstain_threshold: Some(1.5),
                ..Default::default()
            })
        }),
    );

    // ------------------------------------------------------------ StartTraining
    // The expert exists: whatever the checks let through is FAILED_PRECONDITION, no job.
    let train = proto::StartTrainingRequest {
        expert_id: "spam".into(),
        name: "trained".into(),
        description: "trained in the bad-input suite".into(),
        kind: proto::ExpertKind::Prompt as i32,
        rows: instances(&sms, 20, 3),
        task_description: sms.info.description.clone(),
        labels: sms.info.labels.clone(),
        recipe: Some(proto::TrainingRecipe {
            steps: Some(5),
            batch_size: Some(4),
            warmup_steps: Some(1),
            held_out_fraction: Some(0.2),
            max_eval_rows: Some(4),
            instances: Some(10),
            ..Default::default()
        }),
        new_version: false,
        ensemble_size: 0,
    };
    assert!(train
        .rows
        .iter()
        .all(|r| r.target.is_some() && !r.choices.is_empty()));
    let recipe = |change: fn(&mut proto::TrainingRecipe)| {
        with(&train, |r| change(r.recipe.as_mut().unwrap()))
    };
    let lora_recipe = |change: fn(&mut proto::TrainingRecipe)| {
        with(&train, |r| {
            r.kind = proto::ExpertKind::Lora as i32;
            change(r.recipe.as_mut().unwrap());
        })
    };
    for (name, id) in [
        ("expert_id empty", String::new()),
        ("expert_id with a space", "no spaces allowed".to_string()),
        ("expert_id ../x", "../x".to_string()),
        ("expert_id of 129 characters", "t".repeat(129)),
        ("expert_id of 16 KiB", huge_id.clone()),
    ] {
        s.start(
            name,
            Code::InvalidArgument,
            "expert_id",
            with(&train, |r| r.expert_id = id),
        );
    }
    s.start(
        "existing expert without new_version",
        Code::FailedPrecondition,
        "expert_id",
        train.clone(),
    );
    s.start(
        "kind unspecified",
        Code::InvalidArgument,
        "kind",
        with(&train, |r| r.kind = 0),
    );
    s.start(
        "kind 9",
        Code::InvalidArgument,
        "kind",
        with(&train, |r| r.kind = 9),
    );
    s.start(
        "kind -1",
        Code::InvalidArgument,
        "kind",
        with(&train, |r| r.kind = -1),
    );
    for (name, field, change) in [
        (
            "steps 0",
            "recipe.steps",
            (|r: &mut proto::TrainingRecipe| r.steps = Some(0)) as fn(&mut proto::TrainingRecipe),
        ),
        ("steps 100001", "recipe.steps", |r| r.steps = Some(100_001)),
        ("steps u32::MAX", "recipe.steps", |r| {
            r.steps = Some(u32::MAX)
        }),
        ("batch_size 0", "recipe.batch_size", |r| {
            r.batch_size = Some(0)
        }),
        ("batch_size 513", "recipe.batch_size", |r| {
            r.batch_size = Some(513)
        }),
        ("learning_rate negative", "recipe.learning_rate", |r| {
            r.learning_rate = Some(-0.01)
        }),
        ("learning_rate 0", "recipe.learning_rate", |r| {
            r.learning_rate = Some(0.0)
        }),
        ("learning_rate NaN", "recipe.learning_rate", |r| {
            r.learning_rate = Some(f64::NAN)
        }),
        ("learning_rate 2", "recipe.learning_rate", |r| {
            r.learning_rate = Some(2.0)
        }),
        ("warmup_steps past steps", "recipe.warmup_steps", |r| {
            r.warmup_steps = Some(6)
        }),
        ("weight_decay negative", "recipe.weight_decay", |r| {
            r.weight_decay = Some(-0.1)
        }),
        ("weight_decay NaN", "recipe.weight_decay", |r| {
            r.weight_decay = Some(f64::NAN)
        }),
        ("weight_decay 2", "recipe.weight_decay", |r| {
            r.weight_decay = Some(2.0)
        }),
        ("max_grad_norm negative", "recipe.max_grad_norm", |r| {
            r.max_grad_norm = Some(-1.0)
        }),
        ("max_grad_norm infinite", "recipe.max_grad_norm", |r| {
            r.max_grad_norm = Some(f64::INFINITY)
        }),
        ("held_out_fraction 0.9", "recipe.held_out_fraction", |r| {
            r.held_out_fraction = Some(0.9)
        }),
        (
            "held_out_fraction negative",
            "recipe.held_out_fraction",
            |r| r.held_out_fraction = Some(-0.1),
        ),
        ("instances 0", "recipe.instances", |r| r.instances = Some(0)),
        ("instances 10001", "recipe.instances", |r| {
            r.instances = Some(10_001)
        }),
        ("num_virtual_tokens 0", "recipe.num_virtual_tokens", |r| {
            r.num_virtual_tokens = Some(0)
        }),
        ("num_virtual_tokens 513", "recipe.num_virtual_tokens", |r| {
            r.num_virtual_tokens = Some(513)
        }),
        ("micro_batch_tokens 15", "recipe.micro_batch_tokens", |r| {
            r.micro_batch_tokens = Some(15)
        }),
        (
            "micro_batch_tokens 65537",
            "recipe.micro_batch_tokens",
            |r| r.micro_batch_tokens = Some(65_537),
        ),
        ("checkpoint_every 0", "recipe.checkpoint_every", |r| {
            r.checkpoint_every = Some(0)
        }),
        ("prompt_init unknown", "recipe.prompt_init", |r| {
            r.prompt_init = "zeros".repeat(100)
        }),
        (
            "prompt_init text without text",
            "recipe.prompt_init_text",
            |r| {
                r.prompt_init = "text".into();
                r.prompt_init_text = "  ".into();
            },
        ),
    ] {
        s.start(name, Code::InvalidArgument, field, recipe(change));
    }
    for (name, field, change) in [
        (
            "LoRA rank 0",
            "recipe.lora_rank",
            (|r: &mut proto::TrainingRecipe| r.lora_rank = Some(0))
                as fn(&mut proto::TrainingRecipe),
        ),
        ("LoRA rank 257", "recipe.lora_rank", |r| {
            r.lora_rank = Some(257)
        }),
        ("LoRA alpha 0", "recipe.lora_alpha", |r| {
            r.lora_alpha = Some(0.0)
        }),
        ("LoRA alpha negative", "recipe.lora_alpha", |r| {
            r.lora_alpha = Some(-8.0)
        }),
        ("LoRA alpha NaN", "recipe.lora_alpha", |r| {
            r.lora_alpha = Some(f64::NAN)
        }),
        ("LoRA target lm_head", "recipe.lora_targets", |r| {
            r.lora_targets = vec!["lm_head".into()]
        }),
        (
            "LoRA targets with one unknown",
            "recipe.lora_targets",
            |r| r.lora_targets = vec!["q_proj".into(), "nope_proj".into()],
        ),
    ] {
        s.start(name, Code::InvalidArgument, field, lora_recipe(change));
    }
    s.start(
        "no rows",
        Code::InvalidArgument,
        "rows",
        with(&train, |r| r.rows.clear()),
    );
    s.start(
        "row input blank",
        Code::InvalidArgument,
        "rows[3].input",
        with(&train, |r| r.rows[3].input = "  ".into()),
    );
    s.start(
        "row without a target",
        Code::InvalidArgument,
        "rows[1].target",
        with(&train, |r| r.rows[1].target = None),
    );
    s.start(
        "row target blank",
        Code::InvalidArgument,
        "rows[1].target",
        with(&train, |r| r.rows[1].target = Some(" ".into())),
    );
    s.start(
        "row target not among its choices",
        Code::InvalidArgument,
        "rows[2].target",
        with(&train, |r| r.rows[2].target = Some("maybe".into())),
    );
    s.start(
        "row input over 64 KiB",
        Code::ResourceExhausted,
        "rows[0].input",
        with(&train, |r| r.rows[0].input = long_text(64 * KIB + 1)),
    );
    s.start(
        "row target over 64 KiB",
        Code::ResourceExhausted,
        "rows[0].target",
        with(&train, |r| {
            let t = long_text(64 * KIB + 1);
            r.rows[0].choices = vec![t.clone(), "ham".into()];
            r.rows[0].target = Some(t);
        }),
    );
    s.start(
        "row with 65 choices",
        Code::InvalidArgument,
        "rows[0].choices",
        with(&train, |r| {
            let target = r.rows[0].target.clone().unwrap();
            r.rows[0].choices = strings(64, "c");
            r.rows[0].choices.push(target);
        }),
    );
    s.start(
        "row choice over 4096 bytes",
        Code::ResourceExhausted,
        "rows[0].choices[1]",
        with(&train, |r| {
            let target = r.rows[0].target.clone().unwrap();
            r.rows[0].choices = vec![target, long_text(4 * KIB + 1)];
        }),
    );
    {
        // 100,001 rows in one message, made when the case runs.
        let base = train.clone();
        let mut training = s.c.training.clone();
        s.push(
            "StartTraining: 100001 rows",
            Code::ResourceExhausted,
            "rows",
            async move {
                let mut r = base;
                r.rows = (0..=roe_trainer::data::MAX_ROWS)
                    .map(|i| instance(&format!("r{i}"), Some("ham"), &["ham", "spam"]))
                    .collect();
                done(training.start_training(r).await)
            },
        );
    }
    s.start(
        "class-label init without description or labels",
        Code::InvalidArgument,
        "task_description",
        with(&train, |r| {
            r.task_description.clear();
            r.labels.clear();
        }),
    );
    s.start(
        "ensemble_size 9",
        Code::InvalidArgument,
        "ensemble_size",
        with(&train, |r| r.ensemble_size = 9),
    );
    s.start(
        "ensemble_size u32::MAX",
        Code::InvalidArgument,
        "ensemble_size",
        with(&train, |r| r.ensemble_size = u32::MAX),
    );
    s.start(
        "name over 1024 bytes",
        Code::InvalidArgument,
        "name",
        with(&train, |r| r.name = long_text(KIB + 1)),
    );
    s.start(
        "description over 64 KiB",
        Code::InvalidArgument,
        "description",
        with(&train, |r| r.description = long_text(64 * KIB + 1)),
    );

    // ------------------------------------------------------------ StartTrainingStream
    let train_header = train_stream(&with(&train, |r| r.rows.clear())).swap_remove(0);
    let train_row = |input: &str| {
        train_chunk(TrainPart::Row(instance(
            input,
            Some("spam"),
            &["ham", "spam"],
        )))
    };
    s.start_stream(
        "empty stream",
        Code::InvalidArgument,
        "stream",
        tokio_stream::iter(Vec::new()),
    );
    s.start_stream(
        "first message a row",
        Code::InvalidArgument,
        "stream",
        tokio_stream::iter(vec![train_row("x"), train_header.clone()]),
    );
    s.start_stream(
        "first message without a part",
        Code::InvalidArgument,
        "stream",
        tokio_stream::iter(vec![proto::StartTrainingChunk { part: None }]),
    );
    s.start_stream(
        "second header",
        Code::InvalidArgument,
        "stream",
        tokio_stream::iter(vec![train_header.clone(), train_header.clone()]),
    );
    s.start_stream(
        "message without a part after the header",
        Code::InvalidArgument,
        "stream",
        tokio_stream::iter(vec![
            train_header.clone(),
            proto::StartTrainingChunk { part: None },
        ]),
    );
    s.start_stream(
        "streamed row without a target",
        Code::InvalidArgument,
        "rows[7].target",
        tokio_stream::iter(train_stream(&with(&train, |r| r.rows[7].target = None))),
    );
    s.start_stream(
        "header with a bad recipe",
        Code::InvalidArgument,
        "recipe.steps",
        tokio_stream::iter(train_stream(&recipe(|r| r.steps = Some(0)))),
    );
    s.start_stream(
        "header with a bad expert_id",
        Code::InvalidArgument,
        "expert_id",
        tokio_stream::iter(train_stream(&with(&train, |r| r.expert_id = "a//b".into()))),
    );
    s.start_stream(
        "header without rows, none streamed",
        Code::InvalidArgument,
        "rows",
        tokio_stream::iter(vec![train_header.clone()]),
    );
    s.start_stream(
        "existing expert without new_version",
        Code::FailedPrecondition,
        "expert_id",
        tokio_stream::iter(train_stream(&train)),
    );
    s.start_stream(
        "100001 streamed rows",
        Code::ResourceExhausted,
        "rows",
        tokio_stream::iter(
            std::iter::once(train_header.clone())
                .chain((0..=roe_trainer::data::MAX_ROWS).map(move |i| train_row(&format!("r{i}")))),
        ),
    );

    // ------------------------------------------------------------ jobs
    s.get_job("unknown job", Code::NotFound, "training job", "nope".into());
    s.get_job(
        "job id of 16 KiB",
        Code::NotFound,
        "training job",
        huge_id.clone(),
    );
    s.get_job(
        "job id empty",
        Code::InvalidArgument,
        "job_id",
        String::new(),
    );
    s.cancel_job("unknown job", Code::NotFound, "training job", "nope".into());
    s.cancel_job(
        "job id empty",
        Code::InvalidArgument,
        "job_id",
        String::new(),
    );
    s.watch_job("unknown job", Code::NotFound, "training job", "nope".into());
    s.watch_job(
        "job id of 16 KiB",
        Code::NotFound,
        "training job",
        huge_id.clone(),
    );
    s.watch_job(
        "job id empty",
        Code::InvalidArgument,
        "job_id",
        String::new(),
    );

    // ------------------------------------------------------------ run
    let cases = std::mem::take(&mut s.cases);
    drop(s);
    let total = cases.len();
    let mut names = HashSet::new();
    for case in &cases {
        assert!(
            names.insert(case.name.clone()),
            "case {:?} twice",
            case.name
        );
    }
    let mut baseline = snapshot(&mut c).await.expect("snapshot before the cases");
    assert_eq!(baseline.experts.len(), 2);
    assert!(baseline.jobs.is_empty(), "{:?}", baseline.jobs);
    let mut failures = Vec::new();
    for case in cases {
        let Case {
            name,
            code,
            field,
            call,
        } = case;
        match tokio::time::timeout(Duration::from_secs(120), call).await {
            Err(_) => failures.push(format!("{name}: no answer within 120 s")),
            Ok(outcome) => {
                if let Some(wrong) = verdict(code, &field, outcome) {
                    failures.push(format!(
                        "{name}: expected {code:?} starting {field:?}: {wrong}"
                    ));
                }
            }
        }
        // The server still answers, and nothing stored changed.
        match snapshot(&mut c).await {
            Err(e) => failures.push(format!(
                "{name}: the server no longer answers ListExperts/GetExpert/ListTrainingJobs: \
                 {e:?}"
            )),
            Ok(now) if now != baseline => {
                failures.push(format!(
                    "{name}: stored data changed: {}",
                    now.changes_since(&baseline)
                ));
                baseline = restore(&mut c, &baseline, now).await;
            }
            Ok(_) => {}
        }
    }

    // What the code does with two requests that are not refused: a routing that excludes
    // every expert abstains; a page token that names no expert is a place to resume from.
    match c
        .router
        .route(proto::RouteRequest {
            queries: queries(&sms, 4, 2),
            options: Some(proto::RouteOptions {
                exclude: vec!["spam".into(), "qt".into()],
                ..Default::default()
            }),
            min_library_seq: 0,
        })
        .await
    {
        Ok(r) => {
            let r = r.into_inner();
            if !r.abstain || !r.expert_id.is_empty() {
                failures.push(format!(
                    "Route excluding every expert: expected an abstention, got {r:?}"
                ));
            }
        }
        Err(e) => failures.push(format!(
            "Route excluding every expert: expected an abstention, got {e:?}"
        )),
    }
    match c
        .lib
        .list_experts(proto::ListExpertsRequest {
            page_size: 10,
            page_token: "~~~ no such expert".into(),
            min_library_seq: 0,
        })
        .await
    {
        Ok(r) => {
            let r = r.into_inner();
            if !r.experts.is_empty() || !r.next_page_token.is_empty() {
                failures.push(format!(
                    "ListExperts after a token past every id: expected an empty last page, got \
                     {:?}",
                    r.experts.iter().map(|e| &e.id).collect::<Vec<_>>()
                ));
            }
        }
        Err(e) => failures.push(format!(
            "ListExperts with a page token that names no expert: {e:?}"
        )),
    }
    drop(c);
    server.stop().await;

    assert!(total >= 160, "only {total} cases");
    assert!(
        failures.is_empty(),
        "{} of {total} bad-input cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
