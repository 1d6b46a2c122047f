//! The serving core's queues and cache against a fake backend: what a real model cannot show
//! on demand — a worker that panics, a batch that fails, a slow step — and the batching
//! decisions, counted exactly.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use roe_backbone::{ChoiceScore, FinishReason, GeneratedToken, ScoreOutput};
use roe_expert_library::{ExpertKind, PeftAdapter};
use roe_serving::{
    Backend, EnsembleRequest, ErrorKind, ExpertRef, ExpertSource, GenerateOptions, GenerateRequest,
    GenerationBatch, GenerationInput, Inference, PromptCount, Result, ScoreInput, ScoreRequest,
    ServingConfig, ServingError, TokenStream,
};

/// Inputs that make the fake misbehave.
const PANIC: &str = "panic";
const FAIL: &str = "fail";
/// An input that takes one 100 ms "forward pass" of its own.
const SLOW: &str = "slow";

#[derive(Default)]
struct Fake {
    /// Sizes of the score batches run.
    score_batches: Mutex<Vec<usize>>,
    /// Inputs actually scored (a withdrawn one is not).
    scored: AtomicUsize,
    loads: AtomicUsize,
}

impl Backend for Fake {
    type Expert = String;
    type Generation<'a> = FakeGeneration;

    fn load_expert(&self, _kind: ExpertKind, adapter: &PeftAdapter) -> Result<String> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(50));
        if adapter.config_json == "unusable" {
            return Err(ServingError::precondition("unusable adapter"));
        }
        Ok(adapter.config_json.clone())
    }

    fn score_batch(&self, inputs: &[ScoreInput<'_, String>]) -> Result<Vec<Option<ScoreOutput>>> {
        self.score_batches.lock().push(inputs.len());
        if inputs.iter().any(|i| i.input == PANIC) {
            panic!("fake scoring panic");
        }
        if inputs.iter().any(|i| i.input == FAIL) {
            return Err(ServingError::invalid("input", "the fake refuses it"));
        }
        Ok(inputs
            .iter()
            .map(|i| {
                // As the real backend, asked before each pass that would hold the input.
                if (i.withdrawn)() {
                    return None;
                }
                if i.input == SLOW {
                    std::thread::sleep(Duration::from_millis(100));
                }
                self.scored.fetch_add(1, Ordering::SeqCst);
                // The expert's name picks the choice: its length modulo the choices.
                let best = i.expert.map_or(0, |e| e.len() % i.choices.len());
                Some(ScoreOutput {
                    choices: (0..i.choices.len())
                        .map(|c| ChoiceScore {
                            sum_logprob: if c == best { -1.0 } else { -5.0 },
                            mean_logprob: if c == best { -1.0 } else { -5.0 },
                            num_tokens: 1,
                        })
                        .collect(),
                    best,
                    best_by_mean: best,
                    alt_end_sums: Vec::new(),
                    // A word is a token here; `keep` cuts the prompt from the front.
                    prompt_tokens: words(i.input).min(i.keep.unwrap_or(usize::MAX)),
                    truncated_tokens: words(i.input).saturating_sub(i.keep.unwrap_or(usize::MAX)),
                })
            })
            .collect())
    }

    fn generation(&self) -> FakeGeneration {
        FakeGeneration { rows: Vec::new() }
    }

    fn chat_prompt(&self, messages: &[roe_backbone::ChatMessage]) -> Result<String> {
        Ok(messages.iter().map(|m| m.content.as_str()).collect())
    }

    fn count_tokens(
        &self,
        input: &str,
        _format: roe_serving::PromptFormat,
        choices: &[String],
    ) -> Result<PromptCount> {
        Ok(PromptCount {
            prompt: words(input),
            longest_choice: choices.iter().map(|c| words(c)).max().unwrap_or(0),
        })
    }

    fn context_length(&self) -> usize {
        FAKE_CONTEXT
    }

    fn soft_prompt_tokens(&self, _expert: &String) -> usize {
        0
    }
}

