//! `GET /openapi.json`: the HTTP API described in OpenAPI 3.1. The schemas of roe's own
//! endpoints are derived from the proto descriptors the gRPC server is built from (the
//! proto3 JSON mapping: lowerCamelCase names, enums by name, 64-bit integers as strings), so
//! they cannot drift from the messages; the OpenAI shapes come from the types that parse and
//! write them.

use std::sync::OnceLock;

use axum::Json;
use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, EnumDescriptorProto, FileDescriptorSet};
use serde_json::{json, Map, Value};
use utoipa::ToSchema;

use crate::openai;

const PACKAGE: &str = "roe.v1";

fn proto_ref(type_name: &str) -> Value {
    let name = type_name.trim_start_matches('.');
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

fn enum_schema(e: &EnumDescriptorProto) -> Value {
    let names: Vec<&str> = e.value.iter().map(|v| v.name()).collect();
    json!({ "type": "string", "enum": names })
}

fn field_schema(f: &prost_types::FieldDescriptorProto) -> Value {
    let one = match f.r#type() {
        Type::String => json!({"type": "string"}),
        Type::Bool => json!({"type": "boolean"}),
        Type::Int32 | Type::Uint32 | Type::Sint32 | Type::Fixed32 | Type::Sfixed32 => {
            json!({"type": "integer"})
        }
        Type::Int64 | Type::Uint64 | Type::Sint64 | Type::Fixed64 | Type::Sfixed64 => {
            json!({"type": ["string", "integer"], "description": "64-bit: a decimal string"})
        }
        Type::Float | Type::Double => json!({"type": "number"}),
        Type::Bytes => json!({"type": "string", "contentEncoding": "base64"}),
        Type::Enum | Type::Message => proto_ref(f.type_name()),
        Type::Group => json!({}),
    };
    if f.label() == Label::Repeated {
        json!({"type": "array", "items": one})
    } else {
        one
    }
}

fn message_schema(m: &DescriptorProto) -> Value {
    let mut properties = Map::new();
    for f in &m.field {
        properties.insert(f.json_name().to_string(), field_schema(f));
    }
    json!({ "type": "object", "properties": properties })
}

/// Every message and enum of `roe.v1`, named `roe.v1.<Name>`.
fn proto_schemas() -> Map<String, Value> {
    let mut out = Map::new();
    let Ok(set) = FileDescriptorSet::decode(roe_services::proto::FILE_DESCRIPTOR_SET) else {
        return out;
    };
    for file in set.file.iter().filter(|f| f.package() == PACKAGE) {
        for e in &file.enum_type {
            out.insert(format!("{PACKAGE}.{}", e.name()), enum_schema(e));
        }
        for m in &file.message_type {
            out.insert(format!("{PACKAGE}.{}", m.name()), message_schema(m));
            for e in &m.enum_type {
                out.insert(
                    format!("{PACKAGE}.{}.{}", m.name(), e.name()),
                    enum_schema(e),
                );
            }
        }
    }
    out
}

/// `T`'s schema and those of the types it refers to, by their names.
fn add<T: ToSchema>(schemas: &mut Map<String, Value>) {
    let json = |s| serde_json::to_value(s).unwrap_or(Value::Null);
    schemas.insert(T::name().into_owned(), json(T::schema()));
    let mut referred = Vec::new();
    T::schemas(&mut referred);
    for (name, schema) in referred {
        schemas.insert(name, json(schema));
    }
}

