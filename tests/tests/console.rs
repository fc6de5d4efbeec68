//! End-to-end: the web console (`cxfed console`) over a three-node differential-privacy
//! federation — its guards over plain HTTP (loopback only, login token, session cookie, Host and
//! Origin checks, security headers), and each role's page in headless Chromium: the analyst runs
//! an example and sees rows and a chart, then a refused query with its rule code and the explain
//! output; the steward sees tables, policy, budget and recent decisions; the auditor sees every
//! node's chain verified, the reconciliation, and filters the log.
//!
//! Chromium is Debian's `chromium` (or `$CHROMIUM`); `.ci/run` installs it. Without it the
//! browser test fails under `CI` and is skipped (with a message) elsewhere. With
//! `CXFED_SCREENSHOTS=DIR` the browser test also writes the three pages as PNGs (how
//! `docs/console-*.png` are made).
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::Command;

use cxfed::console::{ConsoleError, ConsoleOptions, RunningConsole};
use cxfed::policy::DpSettings;
use cxfed_e2e::Fed;
use cxfed_protocol::Role;

async fn consoles(fed: &Fed) -> Vec<RunningConsole> {
    cxfed::demo::start_consoles(&fed.fed, fed.dir.path())
        .await
        .unwrap()
}

fn base(c: &RunningConsole) -> String {
    format!("http://{}", c.addr)
}

