//! Bad requests to the HTTP API of a real `roe serve`: each gets OpenAI's error body with the
//! status a client expects and the field at fault in `param`, under OpenAI's name; none
//! stops the server or changes the library.
mod common;

use serde_json::{json, Value};

use common::{http_call, start_serve_http, KillOnDrop};

/// (status, error.param, error.code) of a response body that must be an error.
fn error_of(status: u16, body: &str) -> (u16, Option<String>, Option<String>) {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].as_str().is_some(), "{v}");
    assert!(body.len() < 1400, "a short message: {} bytes", body.len());
    (
        status,
        e["param"].as_str().map(str::to_string),
        e["code"].as_str().map(str::to_string),
    )
}

#[test]
fn bad_requests_get_openai_errors_naming_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let (child, _grpc, http) = start_serve_http(&tmp.path().join("library"), &[]);
    let _server = KillOnDrop(child);
    let long = "x".repeat(100_000);
    // Past the 128 characters an expert id may have.
    let id_200 = "x".repeat(200);
    let cases: Vec<(&str, &str, String, u16, Option<&str>)> = vec![
        // (endpoint, what, body, status, param)
        ("/v1/completions", "not JSON", "{".into(), 400, Some("body")),
        ("/v1/completions", "not an object", "[1]".into(), 400, Some("body")),
        ("/v1/completions", "no model", json!({"prompt": "x"}).to_string(), 400, Some("model")),
        ("/v1/completions", "empty model", json!({"model": "", "prompt": "x"}).to_string(), 400, Some("model")),
        ("/v1/completions", "unknown model", json!({"model": "nope", "prompt": "x"}).to_string(), 404, Some("model")),
        ("/v1/completions", "unknown field", json!({"model": "base", "prompt": "x", "frobnicate": 1}).to_string(), 400, Some("frobnicate")),
        ("/v1/completions", "n = 3", json!({"model": "base", "prompt": "x", "n": 3}).to_string(), 400, Some("n")),
        ("/v1/completions", "a penalty", json!({"model": "base", "prompt": "x", "presence_penalty": 0.5}).to_string(), 400, Some("presence_penalty")),
        ("/v1/completions", "top logprobs", json!({"model": "base", "prompt": "x", "logprobs": 3}).to_string(), 400, Some("logprobs")),
        ("/v1/completions", "max_tokens 0", json!({"model": "base", "prompt": "x", "max_tokens": 0}).to_string(), 400, Some("max_tokens")),
        ("/v1/completions", "max_tokens over the limit", json!({"model": "base", "prompt": "x", "max_tokens": 100000}).to_string(), 400, Some("max_tokens")),
        ("/v1/completions", "temperature NaN-like", json!({"model": "base", "prompt": "x", "temperature": 50}).to_string(), 400, Some("temperature")),
        ("/v1/completions", "top_p 2", json!({"model": "base", "prompt": "x", "top_p": 2}).to_string(), 400, Some("top_p")),
        ("/v1/completions", "negative seed", json!({"model": "base", "prompt": "x", "seed": -1}).to_string(), 400, Some("seed")),
        ("/v1/completions", "empty prompt", json!({"model": "base", "prompt": "  "}).to_string(), 400, Some("prompt")),
        ("/v1/completions", "no prompts", json!({"model": "base", "prompt": []}).to_string(), 400, Some("prompt")),
        ("/v1/completions", "too long a prompt", json!({"model": "base", "prompt": long}).to_string(), 400, Some("prompt")),
        ("/v1/completions", "max_tokens a string", json!({"model": "base", "prompt": "x", "max_tokens": "many"}).to_string(), 400, Some("max_tokens")),
        ("/v1/completions", "max_tokens -1", json!({"model": "base", "prompt": "x", "max_tokens": -1}).to_string(), 400, Some("max_tokens")),
        ("/v1/completions", "prompt a number", json!({"model": "base", "prompt": 42}).to_string(), 400, Some("prompt")),
        ("/v1/completions", "stream a string", json!({"model": "base", "prompt": "x", "stream": "yes"}).to_string(), 400, Some("stream")),
        ("/v1/completions", "stream_options with an unknown key", json!({"model": "base", "prompt": "x", "stream": true, "stream_options": {"include_usage": true, "frobnicate": 1}}).to_string(), 400, Some("stream_options.frobnicate")),
        ("/v1/completions", "stream_options without stream", json!({"model": "base", "prompt": "x", "stream_options": {"include_usage": true}}).to_string(), 400, Some("stream_options")),
        ("/v1/completions", "stream_options with stream false", json!({"model": "base", "prompt": "x", "stream": false, "stream_options": {}}).to_string(), 400, Some("stream_options")),
        ("/v1/completions", "model of 200 characters", json!({"model": id_200, "prompt": "x"}).to_string(), 400, Some("model")),
        ("/v1/completions", "routing options without auto", json!({"model": "base", "prompt": "x", "roe": {"queries": ["q"]}}).to_string(), 400, Some("roe")),
        ("/v1/completions", "auto on an empty library", json!({"model": "auto", "prompt": "x"}).to_string(), 400, None),
        ("/v1/chat/completions", "no messages", json!({"model": "base", "messages": []}).to_string(), 400, Some("messages")),
        ("/v1/chat/completions", "a message without content", json!({"model": "base", "messages": [{"role": "user"}]}).to_string(), 400, Some("messages[0].content")),
        ("/v1/chat/completions", "a role of the wrong type", json!({"model": "base", "messages": [{"role": 7, "content": "x"}]}).to_string(), 400, Some("messages[0].role")),
        ("/v1/chat/completions", "stream_options without stream", json!({"model": "base", "messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": true}}).to_string(), 400, Some("stream_options")),
        ("/v1/chat/completions", "model of 200 characters", json!({"model": id_200, "messages": [{"role": "user", "content": "x"}]}).to_string(), 400, Some("model")),
        ("/v1/chat/completions", "a robot's role", json!({"model": "base", "messages": [{"role": "robot", "content": "x"}]}).to_string(), 400, Some("messages[0].role")),
        ("/v1/chat/completions", "an image part", json!({"model": "base", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}).to_string(), 400, Some("messages[0].content[0].type")),
        ("/v1/chat/completions", "the assistant last", json!({"model": "base", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}).to_string(), 400, Some("messages[1].role")),
        ("/v1/chat/completions", "top_logprobs", json!({"model": "base", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}).to_string(), 400, Some("top_logprobs")),
        ("/v1/roe/route", "no queries", json!({"queries": []}).to_string(), 400, None),
        ("/v1/roe/route", "an unknown field", json!({"queries": [{"input": "x"}], "nope": 1}).to_string(), 400, None),
        ("/v1/roe/route", "top_k over the limit", json!({"queries": [{"input": "x"}], "options": {"topK": 5000}}).to_string(), 400, Some("options.top_k")),
        ("/v1/roe/score", "no choices", json!({"input": "x", "choices": []}).to_string(), 400, Some("choices")),
        ("/v1/roe/answer", "nothing to answer", json!({}).to_string(), 400, Some("inputs")),
    ];
    let mut failures = Vec::new();
    for (endpoint, what, body, status, param) in &cases {
        eprintln!("{endpoint}: {what}");
        let (got, text) = http_call(&http, "POST", endpoint, Some(body));
        let (got, got_param, _code) = error_of(got, &text);
        if got != *status || (param.is_some() && got_param.as_deref() != *param) {
            failures.push(format!(
                "{endpoint} {what}: {got} param {got_param:?}, expected {status} {param:?}: {text}"
            ));
        }
        // The server is still there after each.
        assert_eq!(
            http_call(&http, "GET", "/health", None).0,
            200,
            "after {what}"
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // GET on a POST endpoint, an unknown path, a body past the limit.
    let (status, _) = http_call(&http, "GET", "/v1/completions", None);
    assert_eq!(status, 405);
    let (status, body) = http_call(&http, "GET", "/v1/nothing-here", None);
    assert_eq!(error_of(status, &body).0, 404);
    // A body announced past the 64 MiB limit is refused before any of it is sent.
    {
        use std::io::{Read, Write};
        let addr = http.trim_start_matches("http://");
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(
            s,
            "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            65 << 20
        )
        .unwrap();
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw);
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
        assert_eq!(
            error_of(status, body),
            (413, None, Some("limit_exceeded".into())),
            "{text}"
        );
    }
    let (status, body) = http_call(&http, "GET", "/v1/roe/experts?page_size=nope", None);
    assert_eq!(error_of(status, &body).0, 400);
    let (status, body) = http_call(&http, "GET", "/v1/roe/experts/nope", None);
    assert_eq!(error_of(status, &body).0, 404);
    let (status, body) = http_call(&http, "GET", "/v1/models/nope", None);
    assert_eq!(
        error_of(status, &body),
        (404, Some("model".into()), Some("model_not_found".into()))
    );
    // An id with a `/` reaches the handler as it is (a missing model, not an unknown URL).
    let (status, body) = http_call(&http, "GET", "/v1/models/org/task", None);
    assert_eq!(
        error_of(status, &body),
        (404, Some("model".into()), Some("model_not_found".into()))
    );
    // An id no expert could have is the caller's mistake, named, not a missing model.
    for endpoint in ["/v1/models", "/v1/roe/experts"] {
        let (status, body) = http_call(&http, "GET", &format!("{endpoint}/{id_200}"), None);
        assert_eq!(
            error_of(status, &body),
            (400, Some("id".into()), None),
            "{endpoint}"
        );
    }
    // Nothing was stored by any of it.
    let (status, body) = http_call(&http, "GET", "/v1/roe/experts", None);
    assert_eq!(status, 200);
    let listed: Value = serde_json::from_str(&body).unwrap();
    assert!(
        listed["experts"].as_array().is_none_or(|e| e.is_empty()),
        "{listed}"
    );
}