/// The fake's context, in words.
const FAKE_CONTEXT: usize = 256;

fn words(text: &str) -> usize {
    text.split_whitespace().count()
}

struct FakeRow {
    input: String,
    left: usize,
    steps: usize,
    finish: Option<FinishReason>,
}

struct FakeGeneration {
    rows: Vec<FakeRow>,
}

impl GenerationBatch<String> for FakeGeneration {
    fn admit(&mut self, inputs: &[GenerationInput<'_, String>]) -> Result<()> {
        if inputs.iter().any(|i| i.input == FAIL) {
            return Err(ServingError::invalid("input", "the fake refuses it"));
        }
        for i in inputs {
            self.rows.push(FakeRow {
                input: i.input.to_string(),
                left: i.params.max_new_tokens,
                steps: 0,
                finish: None,
            });
        }
        Ok(())
    }
    fn retain_unfinished(&mut self) -> Result<Vec<usize>> {
        let kept = (0..self.rows.len())
            .filter(|&r| self.rows[r].finish.is_none())
            .collect::<Vec<_>>();
        self.rows.retain(|r| r.finish.is_none());
        Ok(kept)
    }
    fn len(&self) -> usize {
        self.rows.len()
    }
    fn is_done(&self) -> bool {
        self.rows.iter().all(|r| r.finish.is_some())
    }
    fn finish_reason(&self, row: usize) -> Option<FinishReason> {
        self.rows[row].finish
    }
    fn stop_row(&mut self, row: usize) {
        self.rows[row].finish.get_or_insert(FinishReason::Length);
    }
    fn step(&mut self) -> Result<Vec<Option<GeneratedToken>>> {
        std::thread::sleep(Duration::from_millis(20));
        let mut out = Vec::with_capacity(self.rows.len());
        for row in &mut self.rows {
            if row.finish.is_some() {
                out.push(None);
                continue;
            }
            row.steps += 1;
            if row.input == PANIC && row.steps == 2 {
                panic!("fake generation panic");
            }
            row.left -= 1;
            if row.left == 0 {
                row.finish = Some(FinishReason::Length);
            }
            out.push(Some(GeneratedToken {
                id: row.steps as u32,
                text: format!("{} ", row.steps),
                logprob: -0.5,
                finish: row.finish,
            }));
        }
        Ok(out)
    }
}

/// Experts named by id; the adapter's config is the expert's name.
#[derive(Default)]
struct FakeSource {
    experts: HashMap<String, String>,
}

impl FakeSource {
    fn with(ids: &[(&str, &str)]) -> Arc<Self> {
        Arc::new(Self {
            experts: ids
                .iter()
                .map(|(id, config)| (id.to_string(), config.to_string()))
                .collect(),
        })
    }
    fn meta_of(&self, id: &str) -> Result<ExpertRef> {
        if !self.experts.contains_key(id) {
            return Err(ServingError::new(
                ErrorKind::NotFound,
                format!("expert not found: {id}"),
            ));
        }
        Ok(ExpertRef {
            id: id.into(),
            kind: ExpertKind::Prompt,
            backbone: "fake".into(),
            version: 1,
            weights_sha256: "sha".into(),
            weights_bytes: 10,
        })
    }
}

#[async_trait::async_trait]
impl ExpertSource for FakeSource {
    async fn meta(&self, id: &str) -> Result<ExpertRef> {
        self.meta_of(id)
    }
    async fn adapter(&self, id: &str) -> Result<(ExpertRef, PeftAdapter)> {
        let meta = self.meta_of(id)?;
        Ok((
            meta,
            PeftAdapter {
                config_json: self.experts[id].clone(),
                safetensors: Vec::new(),
            },
        ))
    }
}

fn core(source: Arc<FakeSource>) -> (Arc<Fake>, Arc<Inference<Fake>>) {
    core_with(source, ServingConfig::default())
}

fn core_with(source: Arc<FakeSource>, config: ServingConfig) -> (Arc<Fake>, Arc<Inference<Fake>>) {
    let fake = Arc::new(Fake::default());
    let config = ServingConfig {
        score_batch_wait: Duration::from_millis(30),
        generate_batch_wait: Duration::from_millis(30),
        ..config
    };
    let inference = Arc::new(Inference::start(fake.clone(), source, "fake", config));
    (fake, inference)
}

fn score(expert: &str, input: &str) -> ScoreRequest {
    ScoreRequest {
        expert_id: expert.into(),
        input: input.into(),
        choices: vec!["a".into(), "b".into(), "c".into()],
        truncate: false,
    }
}

fn generate(input: &str, tokens: u32) -> GenerateRequest {
    GenerateRequest {
        expert_id: String::new(),
        input: input.into(),
        format: Default::default(),
        options: GenerateOptions {
            max_new_tokens: tokens,
            seed: Some(1),
            ..Default::default()
        },
        truncate: false,
    }
}

/// Every item of a stream: its texts, and the error that ended it if one did.
async fn drain(mut stream: TokenStream) -> (Vec<String>, Option<ServingError>) {
    let mut texts = Vec::new();
    while let Some(t) = stream.recv().await {
        match t {
            Ok(t) => texts.push(t.text),
            Err(e) => return (texts, Some(e)),
        }
    }
    (texts, None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_scores_share_a_batch_and_a_failure_reaches_only_its_request() {
    let (fake, inference) = core(FakeSource::with(&[("e1", "x"), ("e22", "xx")]));
    // Loaded first, so that all four requests reach the queue within its wait.
    let (a, b) = tokio::join!(inference.check_expert("e1"), inference.check_expert("e22"));
    a.unwrap();
    b.unwrap();
    let mut tasks = Vec::new();
    for (expert, input) in [("e1", "q1"), ("e22", "q2"), ("", "q3"), ("e1", FAIL)] {
        let inference = inference.clone();
        tasks.push(tokio::spawn(async move {
            inference.score(score(expert, input)).await
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    assert_eq!(results[0].as_ref().unwrap().best, 1);
    assert_eq!(results[1].as_ref().unwrap().best, 2);
    assert_eq!(results[2].as_ref().unwrap().best, 0);
    assert_eq!(
        results[3].as_ref().unwrap_err().kind,
        ErrorKind::InvalidArgument
    );
    // One pass for all four, then each alone after it failed.
    assert_eq!(fake.score_batches.lock().clone(), vec![4, 1, 1, 1, 1]);
    // e1 was loaded once for both of its requests.
    assert_eq!(fake.loads.load(Ordering::SeqCst), 2);
}

/// A request dropped while its batch runs (its client went away, its deadline passed) is
/// not worked on past the pass under way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withdrawn_request_stops_at_the_next_pass() {
    let members: Vec<(String, String)> = (0..8)
        .map(|i| (format!("e{i}"), "x".repeat(i + 1)))
        .collect();
    let pairs: Vec<(&str, &str)> = members
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let (fake, inference) = core(FakeSource::with(&pairs));
    let ensemble = |input: &str| EnsembleRequest {
        expert_ids: members.iter().map(|(id, _)| id.clone()).collect(),
        input: input.into(),
        choices: vec!["a".into(), "b".into()],
        truncate: false,
    };
    // Left alone, all eight members are scored.
    inference.score_ensemble(ensemble(SLOW)).await.unwrap();
    assert_eq!(fake.scored.swap(0, Ordering::SeqCst), 8);
    // Dropped after about two passes of the eight.
    let running = {
        let inference = inference.clone();
        let req = ensemble(SLOW);
        tokio::spawn(async move { inference.score_ensemble(req).await })
    };
    tokio::time::sleep(Duration::from_millis(250)).await;
    running.abort();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let scored = fake.scored.load(Ordering::SeqCst);
    assert!(
        (1..8).contains(&scored),
        "{scored} of 8 members scored after the request was dropped"
    );
    // The queue goes on serving.
    assert!(inference.score(score("", "after")).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scoring_panic_is_internal_and_later_requests_are_served() {
    let (_fake, inference) = core(FakeSource::default().into());
    let (alone, panicking) = tokio::join!(
        inference.score(score("", "fine")),
        inference.score(score("", PANIC))
    );
    let e = panicking.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Internal);
    assert!(e.message.contains("fake scoring panic"), "{e}");
    // Its batch-mate was retried alone and answered.
    assert_eq!(alone.unwrap().best, 0);
    assert!(inference.score(score("", "after")).await.is_ok());
    assert!(inference.is_healthy());
    assert!(inference.stats().worker_panics.load(Ordering::Relaxed) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_panic_fails_its_batch_with_internal_and_nothing_hangs() {
    let (_fake, inference) = core(FakeSource::default().into());
    // Two rows start together; the panicking one brings the batch down at its second step.
    let (long, panicking) = tokio::join!(
        inference.generate(generate("long", 50)),
        inference.generate(generate(PANIC, 50))
    );
    let (long, panicking) = (long.unwrap(), panicking.unwrap());
    // A request sent while the batch runs joins it (its inbox), and must not be left there.
    let joining = {
        let inference = inference.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            inference.generate(generate("joiner", 50)).await
        })
    };
    let within = Duration::from_secs(10);
    let (texts, e) = tokio::time::timeout(within, drain(long)).await.unwrap();
    assert_eq!(
        e.expect("an error ends the stream").kind,
        ErrorKind::Internal
    );
    assert!(texts.len() < 50);
    let (_, e) = tokio::time::timeout(within, drain(panicking))
        .await
        .unwrap();
    assert_eq!(e.unwrap().kind, ErrorKind::Internal);
    match tokio::time::timeout(within, joining)
        .await
        .unwrap()
        .unwrap()
    {
        // It joined the batch and was failed with it, or it started after the panic.
        Err(e) => assert_eq!(e.kind, ErrorKind::Internal),
        Ok(stream) => {
            let (texts, e) = tokio::time::timeout(within, drain(stream)).await.unwrap();
            assert!(e.is_none() || e.unwrap().kind == ErrorKind::Internal);
            let _ = texts;
        }
    }
    // Later requests get a batch of their own and are served in full.
    let after = inference.generate(generate("after", 3)).await.unwrap();
    let (texts, e) = tokio::time::timeout(within, drain(after)).await.unwrap();
    assert!(e.is_none(), "{e:?}");
    assert_eq!(texts, vec!["1 ", "2 ", "3 "]);
    assert!(inference.is_healthy());
    assert_eq!(
        inference.stats().active_generations.load(Ordering::Relaxed),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generations_arriving_mid_batch_join_it_and_end_with_their_last_token() {
    let (_fake, inference) = core(FakeSource::default().into());
    let long = inference.generate(generate("long", 40)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let short = inference.generate(generate("short", 2)).await.unwrap();
    let (short_texts, e) = drain(short).await;
    assert!(e.is_none());
    assert_eq!(short_texts, vec!["1 ", "2 "]);
    // The long one is still going when the short one has ended.
    assert!(inference.stats().active_generations.load(Ordering::Relaxed) >= 1);
    let (long_texts, e) = drain(long).await;
    assert!(e.is_none());
    assert_eq!(long_texts.len(), 40);
    let stats = inference.stats();
    assert_eq!(stats.generate_batches.load(Ordering::Relaxed), 1);
    assert_eq!(stats.generate_joined.load(Ordering::Relaxed), 1);

    // With joining off, a late request runs in a batch of its own.
    inference.set_join_running_generations(false);
    let long = inference.generate(generate("long", 10)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(60)).await;
    let short = inference.generate(generate("short", 2)).await.unwrap();
    drain(short).await;
    drain(long).await;
    assert_eq!(stats.generate_batches.load(Ordering::Relaxed), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_admission_reaches_only_its_request() {
    let (_fake, inference) = core(FakeSource::default().into());
    let (ok, refused) = tokio::join!(
        inference.generate(generate("fine", 2)),
        inference.generate(generate(FAIL, 2))
    );
    assert_eq!(refused.unwrap_err().kind, ErrorKind::InvalidArgument);
    let (texts, e) = drain(ok.unwrap()).await;
    assert!(e.is_none());
    assert_eq!(texts.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn experts_resolve_once_and_errors_name_the_member() {
    let (fake, inference) = core(FakeSource::with(&[("a", "aa"), ("bad", "unusable")]));
    let out = inference
        .score_ensemble(EnsembleRequest {
            expert_ids: vec!["a".into(), "".into()],
            input: "q".into(),
            choices: vec!["x".into(), "y".into()],
            truncate: false,
        })
        .await
        .unwrap();
    assert_eq!(out.members.len(), 2);
    assert_eq!(out.vote.votes, vec![2, 0]);
    let e = inference
        .score_ensemble(EnsembleRequest {
            expert_ids: vec!["a".into(), "bad".into()],
            input: "q".into(),
            choices: vec!["x".into()],
            truncate: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::FailedPrecondition);
    assert!(
        e.message.starts_with("expert_ids[1]: expert \"bad\""),
        "{e}"
    );
    let e = inference.score(score("missing", "q")).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert_eq!(fake.loads.load(Ordering::SeqCst), 2);
    // Concurrent cold loads of one expert share one load.
    let (_, fresh) = core(FakeSource::with(&[("c", "ccc")]));
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let fresh = fresh.clone();
        tasks.push(tokio::spawn(
            async move { fresh.score(score("c", "q")).await },
        ));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().best, 0);
    }
    assert_eq!(fresh.stats().expert_loads.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn prompts_past_the_context_are_refused_by_field_or_cut_when_asked() {
    let (fake, inference) = core(FakeSource::with(&[]));
    let long = "word ".repeat(300);
    // Score: 300 tokens, one kept for the longest choice.
    let e = inference.score(score("", &long)).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::ContextLengthExceeded, "{e}");
    assert!(
        e.message
            .starts_with("input: 300 tokens, more than the 255"),
        "{e}"
    );
    assert!(
        e.message.contains("set truncate to keep its last 255"),
        "{e}"
    );
    assert_eq!(fake.scored.load(Ordering::SeqCst), 0, "nothing ran");
    let cut = inference
        .score(ScoreRequest {
            truncate: true,
            ..score("", &long)
        })
        .await
        .unwrap();
    assert_eq!((cut.prompt_tokens, cut.truncated_tokens), (255, 45));
    let whole = inference.score(score("", "a short one")).await.unwrap();
    assert_eq!((whole.prompt_tokens, whole.truncated_tokens), (3, 0));

    // Generate: the prompt leaves room for max_new_tokens.
    let e = inference
        .start_generation(generate(&"word ".repeat(250), 10))
        .await
        .err()
        .expect("refused");
    assert_eq!(e.kind, ErrorKind::ContextLengthExceeded, "{e}");
    assert!(e.message.contains("10 for the new tokens asked for"), "{e}");
    let started = inference
        .start_generation(GenerateRequest {
            truncate: true,
            ..generate(&"word ".repeat(250), 10)
        })
        .await
        .unwrap();
    assert_eq!(started.usage.prompt_tokens, 246);
    assert_eq!(started.usage.truncated_tokens, 4);
    let (texts, error) = drain(started.tokens).await;
    assert!(error.is_none() && !texts.is_empty(), "{error:?}");

    // A per-request budget below the context binds first, and says so.
    let mut config = ServingConfig::default();
    config.limits.max_input_tokens = 100;
    let (_, inference) = core_with(FakeSource::with(&[]), config);
    let e = inference
        .score(score("", &"word ".repeat(150)))
        .await
        .unwrap_err();
    assert!(e.message.contains("max_input_length is 100"), "{e}");
}
