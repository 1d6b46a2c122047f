//! What the library counts for monitoring, through the `metrics` facade (recorded only when
//! the process installs a recorder, as `roe serve` does). The sizes of the library are
//! gauges the exporter sets when it is scraped ([`record_sizes`]).

use metrics::{counter, describe_counter, describe_gauge, gauge};

pub const ROUTES: &str = "roe_routes_total";
pub const ROUTE_CACHE_HITS: &str = "roe_route_cache_hits_total";
pub const ROUTE_CACHE_MISSES: &str = "roe_route_cache_misses_total";
pub const LIBRARY_EXPERTS: &str = "roe_library_experts";
pub const LIBRARY_VECTORS: &str = "roe_library_vectors";

/// Registers the descriptions of the library's metrics with the recorder.
pub fn describe() {
    describe_counter!(
        ROUTES,
        "Tasks routed, by outcome: \"routed\" (a winner) or \"abstained\" (below the \
         abstain threshold)"
    );
    describe_counter!(
        ROUTE_CACHE_HITS,
        "Routes answered from the route cache (same queries and options, library unchanged)"
    );
    describe_counter!(ROUTE_CACHE_MISSES, "Routes the route cache did not hold");
    describe_gauge!(LIBRARY_EXPERTS, "Experts in the library");
    describe_gauge!(LIBRARY_VECTORS, "Instance vectors in the routing index");
}

pub(crate) fn routed(abstained: bool) {
    let outcome = if abstained { "abstained" } else { "routed" };
    counter!(ROUTES, "outcome" => outcome).increment(1);
}

pub(crate) fn route_cache(hit: bool) {
    counter!(if hit {
        ROUTE_CACHE_HITS
    } else {
        ROUTE_CACHE_MISSES
    })
    .increment(1);
}

/// Sets the size gauges from `library` (at scrape time: always current, no bookkeeping on
/// the write path).
pub fn record_sizes(library: &crate::library::ExpertLibrary) {
    gauge!(LIBRARY_EXPERTS).set(library.len() as f64);
    gauge!(LIBRARY_VECTORS).set(library.num_vectors() as f64);
}
