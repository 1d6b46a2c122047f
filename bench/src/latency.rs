//! Route latency through gRPC on loopback with concurrent clients.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use roe_expert_library::library::ExpertLibrary;
use serde::Serialize;

use roe_services::proto::{self, router_client::RouterClient};
use roe_services::server::ServeOptions;

#[derive(Debug, Clone, Serialize)]
pub struct LatencyReport {
    pub clients: usize,
    pub requests: usize,
    pub queries_per_request: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub mean_ms: f64,
    pub requests_per_s: f64,
}

/// Starts a real server on 127.0.0.1 over `library` and fires `per_client` Route requests from
/// each of `clients` concurrent clients, cycling through `query_sets`.
pub async fn route_latency(
    library: Arc<ExpertLibrary>,
    query_sets: Vec<Vec<proto::Query>>,
    clients: usize,
    per_client: usize,
) -> Result<LatencyReport> {
    let server = super::BenchServer::start(library, ServeOptions::default()).await?;
    let url = server.url.clone();
    let sets = Arc::new(query_sets);
    let q = sets.first().map(|s| s.len()).unwrap_or(0);
    // Warm-up: one request per client connection.
    let started = Instant::now();
    let mut handles = Vec::new();
    for c in 0..clients {
        let url = url.clone();
        let sets = sets.clone();
        handles.push(tokio::spawn(async move {
            let mut client = RouterClient::connect(url).await?;
            let mut times = Vec::with_capacity(per_client);
            for i in 0..=per_client {
                let queries = sets[(c * per_client + i) % sets.len()].clone();
                let t = Instant::now();
                client
                    .route(proto::RouteRequest {
                        min_library_seq: Default::default(),
                        queries,
                        options: None,
                    })
                    .await?;
                if i > 0 {
                    times.push(t.elapsed().as_secs_f64() * 1000.0);
                }
            }
            anyhow::Ok(times)
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await??);
    }
    let wall = started.elapsed().as_secs_f64();
    server.stop().await;
    all.sort_by(|a, b| a.total_cmp(b));
    Ok(LatencyReport {
        clients,
        requests: all.len(),
        queries_per_request: q,
        p50_ms: super::percentile(&all, 0.5),
        p99_ms: super::percentile(&all, 0.99),
        mean_ms: all.iter().sum::<f64>() / all.len().max(1) as f64,
        requests_per_s: (clients * (per_client + 1)) as f64 / wall,
    })
}