fn plain() -> reqwest::Client {
    // Plain HTTP, but reqwest still wants a process-wide rustls provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Logs in with the console's token; returns the session cookie header value.
async fn login(c: &RunningConsole) -> String {
    let resp = plain().get(&c.url).send().await.unwrap();
    assert_eq!(resp.status(), 303);
    assert_eq!(resp.headers()["location"], "/");
    let cookie = resp.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(cookie.contains("HttpOnly"), "{cookie}");
    assert!(cookie.contains("SameSite=Strict"), "{cookie}");
    cookie.split(';').next().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_guards_its_session_and_refuses_what_it_must() {
    let fed = Fed::start_dp(600, DpSettings::DEFAULT).await;
    let cs = consoles(&fed).await;
    let analyst = &cs[0];
    assert_eq!(analyst.role, Role::Analyst);
    let http = plain();

    // No session: the page and the API refuse.
    for path in ["/", "/api/whoami", "/api/node/0/schema"] {
        let r = http
            .get(format!("{}{path}", base(analyst)))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{path}");
    }
    let wrong = http
        .get(format!("{}/?token=00", base(analyst)))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    // Another console's token is no key to this one.
    let other = cs[1].url.split("token=").nth(1).unwrap();
    let r = http
        .get(format!("{}/?token={other}", base(analyst)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    let cookie = login(analyst).await;
    let who: serde_json::Value = http
        .get(format!("{}/api/whoami", base(analyst)))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(who["role"], "analyst");
    assert_eq!(who["identity"], "spiffe://cx-demo/SSA/analyst/ssa-analyst");

    // Security headers on the page.
    let page = http
        .get(format!("{}/", base(analyst)))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'"));
    assert_eq!(page.headers()["x-frame-options"], "DENY");

    // DNS rebinding: a foreign Host header is refused even with the cookie.
    let r = http
        .get(format!("{}/api/whoami", base(analyst)))
        .header("cookie", &cookie)
        .header("host", "attacker.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // Cross-site POST: refused before reaching a node.
    let r = http
        .post(format!("{}/api/query", base(analyst)))
        .header("cookie", &cookie)
        .header("origin", "http://attacker.example")
        .header("content-type", "application/json")
        .body(r#"{"sql":"SELECT agency, COUNT(*) FROM experience GROUP BY agency"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // A bad body names the field.
    let r = http
        .post(format!("{}/api/query", base(analyst)))
        .header("cookie", &cookie)
        .body(r#"{"sql":"SELECT 1","k":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("unknown field `k`"));
    // Only whitelisted, read-only node endpoints pass through.
    let r = http
        .get(format!("{}/api/node/0/partial", base(analyst)))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // The console has no rights of its own: the node refuses a steward's query and says why.
    let steward = &cs[1];
    let cookie = login(steward).await;
    let r: serde_json::Value = http
        .post(format!("{}/api/query", base(steward)))
        .header("cookie", &cookie)
        .header("content-type", "application/json")
        .body(r#"{"sql":"SELECT agency, COUNT(*) FROM experience GROUP BY agency"}"#)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["ok"], false, "{r}");
    assert!(
        r["error"]["message"].as_str().unwrap().contains("steward"),
        "{r}"
    );
    // ... and an analyst's console cannot read the steward's endpoints either.
    let cookie = login(analyst).await;
    let r = http
        .get(format!("{}/api/node/0/budget", base(analyst)))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    // Binding beyond loopback needs --listen-public; a node's certificate is not a person's.
    let mut opts = ConsoleOptions {
        nodes: vec![fed.fed.url(0)],
        tls: fed.fed.tls("SSA", "analyst"),
        listen: ([0, 0, 0, 0], 0).into(),
        listen_public: false,
        audit_keys: Vec::new(),
    };
    let err = cxfed::console::start(opts.clone()).await.unwrap_err();
    assert!(matches!(err, ConsoleError::NotLoopback(_)), "{err}");
    assert!(err.to_string().contains("--listen-public"));
    opts.listen = ([127, 0, 0, 1], 0).into();
    opts.tls = fed.fed.tls("SSA", "node");
    let err = cxfed::console::start(opts.clone()).await.unwrap_err();
    assert!(matches!(err, ConsoleError::NodeRole(_)), "{err}");
    opts.tls = fed.fed.tls("SSA", "analyst");
    opts.nodes = vec!["http://127.0.0.1:1".into()];
    let err = cxfed::console::start(opts).await.unwrap_err();
    assert!(matches!(err, ConsoleError::BadNode(_)), "{err}");

    for c in cs {
        c.shutdown().await;
    }
    fed.fed.shutdown().await;
}

fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|d| d.join(name))
                    .find(|p| p.is_file())
            })
        })
}

/// Opens `url` in a fresh headless Chromium profile, lets the page's requests finish, and
/// returns the DOM; with `screenshot`, also saves the page as a PNG.
fn open(browser: &Path, profile: &Path, url: &str, screenshot: Option<&Path>) -> String {
    let run = |extra: &[String]| {
        let out = Command::new(browser)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--hide-scrollbars",
                "--window-size=1366,1400",
                "--virtual-time-budget=60000",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(extra)
            .arg(url)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "chromium failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    if let Some(png) = screenshot {
        run(&[format!("--screenshot={}", png.display())]);
    }
    let dom = run(&["--dump-dom".to_string()]);
    assert!(
        dom.contains("data-ready=\"true\""),
        "the page never finished loading:\n{dom}"
    );
    dom
}

/// The text of the element with `id` (its inner markup, tags stripped), from a DOM dump.
fn text_of(dom: &str, id: &str) -> String {
    let start = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id}"));
    let open = start + dom[start..].find('>').unwrap() + 1;
    // Up to the end of the enclosing section: enough for the assertions below.
    let end = dom[open..]
        .find("</section>")
        .map_or(dom.len(), |e| open + e);
    let mut out = String::new();
    let mut in_tag = false;
    for ch in dom[open..end].chars() {
        match ch {
            '<' => in_tag = true,
            '>' => {
                in_tag = false;
                out.push(' ');
            }
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    out.replace("&amp;", "&")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

fn section<'a>(dom: &'a str, id: &str) -> &'a str {
    let start = dom.find(&format!("id=\"{id}\"")).unwrap();
    let end = dom[start..]
        .find("</table>")
        .map_or(dom.len(), |e| start + e);
    &dom[start..end]
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_page_shows_what_a_person_needs() {
    let Some(browser) = chromium() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the browser tests: install Debian's chromium (see .ci/run)"
        );
        eprintln!("skipping the browser test: no chromium on PATH (set CHROMIUM=...)");
        return;
    };
    let shots = std::env::var_os("CXFED_SCREENSHOTS").map(PathBuf::from);
    let shot = |name: &str| {
        shots
            .as_ref()
            .map(|d| d.join(format!("console-{name}.png")))
    };
    let fed = Fed::start_dp(2_000, DpSettings::DEFAULT).await;
    let cs = consoles(&fed).await;
    let profiles = tempfile::tempdir().unwrap();
    let (b, p) = (browser.clone(), profiles.path().to_path_buf());

    // Analyst: run an example from the page — trust share by agency and quarter: a line per
    // agency over quarters, with noise whiskers.
    let url = format!("{}#example=1&run=1", cs[0].url);
    let s = shot("analyst");
    let dom = tokio::task::spawn_blocking(move || open(&b, &p.join("a"), &url, s.as_deref()))
        .await
        .unwrap();
    let status = text_of(&dom, "status");
    assert!(status.contains("rows from 3 nodes"), "{status}");
    assert!(status.contains("privacy dp"), "{status}");
    let nodes = text_of(&dom, "nodes");
    for agency in ["SSA", "CMS", "OPM"] {
        assert!(nodes.contains(&format!("{agency} ok")), "{nodes}");
    }
    let rows = section(&dom, "rows");
    assert!(
        rows.matches("<tr>").count() >= 10,
        "header and rows: {rows}"
    );
    assert!(rows.contains("OPM") && rows.contains("±"), "{rows}");
    let chart = section(&dom, "chart");
    assert!(
        chart.contains("<svg") && chart.contains("line chart"),
        "{chart}"
    );
    assert_eq!(
        chart.matches("class=\"series\"").count(),
        3,
        "one line per agency"
    );
    assert!(chart.contains("class=\"err\""), "noise whiskers drawn");
    assert!(
        dom.contains("id=\"csv\"") && dom.contains("href=\"blob:"),
        "CSV link"
    );
    assert!(text_of(&dom, "schema").contains("person_id identifier"));

    // Analyst: processing days by agency and outcome, as bars.
    let url = format!("{}#example=3&run=1", cs[0].url);
    let (b, p) = (browser.clone(), profiles.path().to_path_buf());
    let dom = tokio::task::spawn_blocking(move || open(&b, &p.join("a1"), &url, None))
        .await
        .unwrap();
    let chart = section(&dom, "chart");
    assert!(chart.contains("bar chart"), "{chart}");
    assert!(chart.matches("class=\"bar\"").count() >= 3, "{chart}");

    // Analyst: a refused query shows its rule code and the explain output.
    let url = format!(
        "{}#sql={}&run=1",
        cs[0].url,
        encode("SELECT person_id, AVG(trust) FROM experience GROUP BY person_id")
    );
    let (b, p) = (browser.clone(), profiles.path().to_path_buf());
    let dom = tokio::task::spawn_blocking(move || open(&b, &p.join("a2"), &url, None))
        .await
        .unwrap();
    let refusal = text_of(&dom, "refusal");
    assert!(refusal.contains("CXF-Q012"), "{refusal}");
    let explain = text_of(&dom, "explain-out");
    assert!(
        explain.contains("REFUSED CXF-Q012 identifier-not-allowed"),
        "{explain}"
    );

    // Steward: tables, the policy in force, budget per analyst, recent decisions.
    let url = cs[1].url.clone();
    let (b, p) = (browser.clone(), profiles.path().to_path_buf());
    let s = shot("steward");
    let dom = tokio::task::spawn_blocking(move || open(&b, &p.join("s"), &url, s.as_deref()))
        .await
        .unwrap();
    let tables = section(&dom, "tables");
    assert!(tables.contains("experience") && tables.contains("operational"));
    let policy = text_of(&dom, "policy");
    assert!(policy.contains("differential privacy"), "{policy}");
    assert!(policy.contains("ε 10 per 30 days"), "{policy}");
    let budget = section(&dom, "budget-chart");
    assert!(
        budget.contains("<svg") && budget.contains("ssa-analyst used"),
        "{budget}"
    );
    let activity = section(&dom, "activity");
    assert!(activity.contains("refused") && activity.contains("CXF-Q012"));
    assert!(activity.contains("executed"));

    // Auditor: every chain verified, the reconciliation clean, the log filtered to refusals.
    let url = format!("{}#decision=refused", cs[2].url);
    let (b, p) = (browser.clone(), profiles.path().to_path_buf());
    let s = shot("auditor");
    let dom = tokio::task::spawn_blocking(move || open(&b, &p.join("u"), &url, s.as_deref()))
        .await
        .unwrap();
    let checks = text_of(&dom, "checks");
    assert_eq!(checks.matches("chain verified").count(), 3, "{checks}");
    let rec = text_of(&dom, "reconciliation");
    assert!(rec.contains(" 0 mismatches"), "{rec}");
    assert!(!rec.contains(" 0 coordinated queries"), "{rec}");
    let log = section(&dom, "log");
    let body = &log[log.find("<tbody>").unwrap()..];
    assert!(body.contains("refused"), "{body}");
    assert!(
        !body.contains(">executed<"),
        "filter: refusals only: {body}"
    );

    for c in cs {
        c.shutdown().await;
    }
    fed.fed.shutdown().await;
}
