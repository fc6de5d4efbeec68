//! End-to-end: the web console (`cxfed console`) over a three-node federation — its guards over
//! plain HTTP (loopback only, login token, a session cookie per port, the run key, Host and
//! Origin checks, security headers, what `/v1/schema` tells each role, the auditor's logs tied
//! to the node that served them), and each role's page in headless Chromium: the analyst runs
//! an example and sees rows and a chart with noise whiskers (none in a `k-only` federation),
//! then a refused query with its rule code and the explain output, and a link without the run
//! key runs nothing; the steward sees row counts, last ingest, policy, budget and recent
//! decisions; the auditor sees every node's chain verified, the reconciliation, and the log
//! filtered by analyst, decision and a UTC time window.
//!
//! Every assertion on a page is scoped to one element of the DOM and checks that the element
//! is shown (neither it nor an ancestor `hidden`).
//!
//! Chromium is Debian's `chromium` (or `$CHROMIUM`); `.ci/run` installs it. Without it the
//! browser tests fail under `CI` and are skipped (with a message) elsewhere. With
//! `CXFED_SCREENSHOTS=DIR` the browser tests also write the pages as PNGs (how
//! `docs/console-*.png` are made).
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

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

fn token(c: &RunningConsole) -> &str {
    c.url.split("token=").nth(1).unwrap()
}

/// Logs in with the console's token; returns the session cookie header value.
async fn login(c: &RunningConsole) -> String {
    let resp = plain().get(&c.url).send().await.unwrap();
    assert_eq!(resp.status(), 303);
    assert_eq!(resp.headers()["location"], "/");
    let cookie = resp.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(cookie.contains("HttpOnly"), "{cookie}");
    assert!(cookie.contains("SameSite=Strict"), "{cookie}");
    let pair = cookie.split(';').next().unwrap().to_string();
    assert!(
        pair.starts_with(&format!("cxfed_console_{}=", c.addr.port())),
        "the cookie is named after the console's port: {pair}"
    );
    pair
}

