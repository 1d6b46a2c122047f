//! Start-up at scale: a library of `n` stored vectors (synthetic experts of 1,000 instances,
//! written through the real store) is opened twice, each time in a fresh process so that the
//! memory figures are its own: first cold, with no persisted index, which reads every vector
//! from sled and rebuilds the index (HNSW past its threshold) and then persists the graphs;
//! then warm, which reloads them.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use roe_expert_library::embedding::{normalize, Encoder};
use roe_expert_library::expert::{BackboneSpec, ExpertMeta, Instance};
use roe_expert_library::index::IndexConfig;
use roe_expert_library::library::{ExpertLibrary, LibraryConfig};
use roe_expert_library::library_store::{Expect, LibraryStore, Quota};
use roe_expert_library::persist::{dump_bytes, IndexLoad};
use roe_expert_library::store::{SledStore, StoredInstance};
use serde::{Deserialize, Serialize};

use super::routing_accuracy::routing_only_adapter;

/// Stands in for the sentence encoder: the stored vectors are synthetic, and opening a library
/// only checks the encoder's id and dimension.
struct SyntheticEncoder;

impl Encoder for SyntheticEncoder {
    fn id(&self) -> &str {
        "synthetic-384"
    }
    fn dim(&self) -> usize {
        384
    }
    fn embed(&self, texts: &[String]) -> roe_expert_library::Result<Vec<Vec<f32>>> {
        Ok(texts
            .iter()
            .map(|t| {
                let mut v = vec![0.0f32; 384];
                t.bytes()
                    .enumerate()
                    .for_each(|(i, b)| v[(i * 31 + b as usize) % 384] += 1.0);
                normalize(&mut v);
                v
            })
            .collect())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct StartupReport {
    pub vectors: usize,
    pub experts: usize,
    pub write_s: f64,
    /// sled's files, before any index is persisted.
    pub store_bytes: u64,
    /// First open: no persisted index, the graphs are rebuilt (then persisted).
    pub cold: OpenPhase,
    /// Second open: the persisted graphs are reloaded.
    pub warm: OpenPhase,
}

/// One open of the library, in a process of its own.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpenPhase {
    pub vectors: usize,
    pub experts: usize,
    pub open_s: f64,
    /// Of `open_s`, loading or building the index (the rest reads sled).
    pub index_s: f64,
    pub reloaded: bool,
    /// `reloaded`, or why the index was rebuilt.
    pub index: String,
    pub hnsw: bool,
    pub rss_after_open_bytes: Option<u64>,
    pub peak_rss_bytes: Option<u64>,
    /// Persisting the index after opening (cold phase only).
    pub persist_s: Option<f64>,
    /// The persisted index on disk after this phase.
    pub dump_bytes: u64,
    /// Warm phase: Route with Q=32 precomputed query vectors (no encoder time), default
    /// options, one route per probed expert.
    pub route: Option<RouteTiming>,
    /// Warm phase: registering one more expert of 1,000 instances (synthetic encoder).
    pub register_s: Option<f64>,
    /// Warm phase: Route as in `route`, 100 routes idle ...
    #[serde(default)]
    pub route_idle: Option<RouteTiming>,
    /// ... and 100 routes while experts of 1,000 instances register back to back on
    /// another thread (goal: p99 <= 2x idle p99).
    #[serde(default)]
    pub route_while_registering: Option<RouteTiming>,
    /// Experts registered during those routes.
    #[serde(default)]
    pub registered_while_routing: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RouteTiming {
    pub routes: usize,
    pub q: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Routes whose top expert is the one the queries were drawn from.
    pub correct: usize,
}

/// Peak resident memory of this process in bytes (Linux).
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Bytes of the files under `p`.
pub(crate) fn dir_size(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| {
                    let m = e.metadata().ok();
                    match m {
                        Some(m) if m.is_dir() => dir_size(&e.path()),
                        Some(m) => m.len(),
                        None => 0,
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

/// Writes `n` synthetic vectors through the store into `dir`; returns (experts, seconds).
fn write_store(n: usize, dir: &Path) -> Result<(usize, f64)> {
    let t = Instant::now();
    let experts = {
        let store = SledStore::open(dir)?;
        write_synthetic(&store, n, 1000, SyntheticEncoder.id())?
    };
    Ok((experts, t.elapsed().as_secs_f64()))
}

/// Writes `n` synthetic 384-d vectors through `store` (sled or PostgreSQL) as experts
/// `synthetic-00000`, ... of `per_expert` instances each (the last may hold fewer), every one
/// carrying the routing-only prompt adapter; returns how many experts it wrote. The store is
/// first marked as embedded by `encoder_id`: a `roe serve` opening it checks that id against
/// its own encoder's. Expert `e`'s vectors are `hnsw::synthetic(count, 384, clusters, e + 10)`
/// with 20 clusters per 1,000 instances (about 50 vectors per cluster, as sentence embeddings
/// look), so that a reader can regenerate them.
pub fn write_synthetic(
    store: &dyn LibraryStore,
    n: usize,
    per_expert: usize,
    encoder_id: &str,
) -> Result<usize> {
    if per_expert == 0 {
        bail!("per_expert must be at least 1");
    }
    let experts = n.div_ceil(per_expert);
    let clusters = (20 * per_expert / 1000).max(1);
    let spec = BackboneSpec::smollm2_135m();
    let adapter = routing_only_adapter();
    let summary = adapter.validate(&spec)?;
    store.check_encoder(encoder_id)?;
    for e in 0..experts {
        let count = per_expert.min(n - e * per_expert);
        let vectors = super::hnsw::synthetic(count, 384, clusters, e as u64 + 10);
        let id = format!("synthetic-{e:05}");
        let point_ids = store.next_point_ids(vectors.len())?;
        let rows: Vec<StoredInstance> = vectors
            .into_iter()
            .zip(point_ids)
            .enumerate()
            .map(|(i, (v, point_id))| StoredInstance {
                point_id,
                expert_id: id.clone(),
                instance: Instance {
                    input: format!("synthetic instance {i} of {id}"),
                    target: None,
                    choices: vec![],
                },
                embedding: v,
                choice_embedding: None,
            })
            .collect();
        let meta = ExpertMeta {
            id: id.clone(),
            name: id.clone(),
            description: String::new(),
            kind: summary.peft_type().into(),
            backbone: spec.name.clone(),
            version: 1,
            created_at_unix_ms: 0,
            num_instances: rows.len(),
            weights_sha256: adapter.sha256_hex(),
            safetensors_sha256: adapter.safetensors_sha256_hex(),
            weights_bytes: adapter.safetensors.len(),
            adapter: summary.clone(),
            training: None,
        };
        let bytes = adapter.safetensors.len() as u64;
        store.put_expert(
            &meta,
            &adapter,
            &rows,
            Expect::Absent,
            &Quota::unlimited(bytes),
        )?;
    }
    Ok(experts)
}

/// Opens the library in `dir` in this process; with `persist`, persists its index after.
pub fn open_phase(dir: &Path, index: IndexConfig, persist: bool) -> Result<OpenPhase> {
    let t = Instant::now();
    let (library, report) = ExpertLibrary::open(
        dir,
        Arc::new(SyntheticEncoder),
        LibraryConfig {
            index,
            persist_index_on_drop: false,
            ..Default::default()
        },
    )?;
    let open_s = t.elapsed().as_secs_f64();
    let rss_after_open_bytes = super::rss_bytes();
    let persist_s = if persist {
        let t = Instant::now();
        library.persist_index()?;
        Some(t.elapsed().as_secs_f64())
    } else {
        None
    };
    // The warm phase also routes and registers, on the index as it was reloaded.
    let (route, register_s) = if persist {
        (None, None)
    } else {
        let route = time_routes(&library, report.experts, 20)?;
        let t = Instant::now();
        register_one_more(&library, "synthetic-late")?;
        (Some(route), Some(t.elapsed().as_secs_f64()))
    };
    let (route_idle, busy) = if persist {
        (None, None)
    } else {
        eprintln!("routes idle, then while experts register ...");
        let idle = time_routes(&library, report.experts, 100)?;
        (
            Some(idle),
            Some(routes_while_registering(&library, report.experts, 100)?),
        )
    };
    let (route_while_registering, registered_while_routing) = match busy {
        Some((timing, registered)) => (Some(timing), Some(registered)),
        None => (None, None),
    };
    Ok(OpenPhase {
        vectors: report.vectors,
        experts: report.experts,
        open_s,
        index_s: report.index_seconds,
        reloaded: report.index.is_reloaded(),
        index: match &report.index {
            IndexLoad::Reloaded => "reloaded".into(),
            IndexLoad::Rebuilt(reason) => format!("rebuilt: {reason}"),
        },
        hnsw: library.with_state(|s| s.uses_hnsw()),
        rss_after_open_bytes,
        peak_rss_bytes: peak_rss_bytes(),
        persist_s,
        dump_bytes: dump_bytes(dir),
        route,
        register_s,
        route_idle,
        route_while_registering,
        registered_while_routing,
    })
}

/// [`time_routes`] while another thread registers experts of 1,000 instances back to back;
/// returns the routes' timing and how many experts registered meanwhile.
fn routes_while_registering(
    library: &ExpertLibrary,
    experts: usize,
    routes: usize,
) -> Result<(RouteTiming, usize)> {
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let registering = s.spawn(|| -> Result<usize> {
            let mut k = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                register_one_more(library, &format!("synthetic-busy-{k:04}"))?;
                k += 1;
            }
            Ok(k)
        });
        // Let the first registration start before timing.
        std::thread::sleep(std::time::Duration::from_millis(200));
        let timing = time_routes(library, experts, routes);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let registered = registering
            .join()
            .map_err(|_| anyhow::anyhow!("the registering thread panicked"))??;
        Ok((timing?, registered))
    })
}

/// Routes `routes` query sets, each of Q=32 perturbed copies of one stored expert's vectors.
fn time_routes(library: &ExpertLibrary, experts: usize, routes: usize) -> Result<RouteTiming> {
    let q = 32usize;
    let options = roe_expert_library::RouteOptions::default();
    let mut times = Vec::with_capacity(routes);
    let mut correct = 0;
    for r in 0..routes {
        let e = (r * 7919) % experts.max(1);
        let stored = super::hnsw::synthetic(1000, 384, 20, e as u64 + 10);
        let vectors = super::hnsw::synthetic_near(&stored, q, 1000 + r as u64);
        let queries: Vec<roe_expert_library::Query> = (0..q)
            .map(|i| roe_expert_library::Query {
                input: format!("synthetic query {i} of synthetic-{e:05}"),
                choices: vec![],
                target: None,
            })
            .collect();
        let t = Instant::now();
        let routed = library.route_embedded(&queries, &vectors, &options)?;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        let want = format!("synthetic-{e:05}");
        correct += usize::from(routed.ranked.first().is_some_and(|s| s.expert_id == want));
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(RouteTiming {
        routes,
        q,
        p50_ms: super::percentile(&times, 0.5),
        p99_ms: super::percentile(&times, 0.99),
        correct,
    })
}

fn register_one_more(library: &ExpertLibrary, id: &str) -> Result<()> {
    let id = id.to_string();
    let instances = (0..1000)
        .map(|i| Instance {
            input: format!("late instance {i} of {id}"),
            target: None,
            choices: vec![],
        })
        .collect();
    library.register(
        roe_expert_library::NewExpert {
            id: id.clone(),
            name: id,
            description: String::new(),
            backbone: None,
            adapter: routing_only_adapter(),
            instances,
        },
        false,
    )?;
    Ok(())
}

/// Runs `roe-bench startup --phase <phase>` on `dir` in a fresh process and reads its report.
fn open_in_child(dir: &Path, index: &IndexConfig, phase: &str) -> Result<OpenPhase> {
    let exe = std::env::current_exe().context("locating the roe-bench binary")?;
    let out = std::process::Command::new(&exe)
        .args(["startup", "--phase", phase, "--dir"])
        .arg(dir)
        .args(["--m", &index.max_connections.to_string()])
        .args(["--ef-construction", &index.ef_construction.to_string()])
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", exe.display()))?;
    if !out.status.success() {
        bail!("the {phase} open failed ({})", out.status);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("no report from the {phase} open"))?;
    serde_json::from_str(line).with_context(|| format!("parsing the {phase} open's report"))
}

pub fn run(n: usize, dir: &Path, index: IndexConfig) -> Result<StartupReport> {
    let (experts, write_s) = write_store(n, dir)?;
    let store_bytes = dir_size(dir);
    eprintln!("wrote {n} vectors in {write_s:.1} s; cold open (rebuild, then persist) ...");
    let cold = open_in_child(dir, &index, "rebuild")?;
    if cold.reloaded {
        bail!("the cold open reloaded an index: the directory was not fresh");
    }
    eprintln!(
        "cold open {:.1} s, persist {:.1} s; warm open (reload) ...",
        cold.open_s,
        cold.persist_s.unwrap_or(f64::NAN)
    );
    let warm = open_in_child(dir, &index, "reload")?;
    if cold.hnsw && !warm.reloaded {
        bail!(
            "the warm open did not reload the persisted index: {}",
            warm.index
        );
    }
    Ok(StartupReport {
        vectors: warm.vectors,
        experts,
        write_s,
        store_bytes,
        cold,
        warm,
    })
}
