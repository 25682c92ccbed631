//! The admin API against the running daemon: endpoint lifecycle, secrets, history,
//! replay, the Linkly-compatible routes, auth and the SSRF guard. Nothing is mocked: every
//! call goes over HTTP to the real binary, and what endpoints receive comes from real sinks.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

/// `PATCH {"enabled": true}` turns on again a config endpoint that a 410 or
/// `disable_after` turned off, not one the file itself disables: that answers 409 and
/// changes nothing, where it answered 200 and left the endpoint off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_endpoint_the_file_disables_is_not_enabled_through_the_api() {
    let sink = Sink::start().await;
    let d = Daemon::start(&config_text(&endpoint("off", &sink.url("/off"), "enabled = false")));
    let (s, v) = d
        .admin_request("PATCH", "/v1/endpoints/off", json!({"enabled": true}))
        .await;
    assert_eq!(s, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("config file"), "{v}");
    let (s, v) = d.admin_request("GET", "/v1/endpoints/off", Value::Null).await;
    assert_eq!((s, &v["enabled"]), (200, &json!(false)), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_lifecycle_survives_restarts_and_config_endpoints_are_read_only() {
    let sink = Sink::start().await;
    let mut d = Daemon::start(&config_text(&endpoint("from-file", &sink.url("/file"), "")));
    let (s, created) = d
        .admin_request(
            "POST",
            "/v1/endpoints",
            json!({"id": "api1", "url": sink.url("/api1"), "links": [7]}),
        )
        .await;
    assert_eq!(s, 201, "{created}");
    assert_eq!(created["source"], "api");
    assert!(created["secret"].as_str().unwrap().starts_with("whsec_"));
    assert_eq!(created["links"], json!(["7"]));
    let (s, _) = d
        .admin_request("POST", "/v1/endpoints", json!({"id": "api1", "url": sink.url("/x")}))
        .await;
    assert_eq!(s, 409, "duplicate id");
    let (s, bad) = d
        .admin_request("POST", "/v1/endpoints", json!({"id": "bad", "url": "ftp://x"}))
        .await;
    assert_eq!(s, 400, "{bad}");
    let (s, reserved) = d
        .admin_request(
            "POST",
            "/v1/endpoints",
            json!({"id": "_operations", "url": sink.url("/ops")}),
        )
        .await;
    assert_eq!(s, 400, "the operations endpoint's id is taken: {reserved}");
    assert!(reserved.to_string().contains("reserved"), "{reserved}");
    // A field of the wrong type is named, on a create and on a change.
    let (s, typed) = d
        .admin_request(
            "POST",
            "/v1/endpoints",
            json!({"id": "typed", "url": sink.url("/t"), "max_concurrency": "many"}),
        )
        .await;
    assert_eq!(s, 400, "{typed}");
    assert!(
        typed["error"].as_str().unwrap().starts_with("max_concurrency: "),
        "{typed}"
    );
    let (s, typed) = d
        .admin_request("PATCH", "/v1/endpoints/api1", json!({"links": "7"}))
        .await;
    assert_eq!(s, 400, "{typed}");
    assert!(typed["error"].as_str().unwrap().starts_with("links: "), "{typed}");
    // A list's limit out of range is refused, not bent into range.
    for bad in ["0", "10001", "ten", "-1"] {
        for list in ["attempts", "dead"] {
            let (s, v) = d
                .admin_request("GET", &format!("/v1/endpoints/api1/{list}?limit={bad}"), Value::Null)
                .await;
            assert_eq!(s, 400, "{list}?limit={bad}: {v}");
            assert!(v["error"].as_str().unwrap().starts_with("limit: "), "{v}");
        }
    }
    let (s, v) = d
        .admin_request("GET", "/v1/endpoints/api1/attempts?limit=10000", Value::Null)
        .await;
    assert_eq!(s, 200, "{v}");
    // A known route asked with another method is 405 and names the ones it takes.
    let (s, v) = d.admin_request("PUT", "/v1/endpoints/api1", json!({})).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (405, Some("this route takes GET, PATCH, DELETE")),
        "{v}"
    );
    let (s, v) = d.admin_request("GET", "/v1/endpoints/api1/replay", Value::Null).await;
    assert_eq!((s, v["error"].as_str()), (405, Some("this route takes POST")), "{v}");
    // So are the open routes, which take GET only.
    for open in ["/healthz", "/readyz", "/metrics"] {
        let (s, v) = d.admin_request("POST", open, Value::Null).await;
        assert_eq!(
            (s, v["error"].as_str()),
            (405, Some("this route takes GET")),
            "{open}: {v}"
        );
    }
    let mut raw = tokio::net::TcpStream::connect(d.admin.trim_start_matches("http://"))
        .await
        .unwrap();
    let asked = b"DELETE /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";
    tokio::io::AsyncWriteExt::write_all(&mut raw, asked).await.unwrap();
    let mut answer = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut raw, &mut answer)
        .await
        .unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 405") && answer.to_ascii_lowercase().contains("\r\nallow: get\r\n"),
        "{answer}"
    );
    let (s, _) = d.admin_request("GET", "/v1/nowhere", Value::Null).await;
    assert_eq!(s, 404);
    let (s, list) = d.admin_request("GET", "/v1/endpoints", Value::Null).await;
    assert_eq!(s, 200);
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert!(!list.to_string().contains("whsec_"), "secrets never appear in lists");
    let (s, one) = d.admin_request("GET", "/v1/endpoints/api1", Value::Null).await;
    assert_eq!(s, 200);
    for key in [
        "id",
        "url",
        "format",
        "workspaces",
        "links",
        "include_bots",
        "include_ip",
        "timeout",
        "max_concurrency",
        "rate_limit",
        "batch_max",
        "batch_linger",
        "headers",
        "enabled",
        "disabled_reason",
        "source",
        "created_at",
    ] {
        assert!(one.get(key).is_some(), "endpoint lacks {key}: {one}");
    }
    let (s, patched) = d
        .admin_request(
            "PATCH",
            "/v1/endpoints/api1",
            json!({"links": [], "include_bots": true}),
        )
        .await;
    assert_eq!(s, 200, "{patched}");
    assert_eq!(patched["include_bots"], true);
    assert_eq!(
        d.admin_request("PATCH", "/v1/endpoints/from-file", json!({"url": "http://x"}))
            .await
            .0,
        409
    );
    assert_eq!(
        d.admin_request("DELETE", "/v1/endpoints/from-file", Value::Null)
            .await
            .0,
        409
    );
    assert_eq!(
        d.admin_request("POST", "/v1/endpoints/from-file/secret/rotate", Value::Null)
            .await
            .0,
        409
    );
    assert_eq!(d.admin_request("GET", "/v1/endpoints/nope", Value::Null).await.0, 404);

    // The API endpoint, its change and its secret survive a restart.
    assert_eq!(d.terminate(), 0);
    d.spawn();
    let (s, again) = d.admin_request("GET", "/v1/endpoints/api1", Value::Null).await;
    assert_eq!(s, 200);
    assert_eq!(again["include_bots"], true);
    assert_eq!(again["created_at"], one["created_at"]);
    let (_, secret) = d.admin_request("GET", "/v1/endpoints/api1/secret", Value::Null).await;
    assert_eq!(secret["secret"], created["secret"]);
    d.post(&click("7", "w"), "application/json").await;
    let got = sink.wait_for("/api1", 1, WAIT).await;
    assert!(signature_valid(&got[0], secret["secret"].as_str().unwrap()));

    assert_eq!(
        d.admin_request("DELETE", "/v1/endpoints/api1", Value::Null).await.0,
        200
    );
    assert_eq!(d.admin_request("GET", "/v1/endpoints/api1", Value::Null).await.0, 404);
    assert_eq!(d.terminate(), 0);
    d.spawn();
    assert_eq!(
        d.admin_request("GET", "/v1/endpoints/api1", Value::Null).await.0,
        404,
        "deletion survives restarts"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_signs_with_both_secrets() {
    let sink = Sink::start().await;
    let d = Daemon::start(&config_text(""));
    let (_, created) = d
        .admin_request("POST", "/v1/endpoints", json!({"id": "r", "url": sink.url("/r")}))
        .await;
    let old = created["secret"].as_str().unwrap().to_string();
    let (s, rotated) = d
        .admin_request("POST", "/v1/endpoints/r/secret/rotate", Value::Null)
        .await;
    assert_eq!(s, 200);
    let new = rotated["secret"].as_str().unwrap().to_string();
    assert_ne!(old, new);
    let (_, shown) = d.admin_request("GET", "/v1/endpoints/r/secret", Value::Null).await;
    assert_eq!(shown["secret"], new.as_str());
    d.post(&click("1", "w"), "application/json").await;
    let got = sink.wait_for("/r", 1, WAIT).await;
    let sig = &got[0].headers["webhook-signature"];
    assert_eq!(sig.split(' ').count(), 2, "{sig}");
    assert!(signature_valid(&got[0], &new) && signature_valid(&got[0], &old));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_event_attempts_stats_dead_letters_and_replay() {
    let sink = Sink::start().await;
    sink.default_answer("/d", Answer::Status(500));
    let cfg = config_text(&endpoint("d", &sink.url("/d"), "")) + "\n[retry]\nschedule = [\"20ms\"]\njitter = 0.0\n";
    let d = Daemon::start(&cfg);
    let (s, test) = d.admin_request("POST", "/v1/endpoints/d/test", Value::Null).await;
    assert_eq!(s, 200);
    assert_eq!(test["status"], 500);
    assert_eq!(test["body"], "ok");
    assert!(test["latency_ms"].as_f64().unwrap() >= 0.0);
    let (_, v) = d
        .post(
            &format!("[{},{}]", click("1", "w"), click("2", "w")),
            "application/json",
        )
        .await;
    assert_eq!(
        d.metric_until("clickhook_dead_letters_total{endpoint=\"d\"}", |v| v == 2.0)
            .await,
        2.0
    );
    let (_, dead) = d.admin_request("GET", "/v1/endpoints/d/dead", Value::Null).await;
    let mut dead_ids: Vec<String> = dead
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["event_id"].as_str().unwrap().to_string())
        .collect();
    dead_ids.sort();
    let mut ids: Vec<String> = accepted_ids(&v);
    ids.sort();
    assert_eq!(dead_ids, ids);
    assert_eq!(dead[0]["last_status"], 500);
    let (_, attempts) = d
        .admin_request("GET", "/v1/endpoints/d/attempts?limit=3", Value::Null)
        .await;
    let attempts = attempts.as_array().unwrap();
    assert_eq!(attempts.len(), 3);
    for a in attempts {
        assert_eq!(a["status"], 500);
        assert_eq!(a["outcome"], "http_5xx");
        assert!(a["attempt"].as_u64().unwrap() >= 1 && a["at"].as_str().unwrap().ends_with('Z'));
    }
    let (_, stats) = d.admin_request("GET", "/v1/endpoints/d/stats", Value::Null).await;
    assert_eq!(stats["delivered"], 0);
    assert_eq!(stats["failed_attempts"], 4);
    assert_eq!(stats["pending"], 0);
    assert_eq!(stats["dead"], 2);
    assert_eq!(stats["success_rate_1h"], 0.0);
    assert_eq!(stats["circuit"], "closed");

    // The receiver recovers: replaying the dead letters delivers them, and they leave the list.
    sink.default_answer("/d", Answer::Status(200));
    let (s, r) = d
        .admin_request("POST", "/v1/endpoints/d/replay", json!({"dead": true}))
        .await;
    assert_eq!((s, r["replayed"].as_u64()), (200, Some(2)));
    let deadline = std::time::Instant::now() + WAIT;
    while std::time::Instant::now() < deadline {
        let (_, st) = d.admin_request("GET", "/v1/endpoints/d/stats", Value::Null).await;
        if st["delivered"] == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, stats) = d.admin_request("GET", "/v1/endpoints/d/stats", Value::Null).await;
    assert_eq!(
        (stats["delivered"].as_u64(), stats["dead"].as_u64()),
        (Some(2), Some(0)),
        "{stats}"
    );
    let rate = stats["success_rate_1h"].as_f64().unwrap();
    assert!(rate > 0.0 && rate < 1.0);

    // A window replay sends every retained click accepted in it again.
    let since = (chrono::Utc::now() - chrono::Duration::minutes(5)).to_rfc3339();
    let until = (chrono::Utc::now() + chrono::Duration::minutes(1)).to_rfc3339();
    let before = sink.received("/d").len();
    let (s, r) = d
        .admin_request(
            "POST",
            "/v1/endpoints/d/replay",
            json!({"since": since, "until": until}),
        )
        .await;
    assert_eq!((s, r["replayed"].as_u64()), (200, Some(2)));
    sink.wait_for("/d", before + 2, WAIT).await;
    let (s, _) = d
        .admin_request("POST", "/v1/endpoints/d/replay", json!({"since": "yesterday"}))
        .await;
    assert_eq!(s, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_replay_sends_only_what_the_endpoints_filters_take() {
    let sink = Sink::start().await;
    sink.default_answer("/gone", Answer::Status(410));
    let eps = endpoint("l7", &sink.url("/l7"), "links = [\"7\"]")
        + &endpoint("all", &sink.url("/all"), "")
        + &endpoint("bots", &sink.url("/bots"), "include_bots = true")
        + &endpoint("gone", &sink.url("/gone"), "links = [\"9\"]");
    let cfg = config_text(&eps) + &format!("\n[operations]\nurl = \"{}\"\n", sink.url("/ops"));
    let d = Daemon::start(&cfg);
    let bot = r#"{"link":{"id":7},"click":{"user_agent":"Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"}}"#;
    for body in [click("7", "w"), click("8", "w"), bot.to_string(), click("9", "w")] {
        let (s, v) = d.post(&body, "application/json").await;
        assert_eq!(s, 202, "{v}");
    }
    // The 410 leaves an operational event (endpoint.disabled) in the same log.
    sink.wait_for("/ops", 1, WAIT).await;
    sink.wait_for("/l7", 1, WAIT).await;
    sink.wait_for("/all", 3, WAIT).await;
    sink.wait_for("/bots", 4, WAIT).await;
    let since = (chrono::Utc::now() - chrono::Duration::minutes(5)).to_rfc3339();
    let until = (chrono::Utc::now() + chrono::Duration::minutes(1)).to_rfc3339();
    let window = json!({"since": since, "until": until});
    for (id, want) in [("l7", 1), ("all", 3), ("bots", 4), ("gone", 1)] {
        let (s, r) = d
            .admin_request("POST", &format!("/v1/endpoints/{id}/replay"), window.clone())
            .await;
        assert_eq!((s, r["replayed"].as_u64()), (200, Some(want)), "{id}: {r}");
    }
    sink.wait_for("/l7", 2, WAIT).await;
    sink.wait_for("/all", 6, WAIT).await;
    sink.wait_for("/bots", 8, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let links = |path: &str| -> Vec<String> {
        let mut links: Vec<String> = sink
            .received(path)
            .iter()
            .map(|r| r.json()["data"]["link"]["id"].to_string())
            .collect();
        links.sort();
        links
    };
    assert_eq!(
        links("/l7"),
        ["\"7\"", "\"7\""].map(String::from),
        "link 7 only, the bot left out"
    );
    assert_eq!(links("/all").len(), 6, "no bot and no operational event");
    assert_eq!(links("/bots").len(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linkly_compatible_routes_create_link_and_workspace_hooks() {
    let sink = Sink::start().await;
    let d = Daemon::start(&config_text(""));
    let (s, hook) = d
        .admin_request("POST", "/api/v1/link/12345/webhooks", json!({"url": sink.url("/l")}))
        .await;
    assert_eq!(s, 201, "{hook}");
    assert_eq!(hook.as_object().unwrap().len(), 2, "{hook}");
    let (s, ws) = d
        .admin_request("POST", "/api/v1/workspace/1/webhooks", json!({"url": sink.url("/w")}))
        .await;
    assert_eq!(s, 201);
    let (_, list) = d.admin_request("GET", "/api/v1/link/12345/webhooks", Value::Null).await;
    assert_eq!(list, json!([hook]));
    let (_, ep) = d
        .admin_request(
            "GET",
            &format!("/v1/endpoints/{}", hook["id"].as_str().unwrap()),
            Value::Null,
        )
        .await;
    assert_eq!(ep["format"], "linkly");
    d.post(
        r#"{"link":{"id":12345,"workspace_id":1},"click":{"ip":"203.0.113.9"}}"#,
        "application/json",
    )
    .await;
    let l = sink.wait_for("/l", 1, WAIT).await;
    let w = sink.wait_for("/w", 1, WAIT).await;
    assert_eq!(l[0].json()["event"], "click");
    assert_eq!(w[0].json()["link"]["id"], 12345);
    assert!(
        !String::from_utf8_lossy(&l[0].body).contains("203.0.113.9"),
        "linkly never sends the IP"
    );
    let path = format!("/api/v1/workspace/1/webhooks/{}", ws["id"].as_str().unwrap());
    assert_eq!(d.admin_request("DELETE", &path, Value::Null).await.0, 200);
    assert_eq!(
        d.admin_request("GET", "/api/v1/workspace/1/webhooks", Value::Null)
            .await
            .1,
        json!([])
    );
    let wrong = format!("/api/v1/link/999/webhooks/{}", hook["id"].as_str().unwrap());
    assert_eq!(d.admin_request("DELETE", &wrong, Value::Null).await.0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_token_guards_the_api_but_not_health_or_metrics() {
    let d = Daemon::start(&config_text("").replace(
        "[admin]\nlisten = \"127.0.0.1:0\"",
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"adm1n\"",
    ));
    for path in ["/v1/endpoints", "/api/v1/link/1/webhooks"] {
        let (s, _) = request("GET", &format!("{}{path}", d.admin), "", &[]).await;
        assert_eq!(s, 401, "{path}");
        let (s, _) = request(
            "GET",
            &format!("{}{path}", d.admin),
            "",
            &[("authorization", "Bearer nope")],
        )
        .await;
        assert_eq!(s, 401);
        let (s, _) = request(
            "GET",
            &format!("{}{path}", d.admin),
            "",
            &[("authorization", "Bearer adm1n")],
        )
        .await;
        assert_eq!(s, 200);
    }
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(
            raw_request("GET", &format!("{}{path}", d.admin), "", &[]).await.0,
            200,
            "{path}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_in_private_networks_are_refused_at_creation() {
    let d = Daemon::start(&config_text("").replace("allow_private_networks = true", "allow_private_networks = false"));
    for url in [
        "http://127.0.0.1/x",
        "http://localhost:8080/x",
        "http://10.1.2.3/x",
        "http://172.16.0.1/x",
        "http://192.168.1.1/x",
        "http://169.254.169.254/latest/meta-data",
        "http://100.64.0.1/x",
        "http://[::1]/x",
        "http://[fd00::1]/x",
        "http://[fe80::1]/x",
    ] {
        let (s, body) = d
            .admin_request("POST", "/v1/endpoints", json!({"id": "p", "url": url}))
            .await;
        assert_eq!(s, 400, "{url}: {body}");
        assert!(body["error"].as_str().unwrap().contains("private"), "{url}: {body}");
    }
    let (s, body) = d
        .admin_request("POST", "/v1/endpoints", json!({"id": "p", "url": "file:///etc/passwd"}))
        .await;
    assert_eq!(s, 400, "{body}");
    let (_, list) = d.admin_request("GET", "/v1/endpoints", Value::Null).await;
    assert_eq!(list, json!([]), "nothing was created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_list_endpoints_show_stats_and_replay_dead_letters() {
    let sink = Sink::start().await;
    sink.default_answer("/c", Answer::Status(500));
    let cfg = config_text(&endpoint("c", &sink.url("/c"), "")) + "\n[retry]\nschedule = [\"10ms\"]\njitter = 0.0\n";
    let d = Daemon::start(&cfg);
    d.post(&click("1", "w"), "application/json").await;
    d.metric_until("clickhook_dead_letters_total{endpoint=\"c\"}", |v| v == 1.0)
        .await;
    let run = |args: &[&str]| {
        let out = std::process::Command::new(bin())
            .args(args)
            .args(["--admin", &d.admin])
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (code, text) = run(&["endpoints"]);
    assert_eq!(code, Some(0));
    assert!(text.lines().nth(1).unwrap().starts_with("c "), "{text}");
    let (code, text) = run(&["dead", "c"]);
    assert_eq!(code, Some(0));
    assert!(text.contains("event_id"));
    sink.default_answer("/c", Answer::Status(200));
    let (code, text) = run(&["replay", "c"]);
    assert_eq!((code, text.contains("\"replayed\": 1")), (Some(0), true), "{text}");
    sink.wait_for("/c", 3, WAIT).await;
    // The sink has the request before the daemon has read the answer: ask until it has.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (code, text) = run(&["stats", "c"]);
        assert_eq!(code, Some(0));
        let stats: Value = serde_json::from_str(&text).unwrap();
        if stats["delivered"] == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never counted as delivered: {stats}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(run(&["stats", "missing"]).0, Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1a_signatures_verify_with_the_public_key_from_the_api() {
    use base64::Engine;
    use ed25519_dalek::Verifier;
    let b64 = base64::engine::general_purpose::STANDARD;
    let sink = Sink::start().await;
    let d = Daemon::start(&config_text(&endpoint(
        "both",
        &sink.url("/both"),
        "signature = \"both\"",
    )));
    let (s, secret) = d.admin_request("GET", "/v1/endpoints/both/secret", Value::Null).await;
    assert_eq!(s, 200);
    let public = secret["public_key"]
        .as_str()
        .expect("a v1a endpoint shows its public key");
    let (_, ep) = d.admin_request("GET", "/v1/endpoints/both", Value::Null).await;
    assert_eq!(ep["signature"], "both");
    assert!(!ep.to_string().contains("whsk_"), "the private key never shows");
    d.post(&click("1", "w"), "application/json").await;
    let r = &sink.wait_for("/both", 1, WAIT).await[0];
    assert!(signature_valid(r, SECRET), "the v1 signature still verifies");
    let v1a = r.headers["webhook-signature"]
        .split(' ')
        .find_map(|s| s.strip_prefix("v1a,"))
        .expect("a v1a signature");
    let key: [u8; 32] = b64
        .decode(public.strip_prefix("whpk_").unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let vk = ed25519_dalek::VerifyingKey::from_bytes(&key).unwrap();
    let sig = ed25519_dalek::Signature::from_slice(&b64.decode(v1a).unwrap()).unwrap();
    let mut msg = format!("{}.{}.", r.headers["webhook-id"], r.headers["webhook-timestamp"]).into_bytes();
    msg.extend_from_slice(&r.body);
    assert!(vk.verify(&msg, &sig).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operational_events_tell_of_failing_dead_letters_recovery_and_disabling() {
    let sink = Sink::start().await;
    sink.script(
        "/flaky",
        vec![Answer::Status(500), Answer::Status(500), Answer::Status(500)],
    );
    sink.default_answer("/gone", Answer::Status(410));
    let eps = endpoint("flaky", &sink.url("/flaky"), "max_concurrency = 1") + &endpoint("gone", &sink.url("/gone"), "");
    let cfg = config_text(&eps)
        + &format!(
            "\n[retry]\nschedule = [\"20ms\", \"20ms\"]\njitter = 0.0\n[operations]\nurl = \"{}\"\nsecret = \"{SECRET}\"\nfailing_after = 2\n",
            sink.url("/ops")
        );
    let d = Daemon::start(&cfg);
    // Two clicks: the first fails three times (dead letter after 2 retries), the second succeeds.
    d.post(&click("1", "w"), "application/json").await;
    sink.wait_for("/flaky", 3, WAIT).await;
    d.post(&click("2", "w"), "application/json").await;
    let deadline = std::time::Instant::now() + WAIT;
    let kinds = |sink: &Sink| {
        sink.received("/ops")
            .iter()
            .map(|r| r.json()["type"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    while std::time::Instant::now() < deadline {
        let k = kinds(&sink);
        if [
            "endpoint.failing",
            "endpoint.dead_letter",
            "endpoint.recovered",
            "endpoint.disabled",
        ]
        .iter()
        .all(|t| k.iter().any(|x| x == t))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let events: Vec<Value> = sink.received("/ops").iter().map(|r| r.json()).collect();
    let find = |t: &str| {
        events
            .iter()
            .find(|e| e["type"] == t)
            .unwrap_or_else(|| panic!("no {t} in {events:?}"))
            .clone()
    };
    assert_eq!(find("endpoint.failing")["data"]["endpoint"], "flaky");
    assert_eq!(find("endpoint.failing")["data"]["consecutive_failures"], 2);
    assert_eq!(
        find("endpoint.dead_letter")["data"]["event_ids"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(find("endpoint.recovered")["data"]["endpoint"], "flaky");
    let disabled = find("endpoint.disabled");
    assert_eq!(
        (
            disabled["data"]["endpoint"].as_str(),
            disabled["data"]["reason"].as_str()
        ),
        (Some("gone"), Some("gone"))
    );
    for r in sink.received("/ops") {
        assert!(signature_valid(&r, SECRET), "operational events are signed");
        assert_eq!(r.headers["webhook-id"], r.json()["id"].as_str().unwrap());
    }
    let (_, list) = d.admin_request("GET", "/v1/endpoints", Value::Null).await;
    assert!(
        !list.to_string().contains("_operations"),
        "the operations endpoint is internal"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_failing_for_disable_after_is_disabled() {
    let sink = Sink::start().await;
    sink.default_answer("/down", Answer::Status(503));
    let steps = vec!["\"50ms\""; 40].join(", ");
    let cfg = config_text(&endpoint("down", &sink.url("/down"), ""))
        + &format!("\n[retry]\nschedule = [{steps}]\njitter = 0.0\n[breaker]\nfailures = 1000\n[operations]\ndisable_after = \"300ms\"\n");
    let d = Daemon::start(&cfg);
    d.post(&click("1", "w"), "application/json").await;
    disabled_for_failing(&d, "down", "failing past disable_after").await;
    // A config-file endpoint is switched off in the file, not here; switched back on here.
    let (s, v) = d
        .admin_request("PATCH", "/v1/endpoints/down", json!({"enabled": false}))
        .await;
    assert_eq!(s, 409, "{v}");
    let (s, v) = d
        .admin_request("PATCH", "/v1/endpoints/down", json!({"enabled": true}))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (v["enabled"].as_bool(), v["disabled_reason"].as_str()),
        (Some(true), None),
        "{v}"
    );
}

/// `disable_after` counts the time an endpoint has been seen failing, across restarts: a
/// daemon restarted more often than `disable_after` still disables an endpoint that never
/// recovers. The time it is down does not count. Enabling the endpoint again starts the
/// count anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_after_counts_the_failing_seen_across_a_restart_and_anew_after_a_re_enable() {
    let sink = Sink::start().await;
    sink.default_answer("/down", Answer::Status(503));
    // A run is kept once it has lasted a quarter of disable_after (750 ms), refreshed as
    // often, and when the daemon stops.
    let cfg = config_text(&endpoint("down", &sink.url("/down"), ""))
        + "\n[retry]\nschedule = [\"500ms\", \"500ms\", \"500ms\", \"500ms\", \"1h\"]\njitter = 0.0\n[breaker]\nfailures = 1000\n[operations]\ndisable_after = \"3s\"\n";
    let mut d = Daemon::start(&cfg);
    d.post(&click("1", "w"), "application/json").await;
    // Five failures over 2 s, and the stop: about 2 s of failing is kept.
    assert_eq!(sink.wait_for("/down", 5, WAIT).await.len(), 5);
    assert_eq!(d.terminate(), 0);
    // Down for longer than disable_after: that does not count.
    tokio::time::sleep(Duration::from_millis(3_200)).await;
    d.spawn();
    d.post(&click("2", "w"), "application/json").await;
    assert_eq!(sink.wait_for("/down", 6, WAIT).await.len(), 6);
    // Time for a disable that the failure would bring (it follows the answer).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, ep) = d.admin_get("/v1/endpoints/down").await;
    assert_eq!(ep["enabled"], true, "the time the daemon was down counted: {ep}");
    // Click 2's retries fail 0.5 s apart: about 2 s kept + 1 s seen now.
    disabled_for_failing(&d, "down", "the failing seen before the restart counts after it").await;
    let (s, v) = d
        .admin_request("PATCH", "/v1/endpoints/down", json!({"enabled": true}))
        .await;
    assert_eq!(s, 200, "{v}");
    let seen = sink.received("/down").len();
    d.post(&click("3", "w"), "application/json").await;
    sink.wait_for("/down", seen + 1, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, ep) = d.admin_get("/v1/endpoints/down").await;
    assert_eq!(
        ep["enabled"], true,
        "a failure right after a re-enable starts a new run: {ep}"
    );
    // Click 3's retries end 2 s after its first failure; one more failure past 3 s.
    tokio::time::sleep(Duration::from_millis(3_200)).await;
    d.post(&click("4", "w"), "application/json").await;
    disabled_for_failing(
        &d,
        "down",
        "a run failing past disable_after after a re-enable disables it again",
    )
    .await;
}

/// Waits for endpoint `id` to be disabled, and checks that failing was why.
async fn disabled_for_failing(d: &Daemon, id: &str, why: &str) {
    let (_, ep) = d
        .admin_get_until(&format!("/v1/endpoints/{id}"), |_, v| v["enabled"] == false)
        .await;
    assert_eq!(
        (ep["enabled"].as_bool(), ep["disabled_reason"].as_str()),
        (Some(false), Some("failing")),
        "{why}: {ep}"
    );
}

async fn attempts_kept(d: &Daemon, id: &str) -> usize {
    let (_, v) = d.admin_get(&format!("/v1/endpoints/{id}/attempts?limit=1000")).await;
    v.as_array().map_or(0, |a| a.len())
}

/// Posts `n` clicks for link `link` and waits until the sink at `path` has `total`.
async fn deliver(d: &Daemon, sink: &Sink, link: &str, path: &str, n: usize, total: usize) {
    for _ in 0..n {
        let (s, body) = d.post(&click(link, "w"), "application/json").await;
        assert_eq!(s, 202, "{body}");
    }
    sink.wait_for(path, total, WAIT).await;
}

/// With many endpoints each keeps its share of the attempt history instead of 1,000
/// records, so ten thousand endpoints cannot hold millions of records between them: an
/// endpoint's history is cut when endpoints are added, and kept to the share after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_many_endpoints_each_keeps_its_share_of_the_attempt_history() {
    let sink = Sink::start().await;
    let endpoints = 2_000;
    let share = clickhook::endpoints::attempt_history_share(endpoints);
    assert_eq!(share, 50);
    let busy = endpoint("busy", &sink.url("/busy"), "links = [\"busy\"]");
    let d = Daemon::start(&config_text(&busy));
    deliver(&d, &sink, "busy", "/busy", share + 10, share + 10).await;
    assert_eq!(
        attempts_kept(&d, "busy").await,
        share + 10,
        "one endpoint keeps them all"
    );

    let mut grown = busy.clone();
    for i in 1..endpoints {
        grown += &endpoint(
            &format!("idle{i}"),
            &sink.url("/idle"),
            &format!("links = [\"idle{i}\"]"),
        );
    }
    std::fs::write(d.config_path(), config_text(&grown)).unwrap();
    d.signal(libc::SIGHUP);
    let mut cut = false;
    for _ in 0..200 {
        if attempts_kept(&d, "busy").await == share {
            cut = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        cut,
        "the history is cut to its share when endpoints are added: {}",
        d.logs()
    );

    deliver(&d, &sink, "busy", "/busy", 10, share + 20).await;
    assert_eq!(attempts_kept(&d, "busy").await, share, "and kept to it");
    let (_, stats) = d.admin_request("GET", "/v1/endpoints/busy/stats", Value::Null).await;
    assert_eq!(stats["delivered"], share + 20, "counters cover every attempt");
}

/// A 410 from the URL an endpoint has just left does not disable it at its new one: the
/// attempt counts as failed and its click goes to the new URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_410_from_a_url_the_endpoint_has_left_does_not_disable_it() {
    let sink = Sink::start().await;
    sink.default_answer("/old", Answer::Delay(Duration::from_millis(1_500), 410));
    let cfg = config_text("") + "\n[retry]\nschedule = [\"100ms\"]\njitter = 0.0\n";
    let d = Daemon::start(&cfg);
    let (s, v) = d
        .admin_request(
            "POST",
            "/v1/endpoints",
            json!({"id": "moving", "url": sink.url("/old")}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = d.post(&click("1", "w"), "application/json").await;
    assert_eq!(s, 202, "{v}");
    // The attempt is under way at the old URL when the endpoint moves.
    assert_eq!(sink.wait_for("/old", 1, WAIT).await.len(), 1);
    let (s, v) = d
        .admin_request("PATCH", "/v1/endpoints/moving", json!({"url": sink.url("/new")}))
        .await;
    assert_eq!(s, 200, "{v}");
    let delivered = sink.wait_for("/new", 1, WAIT).await;
    assert_eq!(delivered.len(), 1, "the click went to the new URL");
    let (_, attempts) = d.admin_get("/v1/endpoints/moving/attempts").await;
    assert!(
        attempts.as_array().unwrap().iter().any(|a| a["status"] == 410),
        "the old URL's 410 reached the daemon: {attempts}"
    );
    let (_, ep) = d.admin_get("/v1/endpoints/moving").await;
    assert_eq!(ep["enabled"], true, "{ep}");
}
