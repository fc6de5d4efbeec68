//! `cxfed console`: a local web console for analysts, stewards and auditors.
//!
//! Like `kubectl proxy`, it runs on the user's own machine, holds the user's certificate and key,
//! and talks to nodes over mTLS, so no browser ever needs a client certificate. The pages adapt
//! to the role in the certificate (a node certificate is refused: it is not a person's). The
//! console has no privileges of its own: every request goes to a node with the user's identity,
//! and the node decides, as it would for the CLI.
//!
//! The browser side is guarded against other pages and other users of the machine:
//! - it listens on loopback unless told `--listen-public`;
//! - it prints one URL with a random token; opening it trades the token for an `HttpOnly`,
//!   `SameSite=Strict` cookie named after the console's port (consoles on other ports of the
//!   same host keep their own), and every `/api/*` call needs that cookie;
//! - a link may prefill the analyst's editor (`#sql=…` or `#example=N`), but it runs the query
//!   only with `run=<run key>` ([`run_key`]): a value derived from the token, which the page reads
//!   from `/api/session` and a page of another origin cannot — a same-site page (another
//!   localhost port) that navigates here gets the cookie, but cannot spend the user's budget;
//! - requests whose `Host` is not the console's own address (DNS rebinding) or whose `Origin`
//!   is another site are refused;
//! - a strict Content-Security-Policy: the embedded assets only, no inline script, no other
//!   origin, no framing.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use cxfed_protocol::codes::ApiCode;
use cxfed_protocol::wire::{ErrorBody, QueryRequest};
use cxfed_protocol::{Identity, Role};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::audit::{Entry, PublicKey};
use crate::client::{AnalystClient, QueryFailure, send_query};
use crate::tls::{TlsError, TlsFiles};

const INDEX_HTML: &str = include_str!("console/index.html");
const APP_JS: &str = include_str!("console/app.js");
const APP_CSS: &str = include_str!("console/app.css");
/// The session cookie's name, before `_<port>`.
const COOKIE_PREFIX: &str = "cxfed_console";
/// What the run key hashes, before the token.
const RUN_KEY_CONTEXT: &str = "cxfed-console-run\n";
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'";
/// Audit entries per node sent to the page (the whole log is still verified).
const AUDIT_ENTRIES_SHOWN: usize = 2000;

/// How to run a console.
#[derive(Debug, Clone)]
pub struct ConsoleOptions {
    /// Nodes to talk to; the first coordinates queries.
    pub nodes: Vec<String>,
    /// The user's certificate files.
    pub tls: TlsFiles,
    /// Where to listen.
    pub listen: SocketAddr,
    /// Allow a non-loopback `listen` address.
    pub listen_public: bool,
    /// Audit public keys by agency, for the auditor page.
    pub audit_keys: Vec<(String, PathBuf)>,
}

/// Why a console could not start.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// A non-loopback address without `--listen-public`.
    #[error(
        "--listen {0}: not a loopback address; the console holds your key and would serve anyone \
         who can reach it. Pass --listen-public to do it anyway"
    )]
    NotLoopback(SocketAddr),
    /// No `--node`.
    #[error("--node: give at least one node URL")]
    NoNode,
    /// A node URL that is not https.
    #[error("--node {0}: must be an https:// URL")]
    BadNode(String),
    /// Certificate files.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A node's certificate.
    #[error(
        "--cert: {0} is a node identity; open the console with an analyst, steward or auditor certificate"
    )]
    NodeRole(String),
    /// An audit key.
    #[error("--audit-key {path}: {reason}")]
    AuditKey {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// No randomness for the login token.
    #[error("the operating system's random generator failed")]
    Random,
    /// Binding the listener.
    #[error("--listen {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
}

/// A console serving in the background.
#[derive(Debug)]
pub struct RunningConsole {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// The role of its user.
    pub role: Role,
    /// The URL to open (carries the one-time login token).
    pub url: String,
    shutdown: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl RunningConsole {
    /// Stops serving.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(());
        let _ = self.task.await;
    }
}

struct Console {
    token: String,
    /// `cxfed_console_<port>`: browsers do not keep cookies apart by port.
    cookie: String,
    identity: Identity,
    nodes: Vec<String>,
    client: AnalystClient,
    ca: PathBuf,
    keys: BTreeMap<String, PublicKey>,
    hosts: Vec<String>,
    listen_public: bool,
}

