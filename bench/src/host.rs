//! The CPU a benchmark ran on, recorded in every report under `bench/results/`: a line near
//! the top of the Markdown and a `host` object in the JSON (`write_results` adds both).

use serde::Serialize;

/// The machine a report was measured on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Host {
    /// `model name` from /proc/cpuinfo, or `unknown`.
    pub cpu: String,
    /// The architecture this binary was built for (`std::env::consts::ARCH`).
    pub arch: String,
    /// Logical cores this process may use.
    pub threads: usize,
    /// The vector features that matter to roe's kernels, detected at run time, in a fixed
    /// order: avx2 fma avx512f avx512bw avx512vl avx512vnni avx512bf16 avx512fp16, then the
    /// AMX flags of /proc/cpuinfo (amx_bf16 amx_int8 amx_tile).
    pub features: Vec<String>,
}

/// The AMX flags as /proc/cpuinfo spells them (their run-time detection is not stable Rust).
const AMX_FLAGS: [&str; 3] = ["amx_bf16", "amx_int8", "amx_tile"];

impl Host {
    /// Detects this machine: /proc/cpuinfo (Linux) for the model name and AMX flags, the
    /// standard library for the rest.
    pub fn detect() -> Host {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let mut features: Vec<String> = detected_vector_features()
            .into_iter()
            .map(String::from)
            .collect();
        let flags = cpuinfo_flags(&cpuinfo);
        features.extend(
            AMX_FLAGS
                .iter()
                .filter(|amx| flags.contains(*amx))
                .map(|amx| amx.to_string()),
        );
        Host {
            cpu: cpu_model(&cpuinfo).unwrap_or_else(|| "unknown".to_string()),
            arch: std::env::consts::ARCH.to_string(),
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            features,
        }
    }

    /// One line for a report's Markdown, e.g. `CPU: AMD EPYC 9R14 96-Core Processor
    /// (x86_64, 2 threads; avx2 fma avx512f avx512bw avx512vl avx512vnni avx512bf16)`.
    pub fn markdown_line(&self) -> String {
        let features = if self.features.is_empty() {
            "no AVX2/AVX-512/AMX".to_string()
        } else {
            self.features.join(" ")
        };
        format!(
            "CPU: {} ({}, {} thread{}; {})",
            self.cpu,
            self.arch,
            self.threads,
            if self.threads == 1 { "" } else { "s" },
            features
        )
    }

    /// `markdown` with [`Host::markdown_line`] as the paragraph after its `# ` title (or
    /// first, when it has none). A CPU line already there (a report written again) is
    /// replaced, not repeated.
    pub fn annotate_markdown(&self, markdown: &str) -> String {
        let line = self.markdown_line();
        let (title, body) = match markdown.split_once('\n') {
            Some((first, rest)) if first.starts_with("# ") => (Some(first), rest),
            _ => (None, markdown),
        };
        let body = body.trim_start_matches('\n');
        let body = if body.starts_with("CPU: ") {
            body.split_once('\n')
                .map_or("", |(_, after)| after)
                .trim_start_matches('\n')
        } else {
            body
        };
        match title {
            Some(title) => format!("{title}\n\n{line}\n\n{body}"),
            None => format!("{line}\n\n{body}"),
        }
    }

    /// `json` with this host as its `host` field (a JSON object only; any other value is
    /// returned as it is). The report's other fields stay as they were.
    pub fn annotate_json(&self, json: &serde_json::Value) -> serde_json::Value {
        let mut json = json.clone();
        if let serde_json::Value::Object(map) = &mut json {
            map.insert(
                "host".to_string(),
                serde_json::to_value(self).unwrap_or(serde_json::Value::Null),
            );
        }
        json
    }
}

/// The value of the first `model name` line of /proc/cpuinfo.
fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        let value = value.trim();
        (key.trim() == "model name" && !value.is_empty()).then(|| value.to_string())
    })
}

/// The words of the first `flags` line of /proc/cpuinfo.
fn cpuinfo_flags(cpuinfo: &str) -> Vec<&str> {
    cpuinfo
        .lines()
        .find_map(|line| {
            let (key, value) = line.split_once(':')?;
            (key.trim() == "flags").then(|| value.split_whitespace().collect::<Vec<&str>>())
        })
        .unwrap_or_default()
}

