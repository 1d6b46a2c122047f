//! Training on the real backbone: the loss goes down for both kinds, and a short prompt
//! recipe beats the bare backbone on held-out rows of a task.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use roe_backbone::Backbone;
use roe_expert_library::ExpertKind;
use roe_trainer::data::{self, EvalMetric, TaskSpec};
use roe_trainer::train::{self, RunnableAdapter};
use roe_trainer::{Params, Recipe, TrainState};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn backbone() -> Arc<Backbone> {
    let p = root().join("models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "backbone GGUF not found at {} (run scripts/fetch-models.sh)",
        p.display()
    );
    Arc::new(Backbone::load(p, None).expect("backbone"))
}

fn task(name: &str) -> (TaskSpec, roe_task_suite::Task) {
    let t = roe_task_suite::Task::load(root().join("assets/tasks").join(name)).expect("task");
    (
        TaskSpec {
            description: t.info.description.clone(),
            labels: t.info.labels.clone(),
        },
        t,
    )
}

fn train_steps(
    bb: &Backbone,
    recipe: &Recipe,
    spec: &TaskSpec,
    rows: &[roe_expert_library::Instance],
) -> TrainState {
    let rendered = data::render(bb, rows).unwrap();
    let mut state = TrainState::new(Params::init(bb, recipe, spec).unwrap());
    let started = Instant::now();
    train::run(bb, recipe, &rendered, &mut state, &|| false, &mut |r, _| {
        eprintln!(
            "step {}/{} loss {:.4} lr {:.5} grad {:.3} {:.0} tok/s",
            r.step, r.total_steps, r.loss, r.learning_rate, r.grad_norm, r.tokens_per_s
        );
        Ok(())
    })
    .unwrap();
    eprintln!(
        "{:?}: {} steps in {:.1} s",
        recipe.kind,
        recipe.steps,
        started.elapsed().as_secs_f64()
    );
    state
}

#[test]
fn losses_fall_for_prompt_and_lora_training() {
    let bb = backbone();
    let (spec, t) = task("sms_spam");
    for kind in [ExpertKind::Prompt, ExpertKind::Lora] {
        let mut recipe = Recipe::defaults(kind);
        recipe.steps = 8;
        recipe.warmup_steps = 2;
        recipe.batch_size = 8;
        let state = train_steps(&bb, &recipe, &spec, &t.train[..64]);
        let l = &state.losses;
        let first = l[0];
        let last = l[l.len() - 2..].iter().sum::<f64>() / 2.0;
        // LoRA starts at B = 0 (the bare backbone) with a 15x smaller learning rate.
        let bound = if kind == ExpertKind::Prompt {
            0.5
        } else {
            0.85
        };
        assert!(last < bound * first, "{kind:?}: losses {l:?}");
    }
}

#[test]
fn a_short_prompt_recipe_beats_the_bare_backbone() {
    let bb = backbone();
    let (spec, t) = task("sms_spam");
    let mut recipe = Recipe::defaults(ExpertKind::Prompt);
    recipe.steps = 10;
    recipe.warmup_steps = 2;
    recipe.batch_size = 8;
    let state = train_steps(&bb, &recipe, &spec, &t.train[..200]);
    let adapter = state.params.to_peft(&bb, "smollm2-135m").unwrap();
    let runnable = RunnableAdapter::from_peft(&bb, ExpertKind::Prompt, &adapter).unwrap();
    let test = &t.test[..40];
    let trained =
        train::evaluate(&bb, Some(&runnable), test, EvalMetric::Accuracy, &|| false).unwrap();
    let bare = train::evaluate(&bb, None, test, EvalMetric::Accuracy, &|| false).unwrap();
    eprintln!("sms_spam: trained {trained:.3}, bare {bare:.3}");
    assert!(trained > bare + 0.2, "trained {trained} vs bare {bare}");
}