/// Checks the options, binds and starts serving.
pub async fn start(opts: ConsoleOptions) -> Result<RunningConsole, ConsoleError> {
    if !opts.listen.ip().is_loopback() && !opts.listen_public {
        return Err(ConsoleError::NotLoopback(opts.listen));
    }
    if opts.nodes.is_empty() {
        return Err(ConsoleError::NoNode);
    }
    if let Some(bad) = opts.nodes.iter().find(|n| !n.starts_with("https://")) {
        return Err(ConsoleError::BadNode(bad.clone()));
    }
    let identity = crate::client::own_identity(&opts.tls.cert)?;
    if identity.role() == Role::Node {
        return Err(ConsoleError::NodeRole(identity.to_string()));
    }
    let mut keys = BTreeMap::new();
    for (agency, path) in &opts.audit_keys {
        let text = std::fs::read_to_string(path).map_err(|e| ConsoleError::AuditKey {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let key = PublicKey::parse(&text).map_err(|reason| ConsoleError::AuditKey {
            path: path.clone(),
            reason,
        })?;
        keys.insert(agency.to_uppercase(), key);
    }
    let client = console_client(&opts.tls)?;
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .map_err(|source| ConsoleError::Bind {
            addr: opts.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ConsoleError::Bind {
        addr: opts.listen,
        source,
    })?;
    let token = new_token()?;
    let mut hosts = vec![addr.to_string(), format!("localhost:{}", addr.port())];
    if addr.ip().is_unspecified() {
        hosts.clear();
    }
    let role = identity.role();
    let console = Arc::new(Console {
        token: token.clone(),
        cookie: cookie_name(addr.port()),
        identity,
        nodes: opts
            .nodes
            .iter()
            .map(|n| n.trim_end_matches('/').into())
            .collect(),
        client,
        ca: opts.tls.ca.clone(),
        keys,
        hosts,
        listen_public: opts.listen_public,
    });
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let app = router(console);
    let task = tokio::spawn(async move {
        let serve = axum::serve(listener, app).with_graceful_shutdown(async {
            let _ = rx.await;
        });
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "console stopped");
        }
    });
    tracing::info!(%addr, role = role.as_str(), "console listening");
    Ok(RunningConsole {
        addr,
        role,
        url: format!("http://{addr}/?token={token}"),
        shutdown: tx,
        task,
    })
}

/// The mTLS client and request signer; it keeps what each node's certificate says, so the
/// auditor page knows which node a log came from.
fn console_client(tls: &TlsFiles) -> Result<AnalystClient, ConsoleError> {
    // tls_info is on: the client reads each node's certificate (coordinator and log owner).
    Ok(AnalystClient::new(tls, Duration::from_secs(300))?)
}

/// The session cookie's name for a console listening on `port`.
pub fn cookie_name(port: u16) -> String {
    format!("{COOKIE_PREFIX}_{port}")
}

/// The run key of a console whose login token is `token`: lower-case hex of
/// SHA-256(`"cxfed-console-run\n"` ‖ token). A link `…#sql=…&run=<run key>` runs its query when
/// opened; any other `run` only fills the editor.
pub fn run_key(token: &str) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(RUN_KEY_CONTEXT.as_bytes());
    ctx.update(token.as_bytes());
    cxfed_protocol::signing::hex(ctx.finish().as_ref())
}

fn new_token() -> Result<String, ConsoleError> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| ConsoleError::Random)?;
    Ok(cxfed_protocol::signing::hex(&bytes))
}

fn router(console: Arc<Console>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/app.js", get(|| asset("text/javascript", APP_JS)))
        .route("/app.css", get(|| asset("text/css", APP_CSS)))
        .route("/api/whoami", get(whoami))
        .route("/api/session", get(session))
        .route("/api/examples", get(examples))
        .route("/api/node/{index}/{what}", get(node_get))
        .route("/api/query", post(query))
        .route("/api/explain", post(explain))
        .route("/api/audit", get(audit))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found") })
        .layer(middleware::from_fn_with_state(console.clone(), guard))
        .with_state(console)
}

fn same(a: &str, b: &str) -> bool {
    let (da, db) = (
        ring::digest::digest(&ring::digest::SHA256, a.as_bytes()),
        ring::digest::digest(&ring::digest::SHA256, b.as_bytes()),
    );
    da.as_ref() == db.as_ref()
}

