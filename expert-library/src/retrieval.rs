//! Retrieval of Experts: Q example queries of a task in, experts ranked out.
//!
//! Two strategies share one pipeline:
//! - [`Strategy::Elm`], the paper's: each query's top-1 stored instance votes for its expert
//!   and the most votes win.
//! - [`Strategy::Hybrid`] (default): treats the Q queries as a *set* and adds two set-level
//!   signals to similarity-weighted top-k votes: the cosine between the centroid of the query
//!   vectors and each expert's instance centroid (averaging Q and S vectors cancels the noise
//!   of single look-alike pairs and keeps what the task's texts share), and the lexical
//!   profile similarity of [`crate::lexical`] (format markers, answer labels). Each signal is
//!   turned into a distribution over experts and the distributions are mixed.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{LibraryError, Result};
use crate::expert::{ExpertKind, TextFormat};
use crate::index::{
    BuiltGraph, CompactedIndex, CompactionSnapshot, GraphWork, Hit, IndexConfig, SwapReport,
    VectorIndex,
};
use crate::lexical::{LexicalIndex, TermProfile};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Jang et al. 2023: top-1 instance per query votes, majority wins.
    Elm,
    /// Set-level routing: weighted top-k votes + centroid + lexical signals.
    #[default]
    Hybrid,
}

impl std::str::FromStr for Strategy {
    type Err = LibraryError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "elm" => Ok(Self::Elm),
            "hybrid" => Ok(Self::Hybrid),
            o => Err(LibraryError::invalid(
                "strategy",
                format!("unknown strategy {o:?} (elm or hybrid)"),
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    /// Each retrieved instance gives its expert one vote.
    #[default]
    Vote,
    /// Each retrieved instance gives its expert its similarity.
    SimilaritySum,
}

impl std::str::FromStr for Aggregation {
    type Err = LibraryError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "vote" => Ok(Self::Vote),
            "similarity_sum" => Ok(Self::SimilaritySum),
            o => Err(LibraryError::invalid(
                "aggregation",
                format!("unknown aggregation {o:?} (vote or similarity_sum)"),
            )),
        }
    }
}

/// Weights and temperatures of the hybrid strategy's mixture.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HybridParams {
    pub knn_weight: f32,
    pub centroid_weight: f32,
    pub lexical_weight: f32,
    /// Softmax temperature that turns centroid cosines into a distribution over experts.
    pub centroid_temperature: f32,
    /// Softmax temperature for lexical cosines.
    pub lexical_temperature: f32,
}

