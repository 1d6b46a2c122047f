//! Memory a real `roe serve` keeps for reuse while busy is given back once it goes idle
//! (`--idle-trim-ms`), and the metrics say so.
mod common;

use serde_json::json;

use common::{http_call, start_serve_http, KillOnDrop};

/// The value of an unlabelled sample `name` in Prometheus' text format.
fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[test]
fn freed_memory_goes_back_to_the_kernel_when_the_server_is_idle() {
    let tmp = tempfile::tempdir().unwrap();
    let (child, _grpc, http) =
        start_serve_http(&tmp.path().join("library"), &["--idle-trim-ms", "300"]);
    let _server = KillOnDrop(child);
    // A 1,000-token prompt: hundreds of MB of activations, freed when it is done.
    let body = json!({"input": " river".repeat(1000), "choices": ["yes", "no"]}).to_string();
    let (status, text) = http_call(&http, "POST", "/v1/roe/score", Some(&body));
    assert_eq!(status, 200, "{text}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let (trims, returned, resident, peak, allocated) = loop {
        let (status, metrics) = http_call(&http, "GET", "/metrics", None);
        assert_eq!(status, 200);
        let trims = sample(&metrics, "roe_memory_trims_total").unwrap_or(0.0);
        if trims >= 1.0 || std::time::Instant::now() > deadline {
            break (
                trims,
                sample(&metrics, "roe_memory_returned_bytes_total").unwrap_or(0.0),
                sample(&metrics, "process_resident_memory_bytes").unwrap_or(0.0),
                sample(&metrics, "process_resident_memory_max_bytes").unwrap_or(0.0),
                sample(&metrics, "roe_heap_allocated_bytes").unwrap_or(0.0),
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert!(trims >= 1.0, "no trim within 20 s of going idle");
    // The score's activations came back (tens of MB at least), and the process is below its
    // peak by about as much.
    assert!(
        returned > 32.0 * 1024.0 * 1024.0,
        "returned {returned} bytes"
    );
    assert!(
        resident < peak - 16.0 * 1024.0 * 1024.0,
        "resident {resident}, peak {peak}"
    );
    // What the allocations hold is exported too, and is part of what is resident.
    assert!(
        allocated > 0.0 && allocated < resident,
        "allocated {allocated}, resident {resident}"
    );
}