fn has_session(console: &Console, headers: &HeaderMap) -> bool {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .any(|(name, value)| name == console.cookie && same(value, &console.token))
}

fn refuse(status: StatusCode, message: &str) -> Response {
    tracing::warn!(
        status = status.as_u16(),
        reason = message,
        "console refused a request"
    );
    (status, message.to_string()).into_response()
}

/// Host and Origin checks everywhere, the session cookie on `/api/*`, and security headers on
/// every answer.
async fn guard(State(console): State<Arc<Console>>, req: Request, next: Next) -> Response {
    let headers = req.headers();
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let mut resp = if !console.listen_public && !console.hosts.iter().any(|h| h == host) {
        refuse(StatusCode::FORBIDDEN, "unexpected Host header")
    } else if headers
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok())
        .is_some_and(|o| o.strip_prefix("http://") != Some(host))
    {
        refuse(StatusCode::FORBIDDEN, "cross-origin request")
    } else if req.uri().path().starts_with("/api/") && !has_session(&console, headers) {
        refuse(
            StatusCode::UNAUTHORIZED,
            "no console session: open the URL `cxfed console` printed",
        )
    } else {
        next.run(req).await
    };
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[derive(Debug, Deserialize)]
struct IndexParams {
    token: Option<String>,
}

/// The page; with `?token=`, trades the token for the session cookie and redirects to `/` so
/// the token leaves the address bar and history.
async fn index(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Query(params): Query<IndexParams>,
) -> Response {
    if let Some(token) = params.token {
        if !same(&token, &console.token) {
            return refuse(StatusCode::UNAUTHORIZED, "wrong console token");
        }
        let cookie = format!(
            "{}={}; HttpOnly; SameSite=Strict; Path=/",
            console.cookie, console.token
        );
        return (
            StatusCode::SEE_OTHER,
            [
                (header::SET_COOKIE, cookie),
                (header::LOCATION, "/".to_string()),
            ],
        )
            .into_response();
    }
    if !has_session(&console, &headers) {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "no console session: open the URL `cxfed console` printed",
        );
    }
    asset("text/html; charset=utf-8", INDEX_HTML).await
}

async fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

async fn whoami(State(console): State<Arc<Console>>) -> Response {
    let id = &console.identity;
    axum::Json(json!({
        "identity": id.to_string(),
        "federation": id.federation(),
        "agency": id.agency(),
        "role": id.role().as_str(),
        "name": id.name(),
        "nodes": console.nodes,
        "audit_keys": console.keys.keys().collect::<Vec<_>>(),
    }))
    .into_response()
}

/// What the page needs to know about its session: the run key, which only a page of this
/// origin can read (the response has no CORS headers, and other origins are refused).
async fn session(State(console): State<Arc<Console>>) -> Response {
    axum::Json(json!({"run_key": run_key(&console.token)})).into_response()
}

async fn examples() -> Response {
    let mut list: Vec<Value> = crate::examples::QUERIES
        .iter()
        .map(|(title, sql)| json!({"title": title, "sql": sql}))
        .collect();
    list.push(json!({"title": crate::examples::REFUSED.0, "sql": crate::examples::REFUSED.1}));
    axum::Json(list).into_response()
}

/// JSON from a node, or a transport error as `502` with a message.
async fn node_json(
    req: reqwest::RequestBuilder,
    url: &str,
) -> Result<(StatusCode, Bytes), Response> {
    let resp = req
        .send()
        .await
        .map_err(|e| transport(format!("{url}: {e}")))?;
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| transport(format!("{url}: {e}")))?;
    Ok((status, bytes))
}

fn transport(message: String) -> Response {
    tracing::warn!(error = %message, "console could not reach a node");
    (
        StatusCode::BAD_GATEWAY,
        axum::Json(json!({"code": ApiCode::ConsoleUnreachable.code(), "kind": ApiCode::ConsoleUnreachable.slug(), "message": message})),
    )
        .into_response()
}

fn json_bytes(status: StatusCode, bytes: Bytes) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response()
}

#[derive(Debug, Deserialize)]
struct ActivityParams {
    limit: Option<u32>,
}