impl Default for HybridParams {
    fn default() -> Self {
        Self {
            knn_weight: 1.0,
            centroid_weight: 1.0,
            lexical_weight: 1.0,
            centroid_temperature: 0.02,
            lexical_temperature: 0.05,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteOptions {
    pub strategy: Strategy,
    /// Instances retrieved per query (ELM uses 1).
    pub top_k: usize,
    pub aggregation: Aggregation,
    pub text_format: TextFormat,
    /// Only experts of this kind compete.
    pub kind: Option<ExpertKind>,
    /// Experts that may not win (leave-one-out evaluation, or a client's own exclusions).
    pub exclude: Vec<String>,
    /// Abstain when the winner's share of the evidence is below this.
    pub abstain_threshold: f32,
    /// Bypass HNSW and scan every vector.
    pub exact: bool,
    pub hybrid: HybridParams,
    /// Hits reported per query in the evidence.
    pub evidence_per_query: usize,
}

impl Default for RouteOptions {
    fn default() -> Self {
        Self {
            strategy: Strategy::Hybrid,
            top_k: 10,
            aggregation: Aggregation::SimilaritySum,
            text_format: TextFormat::ChoiceInstance,
            kind: None,
            exclude: Vec::new(),
            abstain_threshold: 0.0,
            exact: false,
            hybrid: HybridParams::default(),
            evidence_per_query: 3,
        }
    }
}

impl RouteOptions {
    /// The paper's method, as `elm_routing_baseline.json` measured it.
    pub fn elm(text_format: TextFormat) -> Self {
        Self {
            strategy: Strategy::Elm,
            top_k: 1,
            aggregation: Aggregation::Vote,
            text_format,
            ..Self::default()
        }
    }
}

/// A query: an example input of the target task, with its answer choices if it has any,
/// and its answer if the client has labeled examples (used by the hybrid strategy's lexical
/// signal, compared with the stored instances' targets).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Query {
    pub input: String,
    #[serde(default)]
    pub choices: Vec<String>,
    #[serde(default)]
    pub target: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExpertScore {
    pub expert_id: String,
    /// The ranking score (strategy dependent; higher is better).
    pub score: f32,
    /// Queries whose top-1 instance belongs to this expert.
    pub votes: u32,
    /// This expert's share of the evidence the strategy weighs (votes / Q for ELM).
    pub share: f32,
    /// Mean similarity of this expert's retrieved instances to the queries.
    pub mean_similarity: f32,
    /// Cosine between the query centroid and the expert's centroid (hybrid only).
    pub centroid_similarity: Option<f32>,
    /// IDF-weighted term profile cosine (hybrid only).
    pub lexical_similarity: Option<f32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvidenceHit {
    pub expert_id: String,
    pub point_id: u64,
    pub similarity: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteResult {
    /// Best first; ties broken by votes, then expert id.
    pub ranked: Vec<ExpertScore>,
    /// Per query, its best hits.
    pub evidence: Vec<Vec<EvidenceHit>>,
    pub abstain: bool,
}

impl RouteResult {
    pub fn winner(&self) -> Option<&ExpertScore> {
        if self.abstain {
            None
        } else {
            self.ranked.first()
        }
    }
}

/// Runs the graph work that writes left in `state` (see [`VectorIndex::graph_work`]) holding
/// its lock only to take the work (a read) and to install a graph built anew (a write), so
/// routes go on meanwhile. The caller serialises writes, graph work included.
pub(crate) fn run_graph_work(state: &parking_lot::RwLock<RoutingState>) {
    let work = state.read().graph_work();
    for (format, work) in work {
        if let Some(built) = work.run() {
            state.write().install_graph(format, built);
        }
    }
}

/// Everything routing reads, rebuilt from the store at start-up and kept current on writes.
pub struct RoutingState {
    dim: usize,
    indexes: HashMap<TextFormat, VectorIndex>,
    point_expert: HashMap<u64, Arc<str>>,
    expert_kind: HashMap<Arc<str>, ExpertKind>,
    /// Sum of instance vectors and their count, per expert and format.
    centroid_sums: HashMap<(Arc<str>, TextFormat), (Vec<f32>, usize)>,
    /// Replaced whole by a write, with a copy changed off the routing lock (see
    /// [`LexicalViews::after`]): its refresh costs every expert's terms.
    lexical: Arc<LexicalViews>,
    /// Points whose choice_instance vector differs from their instance vector.
    with_choices: std::collections::HashSet<u64>,
}

/// The lexical views routing reads, beside the vectors.
#[derive(Debug, Clone, Default)]
pub struct LexicalViews {
    /// Profiles of the instances' inputs and answer labels.
    inputs: LexicalIndex,
    /// Profiles of the instances' targets, compared with labeled queries' targets.
    targets: LexicalIndex,
}

impl LexicalViews {
    /// These views as they are after `change`, refreshed, for [`RoutingState::apply`]. Costs
    /// a pass over every expert's terms (the IDFs, hence every norm, depend on the number of
    /// experts): run it without the routing lock. The writes a library serialises keep the
    /// views unchanged between this and the [`RoutingState::apply`] that installs the result.
    pub fn after(&self, change: &ExpertChange<'_>) -> Self {
        let mut next = self.clone();
        if change.removed.is_some() {
            next.remove_expert(change.expert_id);
        }
        if let Some((_, items)) = &change.added {
            next.add_items(change.expert_id, items);
        }
        next.refresh();
        next
    }

    fn add_items(&mut self, expert_id: &str, items: &[InstanceVectors<'_>]) {
        let mut profile = self.inputs.profile(expert_id).cloned().unwrap_or_default();
        let mut targets = self.targets.profile(expert_id).cloned().unwrap_or_default();
        for it in items {
            profile.add(it.input, it.choices);
            if let Some(t) = it.target {
                targets.add_terms(crate::lexical::text_terms(t));
            }
        }
        self.inputs.set_profile(expert_id, profile);
        self.targets.set_profile(expert_id, targets);
    }

    fn remove_expert(&mut self, expert_id: &str) {
        self.inputs.remove_expert(expert_id);
        self.targets.remove_expert(expert_id);
    }

    fn refresh(&mut self) {
        self.inputs.refresh();
        self.targets.refresh();
    }
}

/// One write's change to one expert, as the routing state applies it.
pub struct ExpertChange<'a> {
    pub expert_id: &'a str,
    /// Points removed first, with the expert's profile: a delete, or the version a
    /// registration replaces.
    pub removed: Option<&'a [u64]>,
    /// Instances added then: a registration, or instances added to the expert.
    pub added: Option<(ExpertKind, &'a [InstanceVectors<'a>])>,
}

/// The text formats with an index of their own.
pub const FORMATS: [TextFormat; 2] = [TextFormat::Instance, TextFormat::ChoiceInstance];

/// One instance's vectors as the routing state takes them.
pub struct InstanceVectors<'a> {
    pub point_id: u64,
    pub input: &'a str,
    pub choices: &'a [String],
    pub target: Option<&'a str>,
    /// Whether `choice_instance` is a text of its own (else it equals `instance`).
    pub has_choices: bool,
    pub instance: &'a [f32],
    pub choice_instance: &'a [f32],
}

impl RoutingState {
    pub fn new(dim: usize, config: IndexConfig) -> Self {
        Self {
            dim,
            indexes: FORMATS
                .iter()
                .map(|f| (*f, VectorIndex::new(dim, config.clone())))
                .collect(),
            point_expert: HashMap::new(),
            expert_kind: HashMap::new(),
            centroid_sums: HashMap::new(),
            lexical: Default::default(),
            with_choices: Default::default(),
        }
    }

    /// A state over indexes loaded from disk (one per format of [`FORMATS`]); experts are
    /// then added with [`Self::add_all`] (`indexed`), which leaves the indexes alone.
    pub fn with_indexes(dim: usize, indexes: HashMap<TextFormat, VectorIndex>) -> Result<Self> {
        if let Some(f) = FORMATS.iter().find(|f| !indexes.contains_key(f)) {
            return Err(LibraryError::Index(format!("no {} index", f.as_str())));
        }
        Ok(Self {
            dim,
            indexes,
            point_expert: HashMap::new(),
            expert_kind: HashMap::new(),
            centroid_sums: HashMap::new(),
            lexical: Default::default(),
            with_choices: Default::default(),
        })
    }

    /// Each format's index, in [`FORMATS`] order.
    pub fn indexes(&self) -> Vec<(TextFormat, &VectorIndex)> {
        FORMATS
            .iter()
            .filter_map(|f| Some((*f, self.indexes.get(f)?)))
            .collect()
    }

    /// Compactions of all indexes so far.
    pub fn compactions(&self) -> u64 {
        self.indexes.values().map(|i| i.compactions()).sum()
    }

    /// Some index's tombstones reached its `compact_ratio`. Removing never compacts: the
    /// library compacts in the background ([`crate::compaction`]).
    pub fn needs_compaction(&self) -> bool {
        self.indexes.values().any(|i| i.needs_compaction())
    }

    /// Starts a compaction snapshot of one format's index (see [`crate::index`]).
    pub fn begin_compaction(&self, format: TextFormat) -> Result<CompactionSnapshot> {
        Ok(self.index(format)?.begin_compaction())
    }

    /// Copies up to `max_rows` more rows of `format`'s index into `snapshot`; true when done.
    pub fn copy_for_compaction(
        &self,
        format: TextFormat,
        snapshot: &mut CompactionSnapshot,
        max_rows: usize,
    ) -> Result<bool> {
        Ok(self.index(format)?.copy_into(snapshot, max_rows))
    }

    /// Replaces `format`'s index with a compacted one after replaying the writes made since
    /// its snapshot (see [`VectorIndex::swap_in`]).
    pub fn swap_in_compacted(
        &mut self,
        format: TextFormat,
        compacted: CompactedIndex,
    ) -> Result<SwapReport> {
        self.indexes
            .get_mut(&format)
            .ok_or_else(|| LibraryError::Index(format!("no {} index", format.as_str())))?
            .swap_in(compacted)
    }

    fn index(&self, format: TextFormat) -> Result<&VectorIndex> {
        self.indexes
            .get(&format)
            .ok_or_else(|| LibraryError::Index(format!("no {} index", format.as_str())))
    }

    pub fn num_vectors(&self) -> usize {
        self.indexes[&TextFormat::Instance].len()
    }

    pub fn num_experts(&self) -> usize {
        self.expert_kind.len()
    }

    pub fn uses_hnsw(&self) -> bool {
        self.indexes[&TextFormat::Instance].uses_hnsw()
    }

    pub fn vector_index(&self, format: TextFormat) -> &VectorIndex {
        &self.indexes[&format]
    }

    /// Adds an expert's instances (the expert may already have some).
    pub fn add(
        &mut self,
        expert_id: &str,
        kind: ExpertKind,
        items: &[InstanceVectors<'_>],
    ) -> Result<()> {
        let change = ExpertChange {
            expert_id,
            removed: None,
            added: Some((kind, items)),
        };
        let lexical = Arc::new(self.lexical.after(&change));
        self.apply(&change, lexical)
    }

    /// The lexical views now, to change off the lock with [`LexicalViews::after`].
    pub fn lexical(&self) -> Arc<LexicalViews> {
        self.lexical.clone()
    }

    /// Applies `change` to the vectors and installs `lexical`, the views after it. Appending
    /// rows and swapping the views is all a write holds the routing lock for.
    pub fn apply(&mut self, change: &ExpertChange<'_>, lexical: Arc<LexicalViews>) -> Result<()> {
        if let Some(points) = change.removed {
            self.remove_vectors(change.expert_id, points);
        }
        self.lexical = lexical;
        if let Some((kind, items)) = &change.added {
            self.add_inner(change.expert_id, *kind, items, true)?;
        }
        Ok(())
    }

    /// Adds many experts at once (start-up). `indexed`: the vector indexes already hold
    /// their instances (they were reloaded from disk), so only the rest is built. The lexical
    /// norms depend on every expert, so they are computed once at the end: refreshing after
    /// each expert made opening a library of E experts cost O(E²) (minutes at 1,000).
    pub fn add_all<'a>(
        &mut self,
        experts: impl IntoIterator<Item = (&'a str, ExpertKind, Vec<InstanceVectors<'a>>)>,
        indexed: bool,
    ) -> Result<()> {
        let mut lexical = std::mem::take(&mut self.lexical);
        let views = Arc::make_mut(&mut lexical);
        let mut added = Ok(());
        for (id, kind, items) in experts {
            views.add_items(id, &items);
            added = self.add_inner(id, kind, &items, !indexed);
            if added.is_err() {
                break;
            }
        }
        views.refresh();
        self.lexical = lexical;
        added?;
        // Nothing routes yet: the graphs are built here, once, over every row.
        for index in self.indexes.values_mut() {
            index.settle_graph();
        }
        Ok(())
    }

    /// The graph work the writes so far left (see [`VectorIndex::graph_work`]), per format:
    /// to run without the routing lock, then [`Self::install_graph`] what it built.
    pub fn graph_work(&self) -> Vec<(TextFormat, GraphWork)> {
        FORMATS
            .iter()
            .filter_map(|f| Some((*f, self.indexes.get(f)?.graph_work()?)))
            .collect()
    }

    /// Installs a graph that [`GraphWork::run`] built for `format`'s index.
    pub fn install_graph(&mut self, format: TextFormat, built: BuiltGraph) -> bool {
        self.indexes
            .get_mut(&format)
            .is_some_and(|i| i.install_graph(built))
    }

    fn add_inner(
        &mut self,
        expert_id: &str,
        kind: ExpertKind,
        items: &[InstanceVectors<'_>],
        insert_vectors: bool,
    ) -> Result<()> {
        let id: Arc<str> = self
            .expert_kind
            .get_key_value(expert_id)
            .map(|(k, _)| k.clone())
            .unwrap_or_else(|| Arc::from(expert_id));
        self.expert_kind.insert(id.clone(), kind);
        for f in FORMATS {
            let batch: Vec<(u64, &[f32])> = items
                .iter()
                .map(|it| {
                    let v = match f {
                        TextFormat::Instance => it.instance,
                        TextFormat::ChoiceInstance => it.choice_instance,
                    };
                    (it.point_id, v)
                })
                .collect();
            // The choice_instance index holds only the instances that have choices (the others'
            // two texts are the same): at scale one graph, not two, per vector.
            if insert_vectors {
                let indexed: Vec<(u64, &[f32])> = match f {
                    TextFormat::Instance => batch.clone(),
                    TextFormat::ChoiceInstance => items
                        .iter()
                        .filter(|it| it.has_choices)
                        .map(|it| (it.point_id, it.choice_instance))
                        .collect(),
                };
                // Stored only: the graph work this leaves runs off the routing lock.
                self.indexes
                    .get_mut(&f)
                    .ok_or_else(|| LibraryError::Index("missing format index".into()))?
                    .append(&indexed)?;
            }
            let entry = self
                .centroid_sums
                .entry((id.clone(), f))
                .or_insert_with(|| (vec![0.0; self.dim], 0));
            for (_, v) in &batch {
                entry.0.iter_mut().zip(v.iter()).for_each(|(a, b)| *a += b);
                entry.1 += 1;
            }
        }
        for it in items {
            self.point_expert.insert(it.point_id, id.clone());
            if it.has_choices {
                self.with_choices.insert(it.point_id);
            }
        }
        Ok(())
    }

    /// Removes an expert and its points; searches stop seeing them at once (tombstones,
    /// compacted later: see [`Self::needs_compaction`]).
    pub fn remove(&mut self, expert_id: &str, point_ids: &[u64]) {
        let change = ExpertChange {
            expert_id,
            removed: Some(point_ids),
            added: None,
        };
        let lexical = Arc::new(self.lexical.after(&change));
        self.remove_vectors(expert_id, point_ids);
        self.lexical = lexical;
    }

    fn remove_vectors(&mut self, expert_id: &str, point_ids: &[u64]) {
        for idx in self.indexes.values_mut() {
            idx.remove(point_ids);
        }
        for p in point_ids {
            self.point_expert.remove(p);
            self.with_choices.remove(p);
        }
        self.expert_kind.remove(expert_id);
        for f in FORMATS {
            self.centroid_sums.remove(&(Arc::from(expert_id), f));
        }
    }

    /// Ranks experts for queries already embedded in `options.text_format`.
    pub fn route(
        &self,
        queries: &[Query],
        query_vectors: &[Vec<f32>],
        options: &RouteOptions,
    ) -> Result<RouteResult> {
        if queries.is_empty() {
            return Err(LibraryError::invalid(
                "queries",
                "at least one query is needed",
            ));
        }
        // Our invariant, not the caller's input: every query was embedded.
        if query_vectors.len() != queries.len() {
            return Err(LibraryError::Index(format!(
                "{} query vectors for {} queries",
                query_vectors.len(),
                queries.len()
            )));
        }
        if options.top_k == 0 || options.top_k > 1000 {
            return Err(LibraryError::invalid("top_k", "must be between 1 and 1000"));
        }
        let eligible = |id: &str| -> bool {
            self.expert_kind
                .get(id)
                .is_some_and(|k| options.kind.is_none_or(|want| *k == want))
                && !options.exclude.iter().any(|e| e == id)
        };
        let allow = |p: u64| self.point_expert.get(&p).is_some_and(|id| eligible(id));
        let k = match options.strategy {
            Strategy::Elm => 1,
            Strategy::Hybrid => options.top_k,
        };
        // All the queries searched together: which points are eligible is asked once per
        // point, and an exact scan reads each stored vector once for every query.
        let qs: Vec<&[f32]> = query_vectors.iter().map(Vec::as_slice).collect();
        let run = |index: &VectorIndex, allow: &crate::index::Allow<'_>| {
            if options.exact {
                index.search_exact_many(&qs, k, allow)
            } else {
                index.search_many(&qs, k, allow)
            }
        };
        let all_hits: Vec<Vec<Hit>> = match options.text_format {
            TextFormat::Instance => run(&self.indexes[&TextFormat::Instance], &allow),
            TextFormat::ChoiceInstance => {
                // Instances with choices from their own index, the rest by their input.
                let with = run(&self.indexes[&TextFormat::ChoiceInstance], &|p| {
                    allow(p) && self.with_choices.contains(&p)
                });
                let without = run(&self.indexes[&TextFormat::Instance], &|p| {
                    allow(p) && !self.with_choices.contains(&p)
                });
                with.into_iter()
                    .zip(without)
                    .map(|(mut hits, more)| {
                        hits.extend(more);
                        crate::index::sort_hits(&mut hits);
                        hits.truncate(k);
                        hits
                    })
                    .collect()
            }
        };
        let q = query_vectors.len() as f32;

        let mut acc: HashMap<Arc<str>, Acc> = HashMap::new();
        let mut evidence = Vec::with_capacity(query_vectors.len());
        for hits in all_hits {
            let mut per_query: std::collections::BTreeMap<Arc<str>, f32> = Default::default();
            for (rank, h) in hits.iter().enumerate() {
                let Some(id) = self.point_expert.get(&h.point_id) else {
                    continue;
                };
                let a = acc.entry(id.clone()).or_default();
                if rank == 0 {
                    a.votes += 1;
                }
                a.sim_sum += h.score;
                a.hits += 1;
                let w = match options.aggregation {
                    Aggregation::Vote => 1.0,
                    Aggregation::SimilaritySum => h.score.max(0.0),
                };
                *per_query.entry(id.clone()).or_insert(0.0) += w;
            }
            // Each query spreads one unit of weight over the experts it retrieved.
            let total: f32 = per_query.values().sum();
            if total > 0.0 {
                for (id, w) in per_query {
                    acc.entry(id).or_default().weight += w / total;
                }
            }
            evidence.push(
                hits.iter()
                    .take(options.evidence_per_query)
                    .filter_map(|h| {
                        Some(EvidenceHit {
                            expert_id: self.point_expert.get(&h.point_id)?.to_string(),
                            point_id: h.point_id,
                            similarity: h.score,
                        })
                    })
                    .collect(),
            );
        }

        let mut ranked: Vec<ExpertScore> = match options.strategy {
            Strategy::Elm => acc
                .iter()
                .map(|(id, a)| ExpertScore {
                    expert_id: id.to_string(),
                    score: match options.aggregation {
                        Aggregation::Vote => a.votes as f32,
                        Aggregation::SimilaritySum => a.sim_sum,
                    },
                    votes: a.votes,
                    share: a.votes as f32 / q,
                    mean_similarity: a.sim_sum / a.hits.max(1) as f32,
                    centroid_similarity: None,
                    lexical_similarity: None,
                })
                .collect(),
            Strategy::Hybrid => {
                self.hybrid_scores(queries, query_vectors, options, &eligible, &acc, q)
            }
        };
        ranked.sort_by(|a, b| {
            b.score
                .total_cmp(&a.score)
                .then_with(|| b.votes.cmp(&a.votes))
                .then_with(|| a.expert_id.cmp(&b.expert_id))
        });
        let abstain = ranked
            .first()
            .is_none_or(|w| w.share < options.abstain_threshold);
        Ok(RouteResult {
            ranked,
            evidence,
            abstain,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn hybrid_scores(
        &self,
        queries: &[Query],
        query_vectors: &[Vec<f32>],
        options: &RouteOptions,
        eligible: &dyn Fn(&str) -> bool,
        acc: &HashMap<Arc<str>, Acc>,
        q: f32,
    ) -> Vec<ExpertScore> {
        let p = &options.hybrid;
        let mut centroid = vec![0.0f32; self.dim];
        for v in query_vectors {
            centroid.iter_mut().zip(v).for_each(|(a, b)| *a += b);
        }
        crate::embedding::normalize(&mut centroid);
        let lexical = if p.lexical_weight > 0.0 {
            let mut profile = TermProfile::default();
            for qu in queries {
                profile.add(&qu.input, &qu.choices);
            }
            let mut sims = self.lexical.inputs.similarities(&profile);
            // Labeled queries: their answers against the stored instances' answers, averaged
            // in with the input similarity.
            let mut targets = TermProfile::default();
            for t in queries.iter().filter_map(|q| q.target.as_deref()) {
                targets.add_terms(crate::lexical::text_terms(t));
            }
            if targets.texts > 0 {
                let by_target = self.lexical.targets.similarities(&targets);
                for (id, s) in sims.iter_mut() {
                    *s = 0.5 * (*s + by_target.get(*id).copied().unwrap_or(0.0));
                }
            }
            sims
        } else {
            HashMap::new()
        };
        let mut ids: Vec<&Arc<str>> = self.expert_kind.keys().filter(|id| eligible(id)).collect();
        ids.sort_unstable();
        let cen: Vec<f32> = ids
            .iter()
            .map(|id| {
                self.centroid_sums
                    .get(&((*id).clone(), options.text_format))
                    .map(|(sum, _)| {
                        let n = sum.iter().map(|x| x * x).sum::<f32>().sqrt();
                        if n > 0.0 {
                            crate::embedding::dot(&centroid, sum) / n
                        } else {
                            0.0
                        }
                    })
                    .unwrap_or(0.0)
            })
            .collect();
        let lex: Vec<f32> = ids
            .iter()
            .map(|id| lexical.get(id.as_ref()).copied().unwrap_or(0.0))
            .collect();
        let cen_p = softmax(&cen, p.centroid_temperature);
        let lex_p = softmax(&lex, p.lexical_temperature);
        let wsum = p.knn_weight + p.centroid_weight + p.lexical_weight;
        ids.iter()
            .enumerate()
            .map(|(i, id)| {
                let (votes, weight, mean_sim) = acc
                    .get(*id)
                    .map(|a| (a.votes, a.weight, a.sim_sum / a.hits.max(1) as f32))
                    .unwrap_or((0, 0.0, 0.0));
                let knn_share = weight / q;
                let share = (p.knn_weight * knn_share
                    + p.centroid_weight * cen_p[i]
                    + p.lexical_weight * lex_p[i])
                    / wsum.max(f32::EPSILON);
                ExpertScore {
                    expert_id: id.to_string(),
                    score: share,
                    votes,
                    share,
                    mean_similarity: mean_sim,
                    centroid_similarity: Some(cen[i]),
                    lexical_similarity: (p.lexical_weight > 0.0).then_some(lex[i]),
                }
            })
            .collect()
    }
}

/// Per-expert tallies of the retrieved hits.
#[derive(Default)]
struct Acc {
    votes: u32,
    /// Sum over queries of the expert's part of that query's unit of weight.
    weight: f32,
    sim_sum: f32,
    hits: u32,
}

fn softmax(xs: &[f32], temperature: f32) -> Vec<f32> {
    let t = temperature.max(1e-6);
    let m = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = xs.iter().map(|x| ((x - m) / t).exp()).collect();
    let s: f32 = e.iter().sum();
    e.into_iter()
        .map(|x| if s > 0.0 { x / s } else { 0.0 })
        .collect()
}