async fn get_json(url: String, cookie: &str) -> serde_json::Value {
    let r = plain()
        .get(&url)
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{url}");
    r.json().await.unwrap()
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
    let other = token(&cs[1]);
    let r = http
        .get(format!("{}/?token={other}", base(analyst)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    let cookie = login(analyst).await;
    // Consoles on other ports of the same host (as `demo --serve` starts them) keep their own
    // cookies: browsers do not separate cookies by port, so one name for all would log the
    // others out.
    let steward_cookie = login(&cs[1]).await;
    let auditor_cookie = login(&cs[2]).await;
    let names: BTreeSet<&str> = [&cookie, &steward_cookie, &auditor_cookie]
        .iter()
        .map(|c| c.split('=').next().unwrap())
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
    let r = http
        .get(format!("{}/api/whoami", base(&cs[1])))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        401,
        "the analyst's cookie is no session at the steward's console"
    );

    // The run key: only for this origin's session.
    let r = http
        .get(format!("{}/api/session", base(analyst)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .get(format!("{}/api/session", base(analyst)))
        .header("cookie", &cookie)
        .header("origin", format!("http://127.0.0.1:{}", cs[1].addr.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        403,
        "a page on another localhost port cannot read it"
    );
    assert!(r.headers().get("access-control-allow-origin").is_none());
    let session = get_json(format!("{}/api/session", base(analyst)), &cookie).await;
    assert_eq!(
        session["run_key"],
        cxfed::console::run_key(token(analyst)).as_str()
    );
    assert_ne!(
        cxfed::console::run_key(token(analyst)),
        cxfed::console::run_key(token(&cs[1]))
    );

    // /v1/schema: no exact row counts or ingest times for an analyst (not differentially
    // private), with the privacy clamp bounds; the node's steward gets the counts.
    let schema = get_json(format!("{}/api/node/0/schema", base(analyst)), &cookie).await;
    for t in schema["tables"].as_array().unwrap() {
        assert!(t.get("rows").is_none(), "{t}");
        assert!(t.get("last_ingest").is_none(), "{t}");
    }
    let column = |schema: &serde_json::Value, table: &str, name: &str| {
        schema["tables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == table)
            .unwrap()["columns"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap()
            .clone()
    };
    let wait = column(&schema, "operational", "wait_minutes");
    assert_eq!(wait["dp_bounds"], serde_json::json!([0.0, 240.0]), "{wait}");
    assert_eq!(
        column(&schema, "experience", "trust")["dp_bounds"],
        serde_json::json!([1.0, 5.0])
    );
    assert!(
        column(&schema, "experience", "agency")
            .get("dp_bounds")
            .is_none()
    );
    let schema = get_json(
        format!("{}/api/node/0/schema", base(&cs[1])),
        &steward_cookie,
    )
    .await;
    for t in schema["tables"].as_array().unwrap() {
        assert!(t["rows"].as_u64().unwrap() > 0, "{t}");
        assert!(t["last_ingest"].as_str().unwrap().ends_with('Z'), "{t}");
    }
    // ... and the auditor's console, like any other role, gets none.
    let schema = get_json(
        format!("{}/api/node/1/schema", base(&cs[2])),
        &auditor_cookie,
    )
    .await;
    assert!(schema["tables"][0].get("rows").is_none(), "{schema}");
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
    // An ε no node can spend, typed or sent as a number, is refused naming ε and the range.
    for eps in [r#""NaN""#, r#""inf""#, "0", "-1", "1e-9", r#""lots""#] {
        let r: serde_json::Value = http
            .post(format!("{}/api/query", base(analyst)))
            .header("cookie", &cookie)
            .header("content-type", "application/json")
            .body(format!(
                r#"{{"sql":"SELECT agency, COUNT(*) FROM experience GROUP BY agency","epsilon":{eps}}}"#
            ))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(r["ok"], false, "{eps}: {r}");
        assert_eq!(r["error"]["kind"], "bad-epsilon", "{eps}: {r}");
        let message = r["error"]["message"].as_str().unwrap();
        assert!(
            message.starts_with("epsilon (ε) = ") && message.contains("0.001"),
            "{eps}: {message}"
        );
    }
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

    auditor_ties_each_log_to_the_node_that_served_it(&fed).await;

    for c in cs {
        c.shutdown().await;
    }
    fed.fed.shutdown().await;
}

/// A node listed twice is fetched once (the second is flagged, not merged over the first), each
/// log is named by the certificate of the node that served it, and a CA that can no longer be
/// read makes every log "not verified" rather than clean with its signatures skipped.
async fn auditor_ties_each_log_to_the_node_that_served_it(fed: &Fed) {
    // One signed query in every log, for the signature re-check.
    fed.query("SELECT agency, COUNT(*) AS n FROM experience GROUP BY agency")
        .await
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut tls = fed.fed.tls("SSA", "auditor");
    let ca = tmp.path().join("ca.pem");
    std::fs::copy(&tls.ca, &ca).unwrap();
    tls.ca = ca.clone();
    let audit_keys = ["SSA", "CMS", "OPM"]
        .iter()
        .map(|a| {
            let key = fed.data_dir(a).join(cxfed::audit::PUBLIC_KEY_FILE);
            (a.to_string(), key)
        })
        .collect();
    let c = cxfed::console::start(ConsoleOptions {
        nodes: vec![fed.fed.url(0), fed.fed.url(1), fed.fed.url(0)],
        tls,
        listen: ([127, 0, 0, 1], 0).into(),
        listen_public: false,
        audit_keys,
    })
    .await
    .unwrap();
    let cookie = login(&c).await;
    let audit = get_json(format!("{}/api/audit", base(&c)), &cookie).await;
    let nodes = audit["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    assert_eq!(nodes[0]["agency"], "SSA");
    assert_eq!(nodes[0]["identity"], "spiffe://cx-demo/SSA/node/ssa-node");
    assert_eq!(nodes[0]["check"]["status"], "clean", "{}", nodes[0]);
    assert!(nodes[0]["check"]["signatures_checked"].as_u64().unwrap() > 0);
    assert_eq!(nodes[1]["agency"], "CMS");
    assert_eq!(nodes[1]["check"]["status"], "clean", "{}", nodes[1]);
    let dup = nodes[2]["error"].as_str().unwrap();
    assert!(dup.contains("already fetched from"), "{dup}");
    assert_eq!(
        audit["reconciliation"]["nodes"],
        serde_json::json!(["CMS", "SSA"])
    );

    // The CA file becomes unreadable: the chains still verify, the analyst signatures cannot
    // be re-checked, and the page must say so.
    std::fs::write(&ca, "not a certificate\n").unwrap();
    let audit = get_json(format!("{}/api/audit", base(&c)), &cookie).await;
    for n in audit["nodes"].as_array().unwrap().iter().take(2) {
        assert_eq!(n["check"]["status"], "unverified", "{n}");
        let m = n["check"]["message"].as_str().unwrap();
        assert!(
            m.contains("NOT VERIFIED") && m.contains("analyst signatures"),
            "{m}"
        );
    }
    c.shutdown().await;
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

/// Chromium, or `None` (with a message) when it is missing outside CI; under `CI` a missing
/// browser fails the test.
fn browser_or_skip() -> Option<PathBuf> {
    let found = chromium();
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the browser tests: install Debian's chromium (see .ci/run)"
        );
        eprintln!("skipping the browser test: no chromium on PATH (set CHROMIUM=...)");
    }
    found
}

/// The browser's time zone: not UTC, so that a page mixing local time and UTC shows it.
const BROWSER_TZ: &str = "America/New_York";

/// Opens `url` in a fresh headless Chromium profile, lets the page's requests finish, and
/// returns the DOM; with `screenshot`, also saves the page as a PNG.
fn open(browser: &Path, profile: &Path, url: &str, screenshot: Option<&Path>) -> Dom {
    let run = |extra: &[String]| {
        let out = Command::new(browser)
            .env("TZ", BROWSER_TZ)
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
    let dom = Dom::parse(run(&["--dump-dom".to_string()]));
    assert!(
        dom.src.contains("data-ready=\"true\""),
        "the page never finished loading:\n{}",
        dom.src
    );
    dom
}

async fn open_async(browser: &Path, profile: PathBuf, url: String, shot: Option<PathBuf>) -> Dom {
    let b = browser.to_path_buf();
    tokio::task::spawn_blocking(move || open(&b, &profile, &url, shot.as_deref()))
        .await
        .unwrap()
}

// ------------------------------------------------------------------ a DOM dump, as elements

/// Elements that have no end tag.
const VOID: &[&str] = &[
    "area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track",
    "wbr",
];

#[derive(Debug)]
struct Element {
    name: String,
    attrs: Vec<(String, String)>,
    /// Byte range of the content (between the start and the end tag).
    content: (usize, usize),
    parent: Option<usize>,
}

/// Chromium's `--dump-dom` serialization, parsed into elements (enough HTML for what the
/// console's pages contain: no inline scripts or styles).
struct Dom {
    src: String,
    els: Vec<Element>,
}

impl Dom {
    fn parse(src: String) -> Dom {
        let b = src.as_bytes();
        let mut els: Vec<Element> = Vec::new();
        let mut stack: Vec<usize> = Vec::new();
        let mut i = 0;
        let find = |from: usize, pat: &str| src[from..].find(pat).map_or(src.len(), |p| from + p);
        while i < b.len() {
            if b[i] != b'<' {
                i += 1;
                continue;
            }
            if src[i..].starts_with("<!--") {
                i = find(i, "-->") + 3;
                continue;
            }
            if b.get(i + 1).is_some_and(|c| *c == b'!' || *c == b'?') {
                i = find(i, ">") + 1;
                continue;
            }
            if b.get(i + 1) == Some(&b'/') {
                let close = find(i, ">");
                let name = src[i + 2..close].trim().to_ascii_lowercase();
                if let Some(pos) = stack.iter().rposition(|&e| els[e].name == name) {
                    for e in stack.drain(pos..) {
                        els[e].content.1 = i;
                    }
                }
                i = close + 1;
                continue;
            }
            // A start tag: name, then attributes (values may hold '>' inside quotes).
            let mut j = i + 1;
            while j < b.len() && !b[j].is_ascii_whitespace() && b[j] != b'>' && b[j] != b'/' {
                j += 1;
            }
            let name = src[i + 1..j].to_ascii_lowercase();
            let mut attrs = Vec::new();
            let mut self_closing = false;
            loop {
                while j < b.len() && b[j].is_ascii_whitespace() {
                    j += 1;
                }
                if j >= b.len() || b[j] == b'>' {
                    j += 1;
                    break;
                }
                if b[j] == b'/' {
                    self_closing = true;
                    j += 1;
                    continue;
                }
                let n0 = j;
                while j < b.len() && !b"= \t\n\r/>".contains(&b[j]) {
                    j += 1;
                }
                let attr = src[n0..j].to_ascii_lowercase();
                let mut value = String::new();
                if b.get(j) == Some(&b'=') {
                    j += 1;
                    if let Some(&q) = b.get(j).filter(|q| **q == b'"' || **q == b'\'') {
                        let end = src[j + 1..]
                            .find(q as char)
                            .map_or(src.len(), |p| j + 1 + p);
                        value = decode(&src[j + 1..end]);
                        j = end + 1;
                    } else {
                        let v0 = j;
                        while j < b.len() && !b[j].is_ascii_whitespace() && b[j] != b'>' {
                            j += 1;
                        }
                        value = decode(&src[v0..j]);
                    }
                }
                attrs.push((attr, value));
            }
            let idx = els.len();
            els.push(Element {
                name: name.clone(),
                attrs,
                content: (j.min(b.len()), j.min(b.len())),
                parent: stack.last().copied(),
            });
            i = j;
            if name == "script" || name == "style" {
                let end = find(i, &format!("</{name}"));
                els[idx].content.1 = end;
                i = end;
                continue;
            }
            if !self_closing && !VOID.contains(&name.as_str()) {
                stack.push(idx);
            }
        }
        for e in stack {
            els[e].content.1 = src.len();
        }
        Dom { src, els }
    }

    fn attr(&self, e: usize, name: &str) -> Option<&str> {
        self.els[e]
            .attrs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn id(&self, id: &str) -> usize {
        (0..self.els.len())
            .find(|&e| self.attr(e, "id") == Some(id))
            .unwrap_or_else(|| panic!("no element #{id} in the page"))
    }

    fn has_class(&self, e: usize, class: &str) -> bool {
        self.attr(e, "class")
            .is_some_and(|c| c.split_whitespace().any(|x| x == class))
    }

    /// Neither the element nor any ancestor is `hidden`.
    fn visible(&self, e: usize) -> bool {
        let mut at = Some(e);
        while let Some(x) = at {
            if self.attr(x, "hidden").is_some() {
                return false;
            }
            at = self.els[x].parent;
        }
        true
    }

    fn inner(&self, e: usize) -> &str {
        let (a, b) = self.els[e].content;
        &self.src[a..b]
    }

    /// The element's text (tags stripped, entities decoded, whitespace collapsed).
    fn text(&self, e: usize) -> String {
        let mut out = String::new();
        let mut in_tag = false;
        for ch in self.inner(e).chars() {
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
        decode(&out)
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn is_within(&self, e: usize, ancestor: usize) -> bool {
        let mut at = self.els[e].parent;
        while let Some(x) = at {
            if x == ancestor {
                return true;
            }
            at = self.els[x].parent;
        }
        false
    }

    /// Descendants of `e` with tag `name` (and `class`, if given), in document order.
    fn find(&self, e: usize, name: &str, class: Option<&str>) -> Vec<usize> {
        (e + 1..self.els.len())
            .filter(|&x| self.els[x].name == name && self.is_within(x, e))
            .filter(|&x| class.is_none_or(|c| self.has_class(x, c)))
            .collect()
    }

    /// The text of the element `#id`, which must be shown.
    fn shown_text(&self, id: &str) -> String {
        let e = self.id(id);
        assert!(self.visible(e), "#{id} is hidden: {}", self.text(e));
        self.text(e)
    }

    /// The body rows of the table `#id` (shown), as cell texts.
    fn table_rows(&self, id: &str) -> Vec<Vec<String>> {
        let t = self.id(id);
        assert!(self.visible(t), "#{id} is hidden");
        let Some(&body) = self.find(t, "tbody", None).first() else {
            return Vec::new();
        };
        self.find(body, "tr", None)
            .into_iter()
            .map(|tr| {
                self.find(tr, "td", None)
                    .into_iter()
                    .map(|td| self.text(td))
                    .collect()
            })
            .collect()
    }
}

fn decode(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&nbsp;", "\u{a0}")
        .replace("&amp;", "&")
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The analyst console's address of a page that fills in `sql` and runs it (with the run key).
fn run_url(c: &RunningConsole, fragment: &str) -> String {
    format!(
        "{}#{fragment}&run={}",
        c.url,
        cxfed::console::run_key(token(c))
    )
}

/// Asserts the analyst page shows a chart `#chart` of `kind` ("line chart" or "bar chart"), and
/// returns it (the figure element).
fn chart(dom: &Dom, kind: &str) -> usize {
    let fig = dom.id("chart");
    assert!(dom.visible(fig), "the chart is hidden");
    let svgs = dom.find(fig, "svg", None);
    assert_eq!(svgs.len(), 1, "one chart: {}", dom.inner(fig));
    let label = dom.attr(svgs[0], "aria-label").unwrap_or("");
    assert!(label.contains(kind), "{label}");
    fig
}

/// `SELECT COUNT(*)` of `table` in one node's data directory.
async fn count_rows(data_dir: &Path, table: &str) -> u64 {
    let ctx = cxfed::engine::node_context(data_dir, 64 << 20).unwrap();
    let b = ctx
        .sql(&format!("SELECT COUNT(*) FROM {table}"))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    cxfed::output::rows(&b).unwrap()[0][0].as_u64().unwrap()
}

/// The time in the newest data file's name (`<unix_nanos>-<hex>.parquet`), as the steward page
/// shows it: `YYYY-MM-DD HH:MM:SS` (UTC).
fn newest_file_time(data_dir: &Path, table: &str) -> String {
    let newest = std::fs::read_dir(data_dir.join(table))
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.ends_with(".parquet")
                .then(|| name.split('-').next().unwrap().parse::<i128>().unwrap())
        })
        .max()
        .unwrap();
    utc_seconds(time::OffsetDateTime::from_unix_timestamp_nanos(newest).unwrap()).replace('T', " ")
}

fn utc_seconds(t: time::OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Sleeps to the next whole second and returns it: every log entry written before the call is
/// older, every one after it at least as new.
async fn second_boundary() -> time::OffsetDateTime {
    let now = time::OffsetDateTime::now_utc();
    let next = now.replace_nanosecond(0).unwrap() + time::Duration::seconds(1);
    tokio::time::sleep(Duration::from_secs_f64(
        (next - now).as_seconds_f64() + 0.05,
    ))
    .await;
    next
}

const ANALYST: &str = "spiffe://cx-demo/SSA/analyst/ssa-analyst";

/// Entries of every node's log that the auditor page should list for `analyst`, `refused`,
/// from `from` to `to` (inclusive, UTC seconds): (node, seq).
async fn expected_log(fed: &Fed, from: &str, to: &str) -> BTreeSet<(String, u64)> {
    let mut out = BTreeSet::new();
    for i in 0..3 {
        for e in fed.audit_log(i).await {
            let who = if e.analyst.is_empty() {
                &e.peer
            } else {
                &e.analyst
            };
            let t = &e.time[..19];
            if who == ANALYST
                && e.decision == Some(cxfed::audit::Decision::Refused)
                && t >= from
                && t <= to
            {
                out.insert((e.node.clone(), e.seq));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_page_shows_what_a_person_needs() {
    let Some(browser) = browser_or_skip() else {
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
    let profile = |name: &str| profiles.path().join(name);

    // Analyst: run an example from a link with the run key — trust share by agency and
    // quarter: a line per agency over quarters, with noise whiskers.
    let dom = open_async(
        &browser,
        profile("a"),
        run_url(&cs[0], "example=1"),
        shot("analyst"),
    )
    .await;
    let status = dom.shown_text("status");
    assert!(status.contains("rows from 3 nodes"), "{status}");
    assert!(status.contains("privacy dp"), "{status}");
    let nodes = dom.shown_text("nodes");
    for agency in ["SSA", "CMS", "OPM"] {
        assert!(nodes.contains(&format!("{agency} ok")), "{nodes}");
    }
    let rows = dom.table_rows("rows");
    assert!(rows.len() >= 9, "{rows:?}");
    assert!(rows.iter().any(|r| r[0] == "OPM"), "{rows:?}");
    assert!(
        rows.iter()
            .all(|r| r[2].contains('±') && r[3].contains('±')),
        "each noisy number with its interval: {rows:?}"
    );
    // Dates as dates, with their federal label; the nodes whose part a row lacks, named.
    assert!(
        rows.iter()
            .all(|r| r[1].ends_with(')') && r[1].contains(" (FY") && !r[1].contains('T')),
        "{rows:?}"
    );
    assert!(
        rows.iter().all(|r| r.len() == 5 && !r[4].contains(&r[0])),
        "a row's own agency is never missing from it: {rows:?}"
    );
    let fig = chart(&dom, "line chart");
    assert_eq!(
        dom.find(fig, "polyline", Some("series")).len(),
        3,
        "one line per agency"
    );
    assert!(
        dom.find(fig, "line", Some("err")).len() >= 9,
        "noise whiskers drawn: {}",
        dom.inner(fig)
    );
    assert!(dom.text(fig).contains("Whiskers: 95% interval"));
    let csv = dom.id("csv");
    assert!(dom.visible(csv));
    assert!(dom.attr(csv, "href").unwrap().starts_with("blob:"));
    assert!(dom.find(dom.id("refusal"), "p", None).is_empty() || !dom.visible(dom.id("refusal")));
    // The schema browser: identifiers marked, validation range and privacy clamp of a measure.
    assert!(dom.shown_text("schema").contains("person_id identifier"));
    let wait = (0..dom.els.len())
        .find(|&e| dom.attr(e, "data-column") == Some("operational.wait_minutes"))
        .unwrap();
    let wait = dom.text(wait);
    assert!(
        wait.contains("valid 0..=10080") && wait.contains("privacy clamp 0..=240"),
        "{wait}"
    );

    // Analyst: processing days by agency and outcome, as bars with whiskers.
    let dom = open_async(&browser, profile("a1"), run_url(&cs[0], "example=3"), None).await;
    let fig = chart(&dom, "bar chart");
    let bars = dom.find(fig, "rect", Some("bar")).len();
    assert!(bars >= 3, "{}", dom.inner(fig));
    assert!(dom.find(fig, "line", Some("err")).len() >= 3 * bars);

    // Analyst: median and 90th-percentile waits by channel (dp: read off noisy histograms);
    // the median is charted first, as bars with their intervals' whiskers.
    let dom = open_async(&browser, profile("a1"), run_url(&cs[0], "example=4"), None).await;
    let fig = chart(&dom, "bar chart");
    assert!(
        dom.inner(fig).contains("median_wait_min"),
        "{}",
        dom.inner(fig)
    );
    let bars = dom.find(fig, "rect", Some("bar")).len();
    assert!(bars >= 3, "{}", dom.inner(fig));
    // A median whose whole interval lies inside one minute (± 0) has no whisker to draw.
    assert!(
        dom.find(fig, "line", Some("err")).len() >= 3,
        "{}",
        dom.inner(fig)
    );

    // A refused query (sent directly), then a second boundary: the auditor's time filter below
    // must leave it out.
    let early = fed
        .query("SELECT person_id, COUNT(*) FROM experience GROUP BY person_id")
        .await;
    assert!(early.is_err());
    // The window starts at a whole second (the first entry it may hold)...
    let from = utc_seconds(second_boundary().await);

    // Analyst: a refused query shows its rule code and the explain output.
    let refused_sql = "SELECT person_id, AVG(trust) FROM experience GROUP BY person_id";
    let url = run_url(&cs[0], &format!("sql={}", encode(refused_sql)));
    let dom = open_async(&browser, profile("a2"), url, None).await;
    let refusal = dom.id("refusal");
    assert!(dom.visible(refusal), "the refusal is shown");
    let code = dom.find(refusal, "span", Some("code"));
    assert_eq!(code.len(), 1, "{}", dom.inner(refusal));
    assert_eq!(dom.text(code[0]), "CXF-Q012");
    assert!(
        dom.text(refusal).contains("identifier"),
        "{}",
        dom.text(refusal)
    );
    assert!(
        !dom.visible(dom.id("result")),
        "no result for a refused query"
    );
    let explain = dom.shown_text("explain-out");
    assert!(
        explain.contains("REFUSED CXF-Q012 identifier-not-allowed"),
        "{explain}"
    );
    // ... and ends with the second before the next boundary (`To` names a whole second).
    let to = utc_seconds(second_boundary().await - time::Duration::seconds(1));
    let late = fed
        .query("SELECT case_id, COUNT(*) FROM experience GROUP BY case_id")
        .await;
    assert!(late.is_err());

    // Analyst: a link without the run key (`run=1`, as a page on another localhost port could
    // make) fills the editor but runs nothing and spends nothing.
    let queries_before = fed
        .audit_log(0)
        .await
        .iter()
        .filter(|e| e.endpoint == "/v1/query")
        .count();
    let url = format!(
        "{}#sql={}&run=1",
        cs[0].url,
        encode("SELECT agency, COUNT(*) AS n FROM experience GROUP BY agency")
    );
    let dom = open_async(&browser, profile("a3"), url, None).await;
    let status = dom.shown_text("status");
    assert!(
        status.contains("does not carry this console's run key")
            && status.contains("nothing was run"),
        "{status}"
    );
    assert!(!dom.visible(dom.id("result")));
    assert!(!dom.visible(dom.id("refusal")));
    let queries_after = fed
        .audit_log(0)
        .await
        .iter()
        .filter(|e| e.endpoint == "/v1/query")
        .count();
    assert_eq!(queries_before, queries_after, "no query reached the node");

    // Steward: row counts and last ingest per table, the policy in force, budget used and left
    // per analyst, recent decisions.
    let dom = open_async(&browser, profile("s"), cs[1].url.clone(), shot("steward")).await;
    let ssa = fed.data_dir("SSA");
    let tables = dom.table_rows("tables");
    assert_eq!(tables.len(), 2, "{tables:?}");
    for row in &tables {
        let n = count_rows(&ssa, &row[0]).await;
        assert_eq!(row[1], thousands(n), "{row:?}");
        assert_eq!(row[2], newest_file_time(&ssa, &row[0]), "{row:?}");
    }
    let policy = dom.shown_text("policy");
    assert!(policy.contains("differential privacy"), "{policy}");
    assert!(policy.contains("ε 10 per 30 days"), "{policy}");
    let budget = dom.id("budget-chart");
    assert!(dom.visible(budget));
    let labels = dom.text(budget);
    for want in [
        "SSA/analyst/ssa-analyst used",
        "SSA/analyst/ssa-analyst left",
    ] {
        assert!(labels.contains(want), "{labels}");
    }
    assert_eq!(dom.find(budget, "rect", Some("left")).len(), 1, "{labels}");
    let budget_rows = dom.table_rows("budget");
    assert_eq!(budget_rows.len(), 1, "{budget_rows:?}");
    assert_eq!(budget_rows[0][0], ANALYST);
    // Three examples ran (the first twice when the page was also opened for its screenshot).
    let spent = if shots.is_some() { "4" } else { "3" };
    assert_eq!(budget_rows[0][2], spent, "{budget_rows:?}");
    let activity = dom.table_rows("activity");
    assert!(
        activity
            .iter()
            .any(|r| r[4] == "refused" && r[5] == "CXF-Q012"),
        "{activity:?}"
    );
    assert!(activity.iter().any(|r| r[4] == "executed"), "{activity:?}");

    // Auditor: every chain verified, the reconciliation clean, the log filtered to the
    // analyst's refusals in a UTC window (the browser runs in New York time).
    let url = format!(
        "{}#decision=refused&analyst={}&from={from}&to={to}",
        cs[2].url,
        encode(ANALYST)
    );
    let dom = open_async(&browser, profile("u"), url, shot("auditor")).await;
    let checks = dom.shown_text("checks");
    assert_eq!(checks.matches("chain verified").count(), 3, "{checks}");
    let rec = dom.shown_text("reconciliation");
    assert!(rec.contains(" 0 mismatches"), "{rec}");
    assert!(!rec.contains(" 0 coordinated queries"), "{rec}");
    let log = dom.table_rows("log");
    let shown: BTreeSet<(String, u64)> = log
        .iter()
        .map(|r| (r[0].clone(), r[1].replace(',', "").parse().unwrap()))
        .collect();
    let want = expected_log(&fed, &from, &to).await;
    assert!(!want.is_empty());
    assert_eq!(shown, want, "{log:?}");
    for r in &log {
        assert_eq!(
            (r[5].as_str(), r[6].as_str()),
            (ANALYST, "refused"),
            "{r:?}"
        );
        let t = r[2].replace(' ', "T");
        assert!(
            t[..19] >= *from && t[..19] <= *to,
            "{r:?} outside {from}..{to}"
        );
    }
    let all = expected_log(&fed, "0000", "9999").await;
    assert!(
        all.len() >= want.len() + 2,
        "the window left out the refusals before and after it: {all:?} vs {want:?}"
    );
    assert_eq!(
        dom.shown_text("log-count"),
        format!(
            "{} {} shown",
            want.len(),
            if want.len() == 1 { "entry" } else { "entries" }
        )
    );

    for c in cs {
        c.shutdown().await;
    }
    fed.fed.shutdown().await;
}

/// In a `k-only` federation the answer carries no intervals at all: the page still shows the
/// rows and charts (without whiskers), and says when a line chart has more series than it draws.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analyst_page_works_on_a_k_only_federation() {
    let Some(browser) = browser_or_skip() else {
        return;
    };
    let fed = Fed::start_with(1_500, Duration::from_secs(60)).await;
    let cs = consoles(&fed).await;
    let profiles = tempfile::tempdir().unwrap();

    let sql = "SELECT agency, channel, date_trunc('year', response_date) AS year, COUNT(*) AS responses \
               FROM experience GROUP BY agency, channel, date_trunc('year', response_date)";
    let url = run_url(&cs[0], &format!("sql={}", encode(sql)));
    let dom = open_async(&browser, profiles.path().join("k"), url, None).await;
    let status = dom.shown_text("status");
    assert!(status.contains("privacy k-only"), "{status}");
    assert!(
        !dom.visible(dom.id("refusal")),
        "{}",
        dom.text(dom.id("refusal"))
    );
    let rows = dom.table_rows("rows");
    assert!(rows.len() > 9, "{rows:?}");
    assert!(rows.iter().all(|r| !r.concat().contains('±')), "{rows:?}");
    let fig = chart(&dom, "line chart");
    let series: BTreeSet<(String, String)> =
        rows.iter().map(|r| (r[0].clone(), r[1].clone())).collect();
    assert!(series.len() > 8, "{series:?}");
    assert_eq!(dom.find(fig, "polyline", Some("series")).len(), 8);
    assert!(dom.find(fig, "line", Some("err")).is_empty(), "no whiskers");
    let note = dom.shown_text("series-note");
    assert!(
        note.contains(&format!("first 8 of {} series", series.len())),
        "{note}"
    );
    assert!(
        dom.text(fig)
            .contains(&format!("8 of {} series drawn", series.len())),
        "said on the chart itself"
    );
    assert!(dom.text(fig).contains("Values are exact"));

    let dom = open_async(
        &browser,
        profiles.path().join("k1"),
        run_url(&cs[0], "example=3"),
        None,
    )
    .await;
    let fig = chart(&dom, "bar chart");
    assert!(
        dom.find(fig, "rect", Some("bar")).len() >= 3,
        "{}",
        dom.inner(fig)
    );
    assert!(dom.find(fig, "line", Some("err")).is_empty(), "no whiskers");
    assert!(dom.table_rows("rows").len() >= 3);

    // Numbers as a person reads them: the query's ROUND, dates as dates, federal labels.
    let sql = "SELECT date_trunc('quarter', response_date) AS q, fiscal_year, fiscal_quarter, \
               ROUND(AVG(trust), 2) AS t FROM experience GROUP BY 1, 2, 3 ORDER BY 1";
    let url = run_url(&cs[0], &format!("sql={}", encode(sql)));
    let dom = open_async(&browser, profiles.path().join("k2"), url, None).await;
    let rows = dom.table_rows("rows");
    assert!(rows.len() >= 4, "{rows:?}");
    for r in &rows {
        let (fy, q) = (r[1].clone(), r[2].clone());
        assert!(
            fy.starts_with("FY") && q.starts_with('Q') && r[0].ends_with(&format!("({fy} {q})")),
            "{r:?}"
        );
        assert!(!r[0].contains('T'), "a date, not a time: {r:?}");
        let decimals = r[3].split_once('.').map_or(0, |(_, d)| d.len());
        assert!(decimals <= 2, "rounded as asked: {r:?}");
    }

    for c in cs {
        c.shutdown().await;
    }
    fed.fed.shutdown().await;
}

/// The analyst's journey map: the demo's journey query (SSA's approaching-retirement people by
/// how their Medicare enrollment at CMS ended, matched privately) drawn as flows from SSA to
/// each CMS outcome and to "not at CMS", one band per released row, with the noise of each
/// count and average shown; the same rows as a table and CSV. Other answers draw no map.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journey_answers_are_drawn_as_a_map() {
    let Some(browser) = browser_or_skip() else {
        return;
    };
    let fed = Fed::start_journeys(1_500, 0.5, Some(DpSettings::DEFAULT)).await;
    let cs = consoles(&fed).await;
    let profiles = tempfile::tempdir().unwrap();
    let sql = cxfed::examples::JOURNEY.1;
    // A dp journey names its ε (both nodes calibrate and charge the same one).
    let url = run_url(&cs[0], &format!("sql={}&epsilon=0.5", encode(sql)));
    let shot =
        std::env::var_os("CXFED_SCREENSHOTS").map(|d| PathBuf::from(d).join("console-journey.png"));
    let dom = open_async(&browser, profiles.path().join("j"), url, shot).await;
    assert!(
        !dom.visible(dom.id("refusal")),
        "{}",
        dom.text(dom.id("refusal"))
    );
    let rows = dom.table_rows("rows");
    assert!(rows.len() >= 3, "{rows:?}");
    let map = dom.id("journey");
    assert!(dom.visible(map), "the journey map is shown");
    let svgs = dom.find(map, "svg", None);
    assert_eq!(svgs.len(), 1, "{}", dom.inner(map));
    let label = dom.attr(svgs[0], "aria-label").unwrap_or("");
    assert!(
        label.contains(&format!("{} flows from SSA to CMS", rows.len())),
        "{label}"
    );
    let flows = dom.find(map, "path", Some("flow"));
    assert_eq!(flows.len(), rows.len(), "one band per row");
    assert_eq!(
        dom.find(map, "path", Some("away")).len(),
        1,
        "the people not at CMS: one band, drawn apart"
    );
    let text = dom.text(map);
    for want in [
        "SSA (experience) → CMS (operational)",
        "not at CMS",
        "people",
        "ssa_trust",
        "±",
    ] {
        assert!(text.contains(want), "{want:?} missing from {text}");
    }
    // Every row's CMS outcome is one of the map's destinations.
    for r in rows.iter().filter(|r| r[0] != "—") {
        assert!(
            text.contains(&format!("CMS · {}", r[0])),
            "{} not in {text}",
            r[0]
        );
    }
    // An average whose interval is wider than the scale says so on the map as in the table.
    let vague = rows
        .iter()
        .filter(|r| r.concat().contains("not informative"))
        .count();
    assert_eq!(
        text.matches("(not informative)").count(),
        2 * vague,
        "{text}"
    );
    assert!(dom.visible(dom.id("csv")));

    // An ordinary answer hides the map.
    let dom = open_async(
        &browser,
        profiles.path().join("o"),
        run_url(&cs[0], "example=3"),
        None,
    )
    .await;
    assert!(
        !dom.visible(dom.id("journey")),
        "no map for a single-agency query"
    );
}
