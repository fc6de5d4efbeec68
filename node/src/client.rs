//! The mTLS HTTP client used by the CLI and by coordinators, and the one way an analyst's query
//! is signed, sent and its failure described ([`send_query`], [`QueryFailure`]).
//!
//! One [`reqwest::Client`] per process (it is cheap to clone): it speaks TLS 1.3 only, trusts
//! only the federation CA, presents our certificate, negotiates HTTP/2 when the server offers it,
//! keeps idle connections for reuse, and keeps each server's certificate on the response (so an
//! analyst learns which agency's node it talks to from the node's own certificate).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cxfed_protocol::Role;
use cxfed_protocol::wire::{ErrorBody, QueryRequest, QueryResponse};

use cxfed_protocol::Identity;
use cxfed_protocol::signing::Signer;

use crate::tls::{self, TlsError, TlsFiles};

/// How long an idle connection to a peer is kept for reuse.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// An HTTPS-only client with our certificate; `timeout` bounds each whole request (connect,
/// send, and read the full response).
pub fn http_client(tls: &TlsFiles, timeout: Duration) -> Result<reqwest::Client, TlsError> {
    let config = tls.client_config()?;
    reqwest::Client::builder()
        .tcp_nodelay(true)
        .use_preconfigured_tls(config)
        .tls_info(true)
        .https_only(true)
        .timeout(timeout)
        .connect_timeout(timeout)
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .build()
        .map_err(TlsError::HttpClient)
}

/// A client for talking to the `node` of `agency` in `federation`: its server certificate must
/// carry exactly that identity, not merely chain to the CA.
pub fn peer_client(
    tls: &TlsFiles,
    federation: &str,
    agency: &str,
    timeout: Duration,
) -> Result<reqwest::Client, TlsError> {
    let config = tls::node_client_config(tls, federation, Some(agency))?;
    reqwest::Client::builder()
        .tcp_nodelay(true)
        .use_preconfigured_tls(config)
        .https_only(true)
        .timeout(timeout)
        .connect_timeout(timeout)
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .build()
        .map_err(TlsError::HttpClient)
}

/// Like [`http_client`] but presenting no client certificate (trusting the CA in `ca`): every
/// node refuses it during the handshake. For probes and for tests of that refusal.
pub fn http_client_without_identity(
    ca: &Path,
    timeout: Duration,
) -> Result<reqwest::Client, TlsError> {
    let config = tls::anonymous_client_config(ca)?;
    reqwest::Client::builder()
        .tcp_nodelay(true)
        .use_preconfigured_tls(config)
        .https_only(true)
        .timeout(timeout)
        .connect_timeout(timeout)
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .build()
        .map_err(TlsError::HttpClient)
}

/// An analyst's client: the mTLS connection, the key that signs every request, and which
/// agency's node each URL reached.
#[derive(Debug, Clone)]
pub struct AnalystClient {
    /// The mTLS HTTP client.
    pub http: reqwest::Client,
    /// Signs each request with the analyst's certificate key.
    pub signer: Arc<Signer>,
    /// Node URL -> the agency in its certificate (the coordinator a request is signed for).
    coordinators: Arc<Mutex<HashMap<String, String>>>,
}

impl AnalystClient {
    /// A client and signer from the analyst's certificate files.
    pub fn new(tls: &TlsFiles, timeout: Duration) -> Result<AnalystClient, TlsError> {
        Ok(AnalystClient {
            http: http_client(tls, timeout)?,
            signer: Arc::new(signer(tls)?),
            coordinators: Arc::default(),
        })
    }

    /// The agency of the node at `node` (a base URL): read from the node certificate it presents
    /// on `GET /v1/health` (not logged by nodes), which must be a node of our federation; cached
    /// per URL.
    pub async fn coordinator(&self, node: &str) -> Result<String, String> {
        let base = node.trim_end_matches('/');
        if let Some(a) = self.cached(base) {
            return Ok(a);
        }
        let url = format!("{base}/v1/health");
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| format!("{url}: {}", error_chain(&e)))?;
        let id = served_by(&resp, self.signer.identity().federation())
            .map_err(|e| format!("{url}: {e}"))?;
        let agency = id.agency().to_string();
        self.coordinators
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(base.to_string(), agency.clone());
        Ok(agency)
    }

    /// Forgets which agency `node` is (e.g. after a node refused a request as signed for
    /// another coordinator).
    pub fn forget_coordinator(&self, node: &str) {
        self.coordinators
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(node.trim_end_matches('/'));
    }

    fn cached(&self, base: &str) -> Option<String> {
        self.coordinators
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(base)
            .cloned()
    }
}