#[cfg(target_arch = "x86_64")]
fn detected_vector_features() -> Vec<&'static str> {
    let detected = [
        ("avx2", std::is_x86_feature_detected!("avx2")),
        ("fma", std::is_x86_feature_detected!("fma")),
        ("avx512f", std::is_x86_feature_detected!("avx512f")),
        ("avx512bw", std::is_x86_feature_detected!("avx512bw")),
        ("avx512vl", std::is_x86_feature_detected!("avx512vl")),
        ("avx512vnni", std::is_x86_feature_detected!("avx512vnni")),
        ("avx512bf16", std::is_x86_feature_detected!("avx512bf16")),
        ("avx512fp16", std::is_x86_feature_detected!("avx512fp16")),
    ];
    detected
        .into_iter()
        .filter_map(|(name, on)| on.then_some(name))
        .collect()
}

#[cfg(not(target_arch = "x86_64"))]
fn detected_vector_features() -> Vec<&'static str> {
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CPUINFO: &str = "processor\t: 0\nvendor_id\t: AuthenticAMD\n\
        model name\t: AMD EPYC 9R14 96-Core Processor\n\
        flags\t\t: fpu avx2 avx512f amx_int8 amx_tile\n\n\
        processor\t: 1\nmodel name\t: AMD EPYC 9R14 96-Core Processor\n";

    fn host(features: &[&str]) -> Host {
        Host {
            cpu: "AMD EPYC 9R14".into(),
            arch: "x86_64".into(),
            threads: 2,
            features: features.iter().map(|f| f.to_string()).collect(),
        }
    }

    #[test]
    fn reads_model_name_and_flags() {
        assert_eq!(
            cpu_model(CPUINFO).as_deref(),
            Some("AMD EPYC 9R14 96-Core Processor")
        );
        assert_eq!(cpu_model("processor\t: 0\n"), None);
        let flags = cpuinfo_flags(CPUINFO);
        assert!(flags.contains(&"amx_tile") && flags.contains(&"avx2"));
        assert!(!flags.contains(&"amx_bf16"));
        assert!(cpuinfo_flags("").is_empty());
    }

    #[test]
    fn markdown_line_names_cpu_threads_and_features() {
        assert_eq!(
            host(&["avx2", "fma", "avx512bf16"]).markdown_line(),
            "CPU: AMD EPYC 9R14 (x86_64, 2 threads; avx2 fma avx512bf16)"
        );
        assert_eq!(
            host(&[]).markdown_line(),
            "CPU: AMD EPYC 9R14 (x86_64, 2 threads; no AVX2/AVX-512/AMX)"
        );
    }

    #[test]
    fn the_line_goes_under_the_title_once() {
        let h = host(&["avx2"]);
        let md = "# Title\n\nBody.\n";
        let once = h.annotate_markdown(md);
        assert_eq!(
            once,
            "# Title\n\nCPU: AMD EPYC 9R14 (x86_64, 2 threads; avx2)\n\nBody.\n"
        );
        assert_eq!(h.annotate_markdown(&once), once);
        assert_eq!(
            h.annotate_markdown("Body.\n"),
            "CPU: AMD EPYC 9R14 (x86_64, 2 threads; avx2)\n\nBody.\n"
        );
    }

    #[test]
    fn json_keeps_its_fields_and_gains_host() {
        let h = host(&["avx2"]);
        let json = h.annotate_json(&serde_json::json!({"machine": {"cores": 2}, "rows": []}));
        assert_eq!(json["machine"]["cores"], 2);
        assert_eq!(json["host"]["cpu"], "AMD EPYC 9R14");
        assert_eq!(json["host"]["threads"], 2);
        assert_eq!(json["host"]["features"][0], "avx2");
        assert_eq!(
            h.annotate_json(&serde_json::json!([1])),
            serde_json::json!([1])
        );
    }

    #[test]
    fn detect_fills_every_field() {
        let h = Host::detect();
        assert!(!h.cpu.is_empty());
        assert_eq!(h.arch, std::env::consts::ARCH);
        assert!(h.markdown_line().starts_with("CPU: "));
    }
}