/// A read-only node endpoint, passed through: the node checks the role.
async fn node_get(
    State(console): State<Arc<Console>>,
    Path((index, what)): Path<(usize, String)>,
    Query(params): Query<ActivityParams>,
) -> Response {
    let Some(node) = console.nodes.get(index) else {
        return refuse(StatusCode::NOT_FOUND, "no such node");
    };
    let path = match what.as_str() {
        "schema" | "health" | "budget" | "policy" => format!("/v1/{what}"),
        "activity" => format!("/v1/activity?limit={}", params.limit.unwrap_or(50)),
        _ => return refuse(StatusCode::NOT_FOUND, "no such node endpoint"),
    };
    let url = format!("{node}{path}");
    match node_json(console.client.http.get(&url), &url).await {
        Ok((status, bytes)) => json_bytes(status, bytes),
        Err(r) => r,
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QueryForm {
    sql: String,
    /// ε as a number, or as the text the analyst typed (blank: each node's maximum).
    #[serde(default)]
    epsilon: Option<Value>,
    #[serde(default)]
    allow_partial: bool,
}

/// The ε of a query form: null or blank is "each node's maximum"; a number or the text of one
/// (NaN and inf included, so that they are refused rather than lost) is itself; anything else
/// is refused, naming ε and the value.
fn form_epsilon(v: Option<&Value>) -> Result<Option<f64>, Box<ErrorBody>> {
    let bad = |message: String| {
        let c = ApiCode::BadEpsilon;
        let (code, kind) = (c.code(), c.slug());
        Box::new(ErrorBody {
            code: code.into(),
            kind: kind.into(),
            message,
            line: None,
            column: None,
            query_id: None,
            nodes: Vec::new(),
        })
    };
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_f64()
            .map(Some)
            .ok_or_else(|| bad(format!("epsilon (ε) = {n} is not a number"))),
        Some(Value::String(t)) if t.trim().is_empty() => Ok(None),
        Some(Value::String(t)) => t.trim().parse::<f64>().map(Some).map_err(|_| {
            bad(format!(
                "epsilon (ε) = {t:?} is not a number; nodes accept ε from {} up to their \
                 epsilon_per_query",
                cxfed_queries::dp::MIN_EPSILON
            ))
        }),
        Some(other) => Err(bad(format!("epsilon (ε) = {other} is not a number"))),
    }
}

/// Runs a query at the first node, signed with the user's key. A refusal comes back with the
/// node's explanation of it.
async fn query(State(console): State<Arc<Console>>, body: Bytes) -> Response {
    let form: QueryForm = match serde_json::from_slice(&body) {
        Ok(f) => f,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, &format!("request body: {e}")),
    };
    let epsilon = match form_epsilon(form.epsilon.as_ref()) {
        Ok(e) => e,
        Err(body) => return axum::Json(json!({"ok": false, "error": body})).into_response(),
    };
    let req = QueryRequest::new(form.sql.clone())
        .require_all(!form.allow_partial)
        .epsilon(epsilon);
    match send_query(&console.client, &console.nodes[0], &req).await {
        Ok(resp) => axum::Json(json!({"ok": true, "result": resp})).into_response(),
        // Refused before it was sent: the SQL itself needs no explaining.
        Err(QueryFailure::Refused(body)) if body.kind == ApiCode::BadEpsilon.slug() => {
            axum::Json(json!({"ok": false, "error": body})).into_response()
        }
        Err(QueryFailure::Refused(body)) => {
            let explain = explanation(&console, &form.sql).await.ok();
            axum::Json(json!({"ok": false, "error": body, "explain": explain})).into_response()
        }
        Err(QueryFailure::Transport(message)) => axum::Json(json!({
            "ok": false,
            "error": ErrorBody {
                code: ApiCode::ConsoleUnreachable.code().into(),
                kind: ApiCode::ConsoleUnreachable.slug().into(),
                message,
                line: None,
                column: None,
                query_id: None,
                nodes: Vec::new(),
            },
        }))
        .into_response(),
    }
}