pub use crate::tls::signer;

/// The identity in our own certificate (the leaf of the PEM file at `cert_path`).
pub fn own_identity(cert_path: &Path) -> Result<Identity, TlsError> {
    let chain = tls::load_certs(cert_path)?;
    let leaf = chain.first().ok_or_else(|| TlsError::NoCertificate {
        path: cert_path.to_owned(),
    })?;
    cxfed_protocol::identity::from_certificate_der(leaf).map_err(|source| TlsError::Identity {
        path: cert_path.to_owned(),
        source,
    })
}

/// Why a query produced no answer, as the analyst sees it.
#[derive(Debug, thiserror::Error)]
pub enum QueryFailure {
    /// The node answered with an error body (or this client refused the request before
    /// sending it, with the code a node would have answered: an ε no node can spend).
    #[error("{}", describe(.0))]
    Refused(Box<ErrorBody>),
    /// No usable answer.
    #[error("{0}")]
    Transport(String),
}

/// A refusal as one message: code, kind, message, position, each node's state and the query id.
pub fn describe(b: &ErrorBody) -> String {
    let mut s = format!("{} {}: {}", b.code, b.kind, b.message);
    if let (Some(l), Some(c)) = (b.line, b.column) {
        s.push_str(&format!(" (at line {l}, column {c})"));
    }
    for n in &b.nodes {
        let state = serde_json::to_value(n.status)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        s.push_str(&format!(
            "\n  node {}: {}{}",
            n.agency,
            state,
            n.error
                .as_ref()
                .map(|e| format!(" — {e}"))
                .unwrap_or_default()
        ));
    }
    if let Some(q) = &b.query_id {
        s.push_str(&format!("\n  query id {q}"));
    }
    s
}

/// Signs `req` as the analyst (fresh nonce, now) for the agency of the node at `node` (read from
/// its certificate), posts it there and returns the merged answer. If the node refuses it as
/// signed for another coordinator (the URL now reaches another agency's node), the agency is
/// read again and the query signed and sent once more.
pub async fn send_query(
    client: &AnalystClient,
    node: &str,
    req: &QueryRequest,
) -> Result<QueryResponse, QueryFailure> {
    // An ε no node could spend is refused here, before it is signed or sent (and so before any
    // node could charge a budget for it): NaN and ±∞ would otherwise be easy to mistake for
    // "no ε" on the way.
    if let Some(e) = req.epsilon
        && let Err(bad) =
            cxfed_queries::dp::check_epsilon(e, cxfed_queries::dp::EpsilonRange::Federation)
    {
        let c = cxfed_protocol::codes::ApiCode::BadEpsilon;
        let (code, kind) = (c.code(), c.slug());
        return Err(QueryFailure::Refused(Box::new(ErrorBody {
            code: code.into(),
            kind: kind.into(),
            message: bad.to_string(),
            line: None,
            column: None,
            query_id: None,
            nodes: vec![],
        })));
    }
    match send_query_once(client, node, req).await {
        Err(QueryFailure::Refused(b)) if b.kind == "wrong-coordinator" => {
            client.forget_coordinator(node);
            send_query_once(client, node, req).await
        }
        other => other,
    }
}

async fn send_query_once(
    client: &AnalystClient,
    node: &str,
    req: &QueryRequest,
) -> Result<QueryResponse, QueryFailure> {
    let url = format!("{}/v1/query", node.trim_end_matches('/'));
    let coordinator = client
        .coordinator(node)
        .await
        .map_err(QueryFailure::Transport)?;
    let req = req
        .clone()
        .sign(&client.signer, &coordinator)
        .map_err(|e| QueryFailure::Transport(format!("signing the request: {e}")))?;
    let resp = client
        .http
        .post(&url)
        .json(&req)
        .send()
        .await
        .map_err(|e| QueryFailure::Transport(format!("{url}: {}", error_chain(&e))))?;
    let status = resp.status();
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| QueryFailure::Transport(format!("{url}: {e}")))?;
    if status.is_success() {
        return serde_json::from_slice(&bytes)
            .map_err(|e| QueryFailure::Transport(format!("{url}: unreadable answer: {e}")));
    }
    match serde_json::from_slice::<ErrorBody>(&bytes) {
        Ok(b) => Err(QueryFailure::Refused(Box::new(b))),
        Err(_) => Err(QueryFailure::Transport(format!("{url}: HTTP {status}"))),
    }
}