fn openai_ref(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

/// One operation: a JSON body of schema `request` (if any) answered by `response`. It needs
/// an API key when the server has keys (every operation but the public `/health` and
/// `/metrics`, which are described without one). Every such operation reads, and takes the
/// `roe-min-library-seq` header.
fn operation(summary: &str, request: Option<Value>, response: Value, sse: bool) -> Value {
    let mut content = Map::new();
    content.insert("application/json".into(), json!({ "schema": response }));
    if sse {
        content.insert(
            "text/event-stream".into(),
            json!({"schema": {"type": "string",
                   "description": "With stream: true, one JSON chunk per event, then `data: [DONE]`"}}),
        );
    }
    let mut op = json!({
        "summary": summary,
        "security": [{"bearer": []}],
        "parameters": [{
            "name": crate::MIN_LIBRARY_SEQ_HEADER,
            "in": "header",
            "required": false,
            "description": "Read-your-writes across replicas: the library_seq a write returned (on any replica). The request is served once this replica has applied it, after a wait of at most --min-seq-wait-ms (default 2 s); 503 naming both seqs past that, 400 when it is not a whole number. 0 or absent: no wait.",
            "schema": {"type": "integer", "minimum": 0},
        }],
        "responses": {
            "200": { "description": "OK", "content": content },
            "503": { "description": "This replica has not applied the roe-min-library-seq in time (or no backbone is loaded)",
                "content": {"application/json": {"schema": openai_ref("Error")}} },
            "default": { "description": "An error",
                "content": {"application/json": {"schema": openai_ref("Error")}} }
        }
    });
    if let Some(request) = request {
        op["requestBody"] = json!({
            "required": true,
            "content": {"application/json": {"schema": request}}
        });
    }
    op
}

/// `op` for a path ending in `{id}`: the expert id (or model name), declared as the path
/// parameter OpenAPI requires for every template in a path.
fn with_id(mut op: Value, description: &str) -> Value {
    let id = json!({
        "name": "id",
        "in": "path",
        "required": true,
        "description": description,
        "schema": {"type": "string"},
    });
    match op["parameters"].as_array_mut() {
        Some(parameters) => parameters.insert(0, id),
        None => op["parameters"] = json!([id]),
    }
    op
}

fn document() -> Value {
    let mut schemas = proto_schemas();
    add::<openai::CompletionRequest>(&mut schemas);
    add::<openai::Completion>(&mut schemas);
    add::<openai::ChatRequest>(&mut schemas);
    add::<openai::ChatCompletion>(&mut schemas);
    add::<openai::ChatCompletionChunk>(&mut schemas);
    add::<openai::ModelList>(&mut schemas);
    add::<openai::Model>(&mut schemas);
    schemas.insert(
        "Error".into(),
        json!({"type": "object", "properties": {"error": {"type": "object", "properties": {
            "message": {"type": "string"}, "type": {"type": "string"},
            "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}),
    );
    schemas.insert(
        "Health".into(),
        json!({"type": "object", "properties": {
            "status": {"type": "string", "enum": ["ok", "degraded", "unavailable"]},
            "encoder": {"type": "boolean"},
            "backbone": {"type": ["boolean", "null"], "description": "null: no backbone loaded"},
            "library": {"type": "object", "description": "Where this replica stands against the library's store", "properties": {
                "store": {"type": "string", "description": "sled or postgresql"},
                "shared": {"type": "boolean", "description": "Whether other replicas write to the store"},
                "applied_seq": {"type": "integer", "description": "The change log's seq this replica has applied"},
                "head_seq": {"type": "integer", "description": "The store's head seq when last read"},
                "lag": {"type": "integer", "description": "head_seq - applied_seq"},
                "seconds_since_caught_up": {"type": ["number", "null"], "description": "Since the log was last read; null for an unshared store or before the first read"},
                "last_error": {"type": ["string", "null"], "description": "The last error reading the log while the store stays unreachable"}}}}}),
    );
    let roe = |m: &str| proto_ref(&format!("{PACKAGE}.{m}"));
    // Ids may hold `/` (`org/task`): the routes take the rest of the path, so a client sends
    // them as they are (or with `%2F`).
    const EXPERT_ID: &str = "An expert id; a `/` in it is sent as it is";
    const MODEL_ID: &str = "An expert id (a `/` in it is sent as it is), `base` or `auto`";
    let paths = json!({
        "/v1/models": {"get": operation("Every expert, plus base (the bare backbone) and auto (routed)", None, openai_ref("ModelList"), false)},
        "/v1/models/{id}": {"get": with_id(operation("One model", None, openai_ref("Model"), false), MODEL_ID)},
        "/v1/completions": {"post": operation("OpenAI completions; model: an expert id, base or auto", Some(openai_ref("CompletionRequest")), openai_ref("Completion"), true)},
        "/v1/chat/completions": {"post": operation("OpenAI chat completions; model: an expert id, base or auto", Some(openai_ref("ChatRequest")), openai_ref("ChatCompletion"), true)},
        "/v1/roe/route": {"post": operation("roe.v1.Router/Route", Some(roe("RouteRequest")), roe("RouteResponse"), false)},
        "/v1/roe/score": {"post": operation("roe.v1.Inference/Score", Some(roe("ScoreRequest")), roe("ScoreResponse"), false)},
        "/v1/roe/score-ensemble": {"post": operation("roe.v1.Inference/ScoreEnsemble", Some(roe("ScoreEnsembleRequest")), roe("ScoreEnsembleResponse"), false)},
        "/v1/roe/answer": {"post": operation("roe.v1.Answerer/Answer", Some(roe("AnswerRequest")), roe("AnswerResponse"), false)},
        "/v1/roe/experts": {"get": operation("roe.v1.ExpertLibrary/ListExperts (query: page_size, page_token)", None, roe("ListExpertsResponse"), false)},
        "/v1/roe/experts/{id}": {"get": with_id(operation("roe.v1.ExpertLibrary/GetExpert (query: include_instances)", None, roe("GetExpertResponse"), false), EXPERT_ID)},
        "/metrics": {"get": {"summary": "Prometheus metrics (text format)", "security": [], "responses": {"200": {"description": "OK"}}}},
        "/health": {"get": {"summary": "200 while the encoder and the backbone's queues run, else 503 (a library store that cannot be reached keeps it 200: status degraded)", "security": [], "responses": {
            "200": {"description": "OK", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Health"}}}},
            "503": {"description": "A worker is down", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Health"}}}}}}},
    });
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "roe HTTP API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "OpenAI-compatible completions and chat over roe's experts (model \"auto\" routes each request to the expert that fits it), roe's own endpoints in the proto3 JSON form of its gRPC messages, and Prometheus metrics. Authenticate with `Authorization: Bearer <key>` when the server has keys."
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}
        }
    })
}

pub async fn serve() -> Json<Value> {
    static DOC: OnceLock<Value> = OnceLock::new();
    Json(DOC.get_or_init(document).clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proto_schemas_follow_the_json_mapping() {
        let s = proto_schemas();
        let route = &s["roe.v1.RouteRequest"]["properties"];
        assert_eq!(route["queries"]["type"], "array");
        assert_eq!(
            route["queries"]["items"]["$ref"],
            "#/components/schemas/roe.v1.Query"
        );
        let options = &s["roe.v1.RouteOptions"]["properties"];
        assert!(options.get("abstainThreshold").is_some(), "{options}");
        assert!(s["roe.v1.Strategy"]["enum"]
            .as_array()
            .is_some_and(|v| !v.is_empty()));
        let doc = document();
        // Every reference resolves.
        let text = doc.to_string();
        for r in text.split("\"#/components/schemas/").skip(1) {
            let name = &r[..r.find('"').unwrap()];
            assert!(
                doc["components"]["schemas"].get(name).is_some(),
                "{name} is referenced but not described"
            );
        }
    }

    /// The document passes `openapi-spec-validator` (an OpenAPI 3.1 validator, in the venv
    /// of scripts/openai-venv.sh, which scripts/test.sh makes), as schemathesis and code
    /// generators read it.
    #[test]
    fn the_document_passes_an_openapi_validator() {
        let python = std::env::var_os("ROE_OPENAI_PYTHON")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv-openai/bin/python")
            });
        assert!(
            python.exists(),
            "{} is missing: run scripts/openai-venv.sh (scripts/test.sh does)",
            python.display()
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("openapi.json");
        std::fs::write(&file, document().to_string()).unwrap();
        let out = std::process::Command::new(&python)
            .args(["-m", "openapi_spec_validator"])
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The `{name}`s of a path template.
    fn templates(path: &str) -> Vec<&str> {
        path.split('{')
            .skip(1)
            .filter_map(|rest| rest.split_once('}').map(|(name, _)| name))
            .collect()
    }

    #[test]
    fn every_path_template_is_declared_as_a_path_parameter() {
        let doc = document();
        let paths = doc["paths"].as_object().expect("paths");
        assert!(paths.keys().any(|p| p.contains('{')), "no templated path");
        for (path, item) in paths {
            let templated = templates(path);
            for (method, op) in item.as_object().expect("a path item") {
                let declared: Vec<&str> = op["parameters"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|p| p["in"] == "path" && p["required"] == true)
                    .filter_map(|p| p["name"].as_str())
                    .collect();
                for name in &templated {
                    assert!(
                        declared.contains(name),
                        "{method} {path}: {{{name}}} is not a declared, required path parameter"
                    );
                }
                for name in &declared {
                    assert!(
                        templated.contains(name),
                        "{method} {path}: path parameter {name} is not in the path"
                    );
                }
            }
        }
    }

    #[test]
    fn only_the_public_endpoints_go_without_a_key() {
        let doc = document();
        // A document-wide requirement would cover the public endpoints too.
        assert!(doc.get("security").is_none(), "{}", doc["security"]);
        for (path, item) in doc["paths"].as_object().expect("paths") {
            let public = crate::PUBLIC_PATHS.contains(&path.as_str());
            for (method, op) in item.as_object().expect("a path item") {
                let needs_key = op["security"].as_array().is_some_and(|s| !s.is_empty());
                assert_eq!(needs_key, !public, "{method} {path}: {}", op["security"]);
            }
        }
    }
}
