//! The bodies of the fuzz targets: whatever bytes come in, the readers of client input
//! return a value or an error, never panic, and agree with themselves.
//!
//! `fuzz/` (cargo-fuzz, nightly) calls these; `tests/corpus.rs` replays the corpora it found
//! (committed under `fuzz/corpus/`) on stable, in the test suite. The targets:
//!
//! - [`peft_adapter`]: the PEFT reader (config JSON and safetensors), against a tiny model
//!   shape and SmolLM2-135M's. Reading and checking-only agree; what reads, written back
//!   in PEFT's format, reads back the same.
//! - [`instances_jsonl`]: the JSON-lines reader of instances and training rows. What parses
//!   serialises and parses back the same.
//! - [`proto_messages`]: every `roe.v1` request a client sends, decoded by prost and turned
//!   into the domain's types (and the messages a remote library or router sends back).

use prost::Message;
use roe_peft::{Adapter, ModelShape, PeftConfig};
use roe_services::{convert, proto};

/// 8 wide, 3 layers: valid adapters of it are a few hundred bytes, so the fuzzer reaches
/// them.
pub const TINY: ModelShape = ModelShape {
    hidden_size: 8,
    intermediate_size: 12,
    num_layers: 3,
    num_heads: 2,
    num_kv_heads: 1,
    head_dim: 4,
    vocab_size: 32,
};

/// `data`: a u16 (little endian) length, that many bytes of config JSON (lossy UTF-8), then
/// the safetensors bytes.
pub fn peft_adapter(data: &[u8]) {
    let (config, safetensors) = split_peft(data);
    let _ = PeftConfig::from_json(&config);
    for shape in [TINY, ModelShape::smollm2_135m()] {
        let read = Adapter::from_peft(&config, safetensors, &shape);
        let checked = Adapter::check_peft(&config, safetensors, &shape);
        match (&read, &checked) {
            (Ok(a), Ok(s)) => assert_eq!(&a.summary(), s, "reading and checking disagree"),
            // The same kind of error on the same field. Not always the same text: the
            // safetensors crate checks a header's tensors in hash-map order, so with several
            // bad ones the one it names varies from call to call.
            (Err(a), Err(b)) => assert_eq!(
                (std::mem::discriminant(a), a.field(), a.kind()),
                (std::mem::discriminant(b), b.field(), b.kind()),
                "reading and checking fail differently: {a} / {b}"
            ),
            (a, b) => panic!("reading and checking disagree: {a:?} / {b:?}"),
        }
        match read {
            Ok(adapter) => {
                let files = adapter.to_peft().expect("a read adapter writes");
                let again = Adapter::from_peft(&files.config_json, &files.safetensors, &shape)
                    .expect("a written adapter reads");
                // The writer fills PEFT's defaults into the config (task_type), so the
                // origin may differ; the weights and what registration records may not.
                assert_eq!(again.summary(), adapter.summary(), "summary differs");
                match (&again, &adapter) {
                    (Adapter::SoftPrompt(a), Adapter::SoftPrompt(b)) => {
                        assert_eq!(a.embeddings(), b.embeddings(), "prompt values differ")
                    }
                    (Adapter::Lora(a), Adapter::Lora(b)) => {
                        assert_eq!(a.blocks(), b.blocks(), "LoRA blocks differ")
                    }
                    _ => panic!("written and read back is another kind"),
                }
                let twice = again.to_peft().expect("writes again");
                assert_eq!(
                    twice.safetensors, files.safetensors,
                    "writing is not stable"
                );
            }
            Err(e) => {
                // Errors name a field and a kind; both must be there.
                assert!(!e.field().is_empty());
                let _ = (e.kind(), e.to_string());
            }
        }
    }
}

/// Splits a fuzz input as [`peft_adapter`] reads it.
pub fn split_peft(data: &[u8]) -> (String, &[u8]) {
    if data.len() < 2 {
        return (String::new(), data);
    }
    let n = (u16::from_le_bytes([data[0], data[1]]) as usize).min(data.len() - 2);
    (
        String::from_utf8_lossy(&data[2..2 + n]).into_owned(),
        &data[2 + n..],
    )
}

/// `data`: JSON lines (lossy UTF-8).
pub fn instances_jsonl(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let labels = ["yes".to_string(), "no".to_string()];
    if let Ok(rows) = roe_task_suite::parse_instances(&text, "fuzz", &labels) {
        for row in rows {
            assert!(
                !row.choices.is_empty(),
                "rows without choices get the labels"
            );
            let line = serde_json::to_string(&row).expect("an instance serialises");
            let back = roe_task_suite::parse_instances(&line, "again", &labels)
                .expect("a serialised instance parses");
            assert_eq!(back, [row], "serialised and parsed back differs");
        }
    }
}

/// `data`: a byte choosing the message, then its protobuf encoding.
pub fn proto_messages(data: &[u8]) {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    match which % 10 {
        0 => {
            if let Ok(m) = proto::RegisterExpertRequest::decode(bytes) {
                let _ = convert::new_expert(m);
            }
        }
        1 => {
            if let Ok(m) = proto::MergeExpertsRequest::decode(bytes) {
                let _ = convert::merge_request(m);
            }
        }
        2 => {
            if let Ok(m) = proto::StartTrainingRequest::decode(bytes) {
                let _ = convert::training_job_from_proto(m);
            }
        }
        3 => {
            if let Ok(m) = proto::RouteRequest::decode(bytes) {
                let _ = convert::route_overrides(m.options, "options");
                for q in m.queries {
                    let q = convert::query_from_proto(q);
                    let _ = convert::query_to_proto(q);
                }
            }
        }
        4 => {
            if let Ok(m) = proto::AnswerRequest::decode(bytes) {
                let _ = convert::answer_request(m);
            }
        }
        5 => {
            if let Ok(m) = proto::GenerateRequest::decode(bytes) {
                let _ = convert::generate_options(&m);
            }
        }
        6 => {
            if let Ok(m) = proto::RouteResponse::decode(bytes) {
                let r = convert::route_result_from_proto(m);
                let _ = convert::route_result_to_proto(r);
            }
        }
        7 => {
            if let Ok(m) = proto::Expert::decode(bytes) {
                let _ = convert::expert_ref_from_proto("fuzz", Some(m));
            }
        }
        8 => {
            if let Ok(m) = proto::Instance::decode(bytes) {
                let i = convert::instance_from_proto(m.clone());
                assert_eq!(
                    convert::instance_to_proto(i),
                    m,
                    "an instance round trip differs"
                );
            }
        }
        _ => {
            if let Ok(m) = proto::RegisterExpertChunk::decode(bytes) {
                if let Some(proto::register_expert_chunk::Part::Header(h)) = m.part {
                    let _ = convert::new_expert(h);
                }
            }
        }
    }
}