/// An error and all its sources, one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(&format!(": {x}"));
        src = x.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use std::net::{SocketAddr, TcpListener};
    use std::sync::Arc;

    use axum::routing::get;
    use axum::{Extension, Router};
    use axum_server::Handle;
    use axum_server::tls::TlsInfo;
    use axum_server::tls_rustls::RustlsConfig;
    use cxfed_protocol::Role;

    use super::*;
    use crate::certs::{self, DevCerts};

    const FED: &str = "cx-demo";

    async fn whoami(Extension(info): Extension<Arc<TlsInfo>>) -> String {
        match tls::peer_identity(&info.peer_certificates) {
            Ok(id) => id.to_string(),
            Err(e) => format!("error: {e}"),
        }
    }

    async fn alpn(Extension(info): Extension<Arc<TlsInfo>>) -> String {
        String::from_utf8_lossy(info.alpn_protocol.as_deref().unwrap_or(b"none")).into_owned()
    }

    /// Starts an axum-server on 127.0.0.1:0 with SSA's node certificate.
    async fn serve(certs: &DevCerts) -> (SocketAddr, Handle<SocketAddr>) {
        let config = certs
            .tls_files("SSA", Role::Node)
            .expect("ssa node")
            .server_config(FED)
            .expect("server config");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let handle = Handle::new();
        let app = Router::new()
            .route("/whoami", get(whoami))
            .route("/alpn", get(alpn));
        let server = axum_server::from_tcp_rustls(listener, RustlsConfig::from_config(config))
            .expect("server")
            .handle(handle.clone());
        tokio::spawn(async move {
            let _ = server.serve(app.into_make_service()).await;
        });
        (addr, handle)
    }

    #[tokio::test]
    async fn accepts_same_federation_client_over_http() {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs =
            certs::dev(FED, &["SSA".into(), "CMS".into()], dir.path(), 30, false).expect("dev");
        let (addr, handle) = serve(&certs).await;

        let files = certs.tls_files("CMS", Role::Analyst).expect("cms analyst");
        let client = http_client(&files, Duration::from_secs(10)).expect("client");
        let url = format!("https://localhost:{}/whoami", addr.port());
        for _ in 0..3 {
            let body = client
                .get(&url)
                .send()
                .await
                .expect("send")
                .error_for_status()
                .expect("status")
                .text()
                .await
                .expect("body");
            assert_eq!(body, "spiffe://cx-demo/CMS/analyst/cms-analyst");
        }
        // Three requests, one connection: the pool reuses it.
        assert_eq!(handle.connection_count(), 1);

        let alpn = client
            .get(format!("https://127.0.0.1:{}/alpn", addr.port()))
            .send()
            .await
            .expect("send by IP")
            .text()
            .await
            .expect("body");
        assert_eq!(alpn, "h2");
        handle.shutdown();
    }

    #[tokio::test]
    async fn analyst_learns_the_coordinator_from_the_node_certificate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs =
            certs::dev(FED, &["SSA".into(), "CMS".into()], dir.path(), 30, false).expect("dev");
        let (addr, handle) = serve(&certs).await;
        let files = certs.tls_files("CMS", Role::Analyst).expect("cms analyst");
        let client = AnalystClient::new(&files, Duration::from_secs(10)).expect("client");
        // The health route is not served here: the certificate is what counts.
        let url = format!("https://localhost:{}/", addr.port());
        assert_eq!(client.coordinator(&url).await.expect("agency"), "SSA");
        assert_eq!(
            client.cached(url.trim_end_matches('/')).as_deref(),
            Some("SSA")
        );
        client.forget_coordinator(&url);
        assert_eq!(client.cached(url.trim_end_matches('/')), None);
        handle.shutdown();
    }

    #[tokio::test]
    async fn refuses_client_of_another_federation_over_http() {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = certs::dev(FED, &["SSA".into()], dir.path(), 30, false).expect("dev");
        let (addr, handle) = serve(&certs).await;

        // Same CA, foreign federation.
        let ca_pem = std::fs::read_to_string(&certs.ca_cert).expect("ca");
        let ca_key = std::fs::read_to_string(&certs.ca_key).expect("ca key");
        let id = Identity::parse_uri("spiffe://other-fed/SSA/analyst/x").expect("id");
        let now = time::OffsetDateTime::now_utc();
        let (cert, key) = certs::issue(
            &ca_pem,
            &ca_key,
            &id,
            &[],
            now - time::Duration::hours(1),
            now + time::Duration::days(1),
        )
        .expect("issue");
        let files = TlsFiles {
            ca: certs.ca_cert.clone(),
            cert: dir.path().join("other.pem"),
            key: dir.path().join("other.key"),
            crl: Vec::new(),
        };
        std::fs::write(&files.cert, cert).expect("write");
        std::fs::write(&files.key, key).expect("write");

        let client = http_client(&files, Duration::from_secs(10)).expect("client");
        let res = client
            .get(format!("https://localhost:{}/whoami", addr.port()))
            .send()
            .await;
        assert!(res.is_err(), "request succeeded: {res:?}");
        handle.shutdown();
    }

    #[tokio::test]
    async fn refuses_client_without_certificate_over_http() {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = certs::dev(FED, &["SSA".into()], dir.path(), 30, false).expect("dev");
        let (addr, handle) = serve(&certs).await;
        let client =
            http_client_without_identity(&certs.ca_cert, Duration::from_secs(10)).expect("client");
        let res = client
            .get(format!("https://localhost:{}/whoami", addr.port()))
            .send()
            .await;
        assert!(res.is_err(), "request succeeded: {res:?}");
        handle.shutdown();
    }

    #[tokio::test]
    async fn refuses_plain_http_urls() {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = certs::dev(FED, &["SSA".into()], dir.path(), 30, false).expect("dev");
        let files = certs.tls_files("SSA", Role::Analyst).expect("files");
        let client = http_client(&files, Duration::from_secs(5)).expect("client");
        assert!(client.get("http://127.0.0.1:1/").send().await.is_err());
    }

    #[test]
    fn own_identity_reads_the_certificate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = certs::dev(FED, &["OPM".into()], dir.path(), 30, false).expect("dev");
        let issued = certs.get("OPM", Role::Steward).expect("steward");
        let id = own_identity(&issued.cert).expect("identity");
        assert_eq!(id.to_string(), "spiffe://cx-demo/OPM/steward/opm-steward");
        let err = own_identity(&issued.key).expect_err("a key is no certificate");
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");
    }

    #[test]
    fn http_client_reports_missing_files() {
        let files = TlsFiles {
            ca: "/nonexistent/ca.pem".into(),
            cert: "/nonexistent/node.pem".into(),
            key: "/nonexistent/node.key".into(),
            crl: Vec::new(),
        };
        let err = http_client(&files, Duration::from_secs(1)).expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    }
}

