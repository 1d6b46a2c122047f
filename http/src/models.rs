//! `GET /v1/models` and `GET /v1/models/{id}`: every expert of the library (its backbone as
//! `parent`), the bare backbone as `base`, and `auto`, the router.

use axum::extract::{Path, State};
use axum::Json;
use roe_expert_library::{ExpertKind, ExpertMeta};

use crate::error::{ApiError, ApiResult};
use crate::openai::{Model, ModelList, AUTO_MODEL, BASE_MODEL};
use crate::HttpState;

/// Experts listed per library page while a model list is built.
const PAGE: usize = 1000;

fn expert_model(m: &ExpertMeta) -> Model {
    Model {
        id: m.id.clone(),
        object: "model",
        created: m.created_at_unix_ms / 1000,
        owned_by: "roe".into(),
        parent: Some(m.backbone.clone()),
        root: m.backbone.clone(),
        kind: match m.kind {
            ExpertKind::Prompt => "prompt",
            ExpertKind::Lora => "lora",
        },
    }
}

fn base_model(state: &HttpState) -> Model {
    Model {
        id: BASE_MODEL.into(),
        object: "model",
        created: state.started_unix,
        owned_by: "roe".into(),
        parent: None,
        root: state.backbone.clone(),
        kind: "backbone",
    }
}

fn auto_model(state: &HttpState) -> Model {
    Model {
        id: AUTO_MODEL.into(),
        object: "model",
        created: state.started_unix,
        owned_by: "roe".into(),
        parent: Some(state.backbone.clone()),
        root: state.backbone.clone(),
        kind: "router",
    }
}

pub async fn list(State(state): State<HttpState>) -> ApiResult<Json<ModelList>> {
    let library = state.library.clone();
    let experts = tokio::task::spawn_blocking(move || {
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let (page, more) = library.list(after.as_deref(), PAGE)?;
            after = page.last().map(|m| m.id.clone());
            all.extend(page.iter().map(expert_model));
            if !more {
                return Ok::<_, roe_expert_library::LibraryError>(all);
            }
        }
    })
    .await
    .map_err(|e| ApiError::from(roe_serving::ServingError::internal(e.to_string())))??;
    let mut data = vec![base_model(&state), auto_model(&state)];
    data.extend(experts);
    Ok(Json(ModelList {
        object: "list",
        data,
    }))
}

pub async fn get(State(state): State<HttpState>, Path(id): Path<String>) -> ApiResult<Json<Model>> {
    match id.as_str() {
        BASE_MODEL => return Ok(Json(base_model(&state))),
        AUTO_MODEL => return Ok(Json(auto_model(&state))),
        _ => {}
    }
    // An id no expert could have is the caller's mistake (400), not a missing model (404).
    roe_serving::check_expert_id("id", &id)?;
    let library = state.library.clone();
    let meta = tokio::task::spawn_blocking(move || library.get(&id))
        .await
        .map_err(|e| ApiError::from(roe_serving::ServingError::internal(e.to_string())))?
        .map_err(|e| match e {
            roe_expert_library::LibraryError::NotFound { .. } => {
                ApiError::not_found("model", e.to_string())
            }
            e => ApiError::from(e),
        })?;
    Ok(Json(expert_model(&meta)))
}
