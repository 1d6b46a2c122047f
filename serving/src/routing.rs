//! Routing as the serving core reaches it: a client's option overrides, resolved against the
//! server's defaults, and the [`RouteService`] that answers — the library of this process
//! ([`LocalRouter`]) or a router served by another (the gRPC client in `roe-services`).

use std::sync::Arc;

use roe_expert_library::retrieval::Aggregation;
use roe_expert_library::{
    ExpertKind, ExpertLibrary, Query, RouteOptions, RouteResult, Strategy, TextFormat,
};

use crate::error::{blocking_while_wanted, Result, ServingError};

/// The route options a client set; None (or empty) takes the server's default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteOverrides {
    pub strategy: Option<Strategy>,
    pub top_k: Option<u32>,
    pub aggregation: Option<Aggregation>,
    pub text_format: Option<TextFormat>,
    pub kind: Option<ExpertKind>,
    pub exclude: Vec<String>,
    pub abstain_threshold: Option<f32>,
    pub exact: bool,
    pub evidence_per_query: Option<u32>,
}

/// Largest `top_k` a request may ask for.
pub const MAX_TOP_K: u32 = 1000;
/// Largest `evidence_per_query` a request may ask for.
pub const MAX_EVIDENCE_PER_QUERY: u32 = 100;

impl RouteOverrides {
    /// The options to route with: these overrides on top of `defaults` — or on top of ELM's
    /// own defaults when ELM is asked for by name on a server that defaults to another
    /// strategy. Field names in errors are the request's (`options.top_k`).
    pub fn resolve(&self, defaults: &RouteOptions) -> Result<RouteOptions> {
        let strategy = self.strategy.unwrap_or(defaults.strategy);
        let base = if strategy == Strategy::Elm && defaults.strategy != Strategy::Elm {
            RouteOptions::elm(defaults.text_format)
        } else {
            defaults.clone()
        };
        if self.top_k.is_some_and(|k| k > MAX_TOP_K) {
            return Err(ServingError::invalid(
                "options.top_k",
                format!("at most {MAX_TOP_K}"),
            ));
        }
        if self
            .evidence_per_query
            .is_some_and(|n| n > MAX_EVIDENCE_PER_QUERY)
        {
            return Err(ServingError::invalid(
                "options.evidence_per_query",
                format!("at most {MAX_EVIDENCE_PER_QUERY}"),
            ));
        }
        let abstain_threshold = match self.abstain_threshold {
            Some(t) if !(0.0..=1.0).contains(&t) => {
                return Err(ServingError::invalid(
                    "options.abstain_threshold",
                    "must be within [0, 1]",
                ))
            }
            Some(t) => t,
            None => base.abstain_threshold,
        };
        Ok(RouteOptions {
            strategy,
            top_k: self.top_k.map_or(base.top_k, |k| k as usize),
            aggregation: self.aggregation.unwrap_or(base.aggregation),
            text_format: self.text_format.unwrap_or(base.text_format),
            kind: self.kind,
            exclude: self.exclude.clone(),
            abstain_threshold,
            exact: self.exact,
            hybrid: base.hybrid,
            evidence_per_query: self
                .evidence_per_query
                .map_or(base.evidence_per_query, |n| n as usize),
        })
    }
}

/// Something that routes a task given by example queries.
#[async_trait::async_trait]
pub trait RouteService: Send + Sync + 'static {
    /// Routes as `roe.v1.Router/Route` does (same checks, same errors).
    async fn route(&self, queries: Vec<Query>, options: RouteOverrides) -> Result<RouteResult>;

    /// The abstain threshold applied when a request leaves it unset, if this side knows it
    /// (only used to explain a fallback).
    fn default_abstain_threshold(&self) -> Option<f32> {
        None
    }
}

/// Routes over the library of this process with the server's defaults.
pub struct LocalRouter {
    library: Arc<ExpertLibrary>,
    defaults: RouteOptions,
}

impl LocalRouter {
    pub fn new(library: Arc<ExpertLibrary>, defaults: RouteOptions) -> Self {
        Self { library, defaults }
    }
}

#[async_trait::async_trait]
impl RouteService for LocalRouter {
    async fn route(&self, queries: Vec<Query>, options: RouteOverrides) -> Result<RouteResult> {
        let options = options.resolve(&self.defaults)?;
        let library = self.library.clone();
        blocking_while_wanted(move |wanted| Ok(library.route_while(&queries, &options, wanted)?))
            .await
    }

    fn default_abstain_threshold(&self) -> Option<f32> {
        Some(self.defaults.abstain_threshold)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_apply_on_the_defaults_and_elm_brings_its_own() {
        let defaults = RouteOptions::default();
        assert_eq!(
            RouteOverrides::default().resolve(&defaults).unwrap(),
            defaults
        );
        let elm = RouteOverrides {
            strategy: Some(Strategy::Elm),
            ..Default::default()
        }
        .resolve(&defaults)
        .unwrap();
        assert_eq!(elm, RouteOptions::elm(defaults.text_format));
        let mine = RouteOverrides {
            top_k: Some(3),
            abstain_threshold: Some(0.4),
            exclude: vec!["x".into()],
            ..Default::default()
        }
        .resolve(&defaults)
        .unwrap();
        assert_eq!((mine.top_k, mine.abstain_threshold), (3, 0.4));
        assert_eq!(mine.exclude, vec!["x".to_string()]);
        for (bad, field) in [
            (
                RouteOverrides {
                    top_k: Some(MAX_TOP_K + 1),
                    ..Default::default()
                },
                "options.top_k",
            ),
            (
                RouteOverrides {
                    abstain_threshold: Some(1.5),
                    ..Default::default()
                },
                "options.abstain_threshold",
            ),
            (
                RouteOverrides {
                    evidence_per_query: Some(101),
                    ..Default::default()
                },
                "options.evidence_per_query",
            ),
        ] {
            let e = bad.resolve(&defaults).unwrap_err();
            assert!(e.message.starts_with(field), "{e}");
        }
    }
}