/// The node of `federation` whose TLS certificate served `resp` (refused when it is not a node
/// of that federation): who actually answered, whatever the body says.
pub fn served_by(resp: &reqwest::Response, federation: &str) -> Result<Identity, String> {
    let der = resp
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|i| i.peer_certificate())
        .ok_or("no server certificate to tell which node answered")?;
    let id = cxfed_protocol::identity::from_certificate_der(der)
        .map_err(|e| format!("the server certificate has no usable identity: {e}"))?;
    if id.role() != Role::Node || id.federation() != federation {
        return Err(format!(
            "answered by {id}, which is not a node of federation {federation}"
        ));
    }
    Ok(id)
}

/// A node's audit log (or its lines after `since`) as an auditor fetched it.
#[derive(Debug)]
pub struct FetchedLog {
    /// The node whose certificate served it.
    pub served_by: Identity,
    /// The JSON lines, as received.
    pub bytes: Vec<u8>,
}

/// `GET {node}/v1/audit?since=…` with an auditor's (or steward's) client: the bytes and the node
/// of `federation` that served them. Errors name the URL and the node's refusal.
pub async fn fetch_audit(
    http: &reqwest::Client,
    node: &str,
    since: u64,
    federation: &str,
) -> Result<FetchedLog, String> {
    let url = format!("{}/v1/audit?since={since}", node.trim_end_matches('/'));
    let resp = http
        .get(&url)
        .send()
        .await
        .map_err(|e| format!("{url}: unreachable: {}", error_chain(&e)))?;
    let served_by = served_by(&resp, federation).map_err(|e| format!("{url}: {e}"))?;
    let status = resp.status();
    let bytes = resp.bytes().await.map_err(|e| format!("{url}: {e}"))?;
    if !status.is_success() {
        return Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(b) => format!("{url}: {}", describe(&b)),
            Err(_) => format!("{url}: HTTP {status}"),
        });
    }
    Ok(FetchedLog {
        served_by,
        bytes: bytes.to_vec(),
    })
}
