//! The index at scale: synthetic normalised vectors (clustered, like sentence embeddings),
//! against hnswlib on the same vectors, queries and ground truth in the same run: build time,
//! resident memory, and a curve of search latency against recall@10 over several ef_search
//! values; plus the Q=32 queries of one Route searched together.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use roe_expert_library::embedding::normalize;
use roe_expert_library::engine::IndexEngine;
use roe_expert_library::index::{IndexConfig, VectorIndex};
use serde::{Deserialize, Serialize};

/// One ef_search of a curve: single-query latency (one thread) and recall@10.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CurvePoint {
    pub ef_search: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub recall_at_10: f64,
}

/// One index's build and curve.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SideReport {
    pub build_s: f64,
    pub rss_growth_bytes: Option<u64>,
    pub curve: Vec<CurvePoint>,
}

impl SideReport {
    /// The fastest point reaching `recall` (by p50).
    pub fn fastest_at(&self, recall: f64) -> Option<&CurvePoint> {
        self.curve
            .iter()
            .filter(|p| p.recall_at_10 >= recall)
            .min_by(|a, b| a.p50_ms.total_cmp(&b.p50_ms))
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct HnswReport {
    pub vectors: usize,
    pub dim: usize,
    pub clusters: usize,
    pub queries: usize,
    pub max_connections: usize,
    pub ef_construction: usize,
    pub build_threads: usize,
    /// The vectors as f32: the memory goal's unit.
    pub raw_vector_bytes: u64,
    pub roe: SideReport,
    pub roe_index_estimate_bytes: usize,
    pub roe_kernels: Option<String>,
    pub exact_scan_p50_ms: f64,
    /// `search_many` of 32 queries at once (one Route's Q), at the default ef_search.
    pub route_q: usize,
    pub route_ef_search: usize,
    pub route_search_p50_ms: f64,
    pub route_search_p99_ms: f64,
    /// Every engine measured (the first is also `roe` above, for older readers).
    pub engines: Vec<EngineReport>,
    pub hnswlib: Option<SideReport>,
    pub hnswlib_versions: Option<serde_json::Value>,
}

/// One of roe's index engines, built and searched through roe's index.
#[derive(Debug, Clone, Serialize)]
pub struct EngineReport {
    pub engine: IndexEngine,
    pub side: SideReport,
    pub index_estimate_bytes: usize,
    pub kernels: Option<String>,
    /// Live points no graph search can reach, after the build.
    pub unreachable_points: usize,
    pub route_search_p50_ms: f64,
    pub route_search_p99_ms: f64,
}

/// What a run compares against: the hnswlib peer, when a Python with it is given.
pub struct Peer<'a> {
    pub python: &'a Path,
    pub script: &'a Path,
    /// Where the vectors, queries and ground truth are written for it (removed afterwards).
    pub work_dir: &'a Path,
}

/// Queries: perturbed copies of random stored points (like a new text of a stored task).
pub fn synthetic_near(data: &[Vec<f32>], n: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let unit = Normal::new(0.0f32, 1.0).expect("valid normal");
    (0..n)
        .map(|_| {
            let p = &data[rng.random_range(0..data.len())];
            let mut v: Vec<f32> = p
                .iter()
                .map(|x| x + 0.025 * unit.sample(&mut rng))
                .collect();
            normalize(&mut v);
            v
        })
        .collect()
}

pub fn synthetic(n: usize, dim: usize, clusters: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let unit = Normal::new(0.0f32, 1.0).expect("valid normal");
    let centers: Vec<Vec<f32>> = (0..clusters)
        .map(|_| {
            let mut c: Vec<f32> = (0..dim).map(|_| unit.sample(&mut rng)).collect();
            normalize(&mut c);
            c
        })
        .collect();
    (0..n)
        .map(|_| {
            let c = &centers[rng.random_range(0..clusters)];
            let mut v: Vec<f32> = c
                .iter()
                .map(|x| x + 0.025 * unit.sample(&mut rng))
                .collect();
            normalize(&mut v);
            v
        })
        .collect()
}

/// `clusters` sets how many points share a neighbourhood: with a few hundred points per
/// tight cluster, the true top-10 inside a cluster is decided by noise and no graph finds it
/// (recall 0.13 at 1M with 2,000 clusters); sentence embeddings look more like ~20 per cluster.
pub fn run(
    n: usize,
    queries: usize,
    clusters: usize,
    config: IndexConfig,
    ef_sweep: &[usize],
    engines_to_run: &[IndexEngine],
    peer: Option<Peer<'_>>,
) -> Result<HnswReport> {
    let dim = 384;
    // Same seed for the centres of data and queries: queries fall into the data's clusters.
    let data = synthetic(n, dim, clusters, 1);
    let qs = synthetic_near(&data, queries, 2);
    let items: Vec<(u64, &[f32])> = data
        .iter()
        .enumerate()
        .map(|(i, v)| (i as u64, v.as_slice()))
        .collect();
    // The first engine is built before anything else is allocated (its RSS growth is the
    // cleanest), and its rows give the exact ground truth; later engines are measured in
    // the same process after it was dropped.
    let mut engines = Vec::new();
    let mut truth: Vec<Vec<u64>> = Vec::new();
    let mut exact_times: Vec<f64> = Vec::new();
    for &engine in engines_to_run {
        let report = run_engine(
            engine,
            dim,
            &items,
            &qs,
            &mut truth,
            &mut exact_times,
            &config,
            ef_sweep,
        )?;
        engines.push(report);
    }
    let (hnswlib, hnswlib_versions) = match peer {
        None => (None, None),
        Some(peer) => {
            let out = run_hnswlib(&peer, &data, &qs, &truth, &config, ef_sweep)?;
            (Some(out.0), Some(out.1))
        }
    };
    let first = engines
        .first()
        .ok_or_else(|| anyhow!("no engine to measure"))?
        .clone();
    Ok(HnswReport {
        vectors: n,
        dim,
        clusters,
        queries: qs.len(),
        max_connections: config.max_connections,
        ef_construction: config.ef_construction,
        build_threads: rayon::current_num_threads(),
        raw_vector_bytes: (n * dim * 4) as u64,
        roe: first.side.clone(),
        roe_index_estimate_bytes: first.index_estimate_bytes,
        roe_kernels: first.kernels.clone(),
        exact_scan_p50_ms: super::percentile(&exact_times, 0.5),
        route_q: ROUTE_Q,
        route_ef_search: config.ef_search,
        route_search_p50_ms: first.route_search_p50_ms,
        route_search_p99_ms: first.route_search_p99_ms,
        engines,
        hnswlib,
        hnswlib_versions,
    })
}

/// The queries of one Route.
const ROUTE_Q: usize = 32;

/// Builds an index of `engine` over `items` on all cores and measures it.
/// `truth` and `exact_times` are filled by the first engine's index (exact scans of its
/// rows) when empty.
#[allow(clippy::too_many_arguments)]
fn run_engine(
    engine: IndexEngine,
    dim: usize,
    items: &[(u64, &[f32])],
    qs: &[Vec<f32>],
    truth: &mut Vec<Vec<u64>>,
    exact_times: &mut Vec<f64>,
    config: &IndexConfig,
    ef_sweep: &[usize],
) -> Result<EngineReport> {
    let n = items.len();
    let rss0 = super::rss_bytes();
    let mut index = VectorIndex::new(
        dim,
        IndexConfig {
            hnsw_threshold: 0,
            engine,
            ..config.clone()
        },
    );
    eprintln!("{engine}: building over {n} vectors ...");
    let t = Instant::now();
    index.insert(items).context("inserting")?;
    let build_s = t.elapsed().as_secs_f64();
    let rss_growth = match (rss0, super::rss_bytes()) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    if truth.is_empty() {
        eprintln!("{engine}: built in {build_s:.1} s; exact ground truth ...");
        let q_refs: Vec<&[f32]> = qs.iter().map(Vec::as_slice).collect();
        *truth = index
            .search_exact_many(&q_refs, 10, &|_| true)
            .into_iter()
            .map(|hits| hits.into_iter().map(|h| h.point_id).collect())
            .collect();
        *exact_times = qs
            .iter()
            .take(20)
            .map(|q| {
                let t = Instant::now();
                std::hint::black_box(index.search_exact(q, 10, &|_| true));
                t.elapsed().as_secs_f64() * 1000.0
            })
            .collect();
        exact_times.sort_by(|a, b| a.total_cmp(b));
    }
    eprintln!("{engine}: built in {build_s:.1} s; reachability ...");
    let unreachable = index.unreachable_points().len();
    let mut curve = Vec::new();
    for &ef in ef_sweep {
        index.set_ef_search(ef);
        let mut times = Vec::with_capacity(qs.len());
        let mut found = 0usize;
        for (q, want) in qs.iter().zip(truth.iter()) {
            let t = Instant::now();
            let hits = index.search(q, 10, &|_| true);
            times.push(t.elapsed().as_secs_f64() * 1000.0);
            found += hits.iter().filter(|h| want.contains(&h.point_id)).count();
        }
        times.sort_by(|a, b| a.total_cmp(b));
        let point = CurvePoint {
            ef_search: ef,
            p50_ms: super::percentile(&times, 0.5),
            p99_ms: super::percentile(&times, 0.99),
            recall_at_10: found as f64 / (10 * qs.len()) as f64,
        };
        eprintln!("{engine}: {point:?}");
        curve.push(point);
    }
    index.set_ef_search(config.ef_search);
    let q_refs: Vec<&[f32]> = qs.iter().map(Vec::as_slice).collect();
    let mut route_times: Vec<f64> = q_refs
        .chunks(ROUTE_Q)
        .filter(|c| c.len() == ROUTE_Q)
        .map(|chunk| {
            let t = Instant::now();
            std::hint::black_box(index.search_many(chunk, 10, &|_| true));
            t.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    route_times.sort_by(|a, b| a.total_cmp(b));
    Ok(EngineReport {
        engine,
        side: SideReport {
            build_s,
            rss_growth_bytes: rss_growth,
            curve,
        },
        index_estimate_bytes: index.approx_memory_bytes(),
        kernels: index.graph_kernels(),
        unreachable_points: unreachable,
        route_search_p50_ms: super::percentile(&route_times, 0.5),
        route_search_p99_ms: super::percentile(&route_times, 0.99),
    })
}

fn write_f32(path: &Path, rows: &[Vec<f32>]) -> Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for row in rows {
        for x in row {
            out.write_all(&x.to_le_bytes())?;
        }
    }
    out.flush()?;
    Ok(())
}

/// Writes the run's vectors for the peer, runs it, removes them.
fn run_hnswlib(
    peer: &Peer<'_>,
    data: &[Vec<f32>],
    queries: &[Vec<f32>],
    truth: &[Vec<u64>],
    config: &IndexConfig,
    ef_sweep: &[usize],
) -> Result<(SideReport, serde_json::Value)> {
    std::fs::create_dir_all(peer.work_dir)?;
    let file = |name: &str| -> PathBuf { peer.work_dir.join(name) };
    write_f32(&file("data.f32"), data)?;
    write_f32(&file("queries.f32"), queries)?;
    let mut out = std::io::BufWriter::new(std::fs::File::create(file("truth.u32"))?);
    for row in truth {
        for id in row {
            out.write_all(&(*id as u32).to_le_bytes())?;
        }
    }
    out.flush()?;
    drop(out);
    let path = |name: &str| file(name).to_string_lossy().into_owned();
    let input = serde_json::json!({
        "data": path("data.f32"),
        "queries": path("queries.f32"),
        "truth": path("truth.u32"),
        "dim": data.first().map_or(0, Vec::len),
        "m": config.max_connections,
        "ef_construction": config.ef_construction,
        "ef_search": ef_sweep,
        "build_threads": rayon::current_num_threads(),
    });
    let result = super::run_peer(peer.python, peer.script, &input);
    for name in ["data.f32", "queries.f32", "truth.u32"] {
        let _ = std::fs::remove_file(file(name));
    }
    let mut out = result?;
    let versions = out
        .get_mut("versions")
        .map(serde_json::Value::take)
        .unwrap_or_default();
    let side: SideReport = serde_json::from_value(out).context("the hnswlib peer's report")?;
    Ok((side, versions))
}

/// The two curves, p50 latency against recall@10, as a PNG.
pub fn draw_curve(r: &HnswReport, path: &Path) -> Result<()> {
    let with_text = super::eval_chart::load_font();
    let root = BitMapBackend::new(path, (1000, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("chart: {e}"))?;
    let mut series: Vec<(&str, RGBColor, &[CurvePoint])> = r
        .engines
        .iter()
        .map(|e| match e.engine {
            IndexEngine::Graph => (
                "roe graph (own HNSW, bf16 + f32 rescoring)",
                RGBColor(44, 160, 44),
                &e.side.curve[..],
            ),
            IndexEngine::HnswRs => (
                "roe on hnsw_rs 0.3.5 (f32)",
                RGBColor(214, 39, 40),
                &e.side.curve[..],
            ),
        })
        .collect();
    if let Some(h) = &r.hnswlib {
        series.push(("hnswlib 0.8.0", RGBColor(31, 119, 180), &h.curve));
    }
    let all = series.iter().flat_map(|s| s.2.iter());
    let (mut lo_r, mut hi_ms) = (1.0f64, 0.0f64);
    for p in all {
        lo_r = lo_r.min(p.recall_at_10);
        hi_ms = hi_ms.max(p.p50_ms);
    }
    let mut builder = ChartBuilder::on(&root);
    builder.margin(20);
    if with_text {
        builder
            .caption(
                format!(
                    "HNSW search at {} x {}-d, M={}, ef_construction={}: p50 against recall@10",
                    r.vectors, r.dim, r.max_connections, r.ef_construction
                ),
                ("sans-serif", 22),
            )
            .x_label_area_size(50)
            .y_label_area_size(60);
    }
    let mut chart = builder
        .build_cartesian_2d((lo_r - 0.02).max(0.0)..1.0f64, 0f64..hi_ms * 1.1)
        .map_err(|e| anyhow!("chart: {e}"))?;
    if with_text {
        chart
            .configure_mesh()
            .x_desc("recall@10")
            .y_desc("search p50, ms (one query, one thread)")
            .draw()
            .map_err(|e| anyhow!("chart: {e}"))?;
    }
    for (label, color, points) in series {
        let xy: Vec<(f64, f64)> = points.iter().map(|p| (p.recall_at_10, p.p50_ms)).collect();
        let line = chart
            .draw_series(std::iter::once(PathElement::new(
                xy.clone(),
                color.stroke_width(2),
            )))
            .map_err(|e| anyhow!("chart: {e}"))?;
        if with_text {
            line.label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        chart
            .draw_series(xy.iter().map(|p| Circle::new(*p, 4, color.filled())))
            .map_err(|e| anyhow!("chart: {e}"))?;
        if with_text {
            chart
                .draw_series(points.iter().map(|p| {
                    Text::new(
                        format!("ef {}", p.ef_search),
                        (p.recall_at_10, p.p50_ms),
                        ("sans-serif", 13).into_font().color(&color),
                    )
                }))
                .map_err(|e| anyhow!("chart: {e}"))?;
        }
    }
    if with_text {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .label_font(("sans-serif", 16))
            .draw()
            .map_err(|e| anyhow!("chart: {e}"))?;
    }
    root.present().map_err(|e| anyhow!("chart: {e}"))?;
    Ok(())
}
