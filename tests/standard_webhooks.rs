//! clickhook's signatures checked by the official Standard Webhooks library (the Python
//! package `standardwebhooks`), not by code written here: the body and headers a real sink
//! captured are handed to `Webhook(secret).verify(body, headers)`. Every payload format
//! verifies, a wrong secret or a changed body does not, and during a secret rotation the
//! request carries two signatures that verify with the old and with the new secret alike.
//! CI installs the package (`python3 -m pip install standardwebhooks`); without python3 or
//! the package these tests fail and say so. They must not verify with code of our own.

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

const VERIFY: &str = r#"
import json, sys
try:
    from standardwebhooks.webhooks import Webhook
except ImportError as e:
    print("MISSING %s" % e)
    sys.exit(3)
secret = open(sys.argv[1]).read()
body = open(sys.argv[2], "rb").read()
headers = json.load(open(sys.argv[3]))
try:
    Webhook(secret).verify(body, headers)
except Exception as e:
    print("REJECTED %s: %s" % (type(e).__name__, e))
    sys.exit(1)
print("verified")
"#;

/// Whether the Standard Webhooks library accepts this request for `secret`; the library's
/// own words when it does not.
fn library_verifies(secret: &str, body: &[u8], r: &Received) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let (s, b, h) = (
        dir.path().join("secret"),
        dir.path().join("body"),
        dir.path().join("headers.json"),
    );
    std::fs::write(&s, secret).unwrap();
    std::fs::write(&b, body).unwrap();
    std::fs::write(&h, serde_json::to_vec(&r.headers).unwrap()).unwrap();
    let out = match Command::new("python3")
        .arg("-c")
        .arg(VERIFY)
        .args([&s, &b, &h])
        .output()
    {
        Ok(out) => out,
        Err(e) => panic!(
            "python3 is required to run the Standard Webhooks library ({e}); \
             install python3 and then `python3 -m pip install standardwebhooks`"
        ),
    };
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    match out.status.code() {
        Some(0) if stdout == "verified" => Ok(()),
        Some(3) => panic!(
            "the Python package standardwebhooks is not installed ({stdout}); \
             install it with `python3 -m pip install standardwebhooks`"
        ),
        Some(1) if stdout.starts_with("REJECTED") => Err(stdout),
        _ => panic!(
            "the verifier did not run: {:?}\nstdout: {stdout}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

fn assert_verifies(secret: &str, r: &Received, what: &str) {
    if let Err(why) = library_verifies(secret, &r.body, r) {
        panic!(
            "{what}: the Standard Webhooks library rejects the delivery: {why}\nheaders: {:?}",
            r.headers
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_library_verifies_every_payload_format() {
    let sink = Sink::start().await;
    let eps = endpoint("standard", &sink.url("/standard"), "")
        + &endpoint("linkly", &sink.url("/linkly"), "format = \"linkly\"")
        + &endpoint("masiv", &sink.url("/masiv"), "format = \"masiv\"")
        + &endpoint(
            "rebrandly",
            &sink.url("/rebrandly"),
            "format = \"rebrandly\"\nbatch_max = 10\nbatch_linger = \"50ms\"",
        )
        + &endpoint("batch", &sink.url("/batch"), "batch_max = 10\nbatch_linger = \"50ms\"");
    let d = Daemon::start(&config_text(&eps));
    // Non-ASCII text in the body: the library signs the body as text, clickhook as bytes.
    let body = r#"[{"link":{"id":"1","name":"Frühjahrs\u00ad-Angebot ✓","slug":"/abc"},"click":{"country":"DE","city":"Köln"}},
                   {"link":{"id":"2"},"metadata":{"emoji":"🦀","quote":"\"q\""}}]"#;
    let (status, v) = d.post(body, "application/json").await;
    assert_eq!(status, 202, "{v}");
    for path in ["/standard", "/linkly", "/masiv", "/rebrandly", "/batch"] {
        let got = sink.wait_for(path, 1, WAIT).await;
        assert!(!got.is_empty(), "{path}: nothing delivered");
        for r in &got {
            assert_verifies(SECRET, r, path);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_library_rejects_a_wrong_secret_and_a_changed_body() {
    let sink = Sink::start().await;
    let d = Daemon::start(&config_text(&endpoint("a", &sink.url("/a"), "")));
    let (status, _) = d.post(&click("1", "w"), "application/json").await;
    assert_eq!(status, 202);
    let got = sink.wait_for("/a", 1, WAIT).await;
    let r = &got[0];
    assert_verifies(SECRET, r, "the configured secret");
    let other = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
    let err = library_verifies(other, &r.body, r).expect_err("another secret must not verify");
    assert!(err.contains("No matching signature"), "{err}");
    let mut changed = r.body.to_vec();
    changed.extend_from_slice(b" ");
    library_verifies(SECRET, &changed, r).expect_err("a changed body must not verify");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_rotation_both_the_old_and_the_new_secret_verify() {
    let sink = Sink::start().await;
    let d = Daemon::start(&config_text(""));
    let create = format!(r#"{{"id":"rot","url":"{}"}}"#, sink.url("/rot"));
    let (status, created) = request("POST", &format!("{}/v1/endpoints", d.admin), &create, &[]).await;
    assert_eq!(status, 201, "{created}");
    let old = created["secret"]
        .as_str()
        .expect("the new endpoint's secret")
        .to_string();
    assert!(old.starts_with("whsec_"), "{old}");

    let (status, _) = d.post(&click("before", "w"), "application/json").await;
    assert_eq!(status, 202);
    let got = sink.wait_for("/rot", 1, WAIT).await;
    assert_eq!(got.len(), 1);
    assert_verifies(&old, &got[0], "before rotation");

    let (status, rotated) = request("POST", &format!("{}/v1/endpoints/rot/secret/rotate", d.admin), "", &[]).await;
    assert_eq!(status, 200, "{rotated}");
    let new = rotated["secret"]
        .as_str()
        .expect("rotation answers the new secret")
        .to_string();
    assert_ne!(new, old, "rotation gives a new secret");
    let (_, shown) = d.admin_get("/v1/endpoints/rot/secret").await;
    assert_eq!(shown["secret"], new.as_str(), "GET …/secret shows the newest");

    let (status, _) = d.post(&click("after", "w"), "application/json").await;
    assert_eq!(status, 202);
    let got = sink.wait_for("/rot", 2, WAIT).await;
    assert_eq!(got.len(), 2);
    let r = &got[1];
    assert_eq!(
        r.headers["webhook-signature"].split(' ').count(),
        2,
        "two signatures during rotation: {}",
        r.headers["webhook-signature"]
    );
    assert_verifies(&new, r, "after rotation, the new secret");
    assert_verifies(&old, r, "after rotation, the old secret");
}