async fn explanation(console: &Console, sql: &str) -> Result<Value, Response> {
    let url = format!("{}/v1/explain", console.nodes[0]);
    let req = console.client.http.post(&url).json(&QueryRequest::new(sql));
    let (status, bytes) = node_json(req, &url).await?;
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| transport(format!("{url}: unreadable answer: {e}")))?;
    if status.is_success() {
        Ok(v)
    } else {
        Err((status, axum::Json(v)).into_response())
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExplainForm {
    sql: String,
}

async fn explain(State(console): State<Arc<Console>>, body: Bytes) -> Response {
    match serde_json::from_slice::<ExplainForm>(&body) {
        Ok(f) => match explanation(&console, &f.sql).await {
            Ok(v) => axum::Json(v).into_response(),
            Err(r) => r,
        },
        Err(e) => refuse(StatusCode::BAD_REQUEST, &format!("request body: {e}")),
    }
}

/// Fetches every node's log, verifies each (chain, checkpoint signatures with the key given for
/// its agency, analyst signatures against the CA), and reconciles them. A log belongs to the
/// node whose TLS certificate served it — not to whatever agency its lines name.
async fn audit(State(console): State<Arc<Console>>) -> Response {
    let checker = crate::requests::RequestChecker::new(&console.ca, console.identity.federation())
        .map_err(|e| e.to_string());
    let mut nodes = Vec::new();
    let mut logs: BTreeMap<String, Vec<Entry>> = BTreeMap::new();
    let mut fetched_from: BTreeMap<String, String> = BTreeMap::new();
    for node in &console.nodes {
        let url = format!("{node}/v1/audit");
        let fail = |message: String| json!({"url": node, "error": message});
        let fetched = crate::client::fetch_audit(
            &console.client.http,
            node,
            0,
            console.identity.federation(),
        )
        .await;
        let crate::client::FetchedLog { served_by, bytes } = match fetched {
            Ok(f) => f,
            Err(message) => {
                tracing::warn!(error = %message, %url, "console could not fetch a node's log");
                nodes.push(fail(message));
                continue;
            }
        };
        let agency = served_by.agency().to_string();
        if let Some(first) = fetched_from.get(&agency) {
            nodes.push(json!({"url": node, "agency": agency, "error": format!(
                "{url} is {served_by}, whose log was already fetched from {first}: listed twice, \
                 or two nodes present the same identity")}));
            continue;
        }
        fetched_from.insert(agency.clone(), node.clone());
        let (value, entries) = check_log(
            &served_by,
            node,
            &bytes,
            console.keys.get(&agency),
            checker.as_ref().map_err(String::as_str),
        );
        nodes.push(value);
        if let Some(entries) = entries {
            logs.insert(agency, entries);
        }
    }
    let r = crate::auditor::reconcile(&logs);
    axum::Json(json!({
        "nodes": nodes,
        "reconciliation": {
            "nodes": r.nodes,
            "queries": r.queries,
            "matched": r.matched,
            "mismatches": r.mismatches.iter().map(|m| m.to_string()).collect::<Vec<_>>(),
        },
    }))
    .into_response()
}

/// Checks one fetched log of the node `served_by`: every line must name that node, then the
/// chain and checkpoint signatures (with its agency's key) and every analyst signature (with
/// `checker`). Returns what the page shows and, when every line is that node's, the entries
/// for reconciliation.
fn check_log(
    served_by: &Identity,
    url: &str,
    bytes: &[u8],
    key: Option<&PublicKey>,
    checker: Result<&crate::requests::RequestChecker, &str>,
) -> (Value, Option<Vec<Entry>>) {
    let agency = served_by.agency();
    let mut entries = Vec::new();
    for (i, line) in bytes
        .split(|b| *b == b'\n')
        .enumerate()
        .filter(|(_, l)| !l.is_empty())
    {
        match crate::audit::parse_line(line) {
            Ok(e) => entries.push(e),
            Err(m) => {
                let error = format!("line {}: {m}", i + 1);
                return (json!({"url": url, "agency": agency, "error": error}), None);
            }
        }
    }
    let foreign = entries.iter().find(|e| e.node != agency);
    let check = if let Some(e) = foreign {
        json!({"status": "wrong-node", "seq": e.seq, "message": format!(
            "seq {} names node {:?}, but this log was served by {served_by}: a node passing off \
             another's log", e.seq, e.node)})
    } else {
        match (key, checker) {
            (None, _) => json!({"status": "unverified", "message": format!(
                "no audit key for {agency}: start the console with --audit-key {agency}=FILE")}),
            (Some(key), Ok(checker)) => {
                match crate::auditor::verify(bytes, key, 0, Some(checker)) {
                    Ok(v) => json!({"status": "clean", "first_seq": v.first_seq,
                    "last_seq": v.last_seq, "checkpoints": v.checkpoints,
                    "head_time": v.head_time, "signatures_checked": v.signatures_checked}),
                    Err(p) => json!({"status": "tampered", "seq": p.seq, "message": p.message}),
                }
            }
            (Some(key), Err(why)) => match crate::auditor::verify(bytes, key, 0, None) {
                Ok(v) => json!({"status": "unverified", "message": format!(
                    "NOT VERIFIED: chain and {} signed checkpoints hold (seq {}–{}), but the \
                     analyst signatures were not re-checked: {why}",
                    v.checkpoints, v.first_seq, v.last_seq)}),
                Err(p) => json!({"status": "tampered", "seq": p.seq, "message": p.message}),
            },
        }
    };
    let reconcile = foreign.is_none();
    let total = entries.len();
    let shown: Vec<&Entry> = entries.iter().rev().take(AUDIT_ENTRIES_SHOWN).collect();
    let out = json!({"url": url, "agency": agency, "identity": served_by.to_string(),
        "check": check, "total": total, "entries": shown});
    (out, reconcile.then_some(entries))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{AuditLog, Decision, Record};

    async fn log_of(dir: &std::path::Path, node: &str) -> (Vec<u8>, PublicKey) {
        let log = AuditLog::open(dir, node, 100, |_| {}).expect("open");
        log.append(Record {
            endpoint: "/v1/schema".into(),
            peer: "spiffe://cx-demo/SSA/analyst/a".into(),
            decision: Some(Decision::Executed),
            ..Record::default()
        })
        .await
        .expect("append");
        (log.export_since(0).await.expect("export"), log.public_key())
    }

    fn node(agency: &str) -> Identity {
        Identity::parse_uri(&format!(
            "spiffe://cx-demo/{agency}/node/{}-node",
            agency.to_lowercase()
        ))
        .expect("identity")
    }

    #[tokio::test]
    async fn flags_a_log_that_names_another_node_than_the_one_that_served_it() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (cms_log, cms_key) = log_of(&tmp.path().join("cms"), "CMS").await;
        // SSA's node serves CMS's (valid, signed) log; the auditor has both keys.
        let (v, entries) = check_log(
            &node("SSA"),
            "https://ssa",
            &cms_log,
            Some(&cms_key),
            Err("unused"),
        );
        assert_eq!(v["check"]["status"], "wrong-node", "{v}");
        assert_eq!(v["agency"], "SSA");
        assert!(
            v["check"]["message"]
                .as_str()
                .expect("message")
                .contains("names node \"CMS\""),
            "{v}"
        );
        assert!(entries.is_none(), "kept out of the reconciliation");
    }

    #[tokio::test]
    async fn a_log_whose_signatures_could_not_be_checked_is_not_reported_clean() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (ssa_log, ssa_key) = log_of(&tmp.path().join("ssa"), "SSA").await;
        let (v, entries) = check_log(
            &node("SSA"),
            "https://ssa",
            &ssa_log,
            Some(&ssa_key),
            Err("ca.pem: no certificate"),
        );
        assert_eq!(v["check"]["status"], "unverified", "{v}");
        let message = v["check"]["message"].as_str().expect("message");
        assert!(
            message.contains("NOT VERIFIED") && message.contains("ca.pem: no certificate"),
            "{v}"
        );
        assert!(entries.is_some());
        // Without the node's key: unverified as well.
        let (v, _) = check_log(&node("SSA"), "https://ssa", &ssa_log, None, Err("x"));
        assert_eq!(v["check"]["status"], "unverified", "{v}");
        // Without its closing checkpoint the log is tampered, checker or not.
        let body = &ssa_log[..ssa_log.len() - 1];
        let cut = &ssa_log[..body.iter().rposition(|b| *b == b'\n').expect("lines") + 1];
        let (v, _) = check_log(&node("SSA"), "https://ssa", cut, Some(&ssa_key), Err("x"));
        assert_eq!(v["check"]["status"], "tampered", "{v}");
    }

    #[test]
    fn cookie_names_differ_by_port_and_the_run_key_is_bound_to_the_token() {
        assert_ne!(cookie_name(8080), cookie_name(8081));
        assert_eq!(cookie_name(8080), "cxfed_console_8080");
        assert_ne!(run_key("a"), run_key("b"));
        assert_eq!(run_key("a").len(), 64);
        assert_ne!(run_key("a"), "a");
    }
}
