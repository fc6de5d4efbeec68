//! The node's HTTPS server: axum over rustls with client certificates required, one route per
//! endpoint of the wire protocol, the caller's role checked from its verified certificate.
//!
//! | endpoint            | role          | what                                     |
//! |---------------------|---------------|------------------------------------------|
//! | `POST /v1/query`    | analyst       | federated query, merged answer (JSON)    |
//! | `POST /v1/partial`  | node (a peer) | this node's partial aggregates (Arrow)   |
//! | `POST /v1/explain`  | analyst, steward | plan, partial plan, merge, rules      |
//! | `GET /v1/schema`    | any           | tables, columns (row counts: steward)    |
//! | `GET /v1/health`    | any           | liveness                                 |
//! | `GET /v1/audit`     | auditor       | this node's query log (`?since=SEQ`)     |
//! | `GET /v1/budget`    | steward       | privacy budget used and left per analyst |
//! | `GET /v1/policy`    | steward       | the policy in force                      |
//! | `GET /v1/activity`  | steward       | recent requests this node answered       |

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Extension, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum_server::tls::TlsInfo;
use axum_server::tls_rustls::RustlsAcceptor;
use serde::Deserialize;
use tracing::{Instrument, info, warn};

use cxfed_protocol::codes::ApiCode;
use cxfed_protocol::wire::{
    ARROW_STREAM, ErrorBody, HEADER_QUERY_ID, Health, NodeStatus, PROTOCOL_VERSION, PartialRequest,
    QueryRequest, SchemaColumn, SchemaResponse, SchemaTable,
};
use cxfed_protocol::{Identity, Role};
use cxfed_queries::rules::QueryError;
use cxfed_queries::rules::Rejection;
use cxfed_queries::schema::{Domain, Kind, Table};

use crate::audit::{Decision, Record};
use crate::config::NodeConfig;
use crate::node::{Node, ServeError, build_node};
use crate::partial::PartialError;
use crate::policy::PolicyRefusal;
use crate::requests::{Expected, Received, SignatureRefusal};

/// A node serving in the background.
#[derive(Debug)]
pub struct RunningNode {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// Its shared state.
    pub node: Arc<Node>,
    handle: axum_server::Handle<SocketAddr>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    reload: Option<tokio::task::JoinHandle<()>>,
}

impl RunningNode {
    /// Stops accepting, lets requests in flight finish (up to 5 s), waits, and closes the
    /// audit log with a signed checkpoint.
    pub async fn shutdown(self) {
        if let Some(r) = &self.reload {
            r.abort();
        }
        self.handle.graceful_shutdown(Some(Duration::from_secs(5)));
        let _ = self.task.await;
        if let Err(e) = self.node.audit.checkpoint().await {
            tracing::error!(error = %e, "could not write the closing audit checkpoint");
        }
    }

    /// Stops at once, dropping connections in flight (as if the process died).
    pub fn kill(self) {
        if let Some(r) = &self.reload {
            r.abort();
        }
        self.handle.shutdown();
        self.task.abort();
    }

    /// Waits until the server stops by itself.
    pub async fn wait(self) -> Result<(), ServeError> {
        match self.task.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(ServeError::Io {
                addr: self.addr.to_string(),
                source,
            }),
            Err(e) => Err(ServeError::Io {
                addr: self.addr.to_string(),
                source: std::io::Error::other(e),
            }),
        }
    }
}

/// Starts serving `config` on `listener` (or on `config.listen` when `None`).
pub async fn start(
    config: NodeConfig,
    listener: Option<std::net::TcpListener>,
) -> Result<RunningNode, ServeError> {
    let listen = config.listen;
    let node = Arc::new(build_node(config)?);
    let app = router(Arc::clone(&node));
    let io_err = |source| ServeError::Io {
        addr: listen.to_string(),
        source,
    };
    let listener = match listener {
        Some(l) => l,
        None => std::net::TcpListener::bind(listen).map_err(io_err)?,
    };
    listener.set_nonblocking(true).map_err(io_err)?;
    let addr = listener.local_addr().map_err(io_err)?;
    let handle = axum_server::Handle::new();
    // TCP_NODELAY: a response is written in more than one segment (headers, body); with
    // Nagle's algorithm on, the second waits for the peer's delayed ACK — 40 ms per request.
    // The acceptor reads the server configuration in force at each new connection (the node
    // swaps it on reload).
    let acceptor = RustlsAcceptor::new(node.tls.server())
        .handshake_timeout(Duration::from_secs(10))
        .acceptor(axum_server::accept::NoDelayAcceptor::new());
    let server = axum_server::from_tcp(listener)
        .map_err(io_err)?
        .acceptor(acceptor)
        .handle(handle.clone())
        // Handshake failures (no client certificate, foreign CA, expired, TLS 1.2 ...). The
        // certificate verifier has already logged the identity a presented certificate claimed.
        .accept_error_handler(|remote: Option<&SocketAddr>, e: &std::io::Error| {
            warn!(remote = ?remote, error = %e, "connection refused during TLS handshake");
        });
    let task = tokio::spawn(server.serve(app.into_make_service()));
    let served = node.tls.served();
    info!(agency = %node.config.agency, %addr, peers = node.config.peers.len(), k = node.config.k,
        identity = %served.identity, serial = %served.serial, not_after = %served.not_after,
        cas = served.cas, crls = served.crls, revoked = served.revoked, "node serving");
    let reload = Some(tokio::spawn(watch(
        Arc::clone(&node),
        node.config.source.clone(),
    )));
    Ok(RunningNode {
        addr,
        node,
        handle,
        task,
        reload,
    })
}

/// How often the configuration file and the TLS files are checked for changes.
const RELOAD_POLL: Duration = Duration::from_secs(2);

/// Reloads on SIGHUP, and when the configuration file or a TLS file changes:
///
/// - the steward's policy, from the configuration file (a file that does not parse or check is
///   refused with its error and the policy in force stays);
/// - the TLS material ([`Node::reload_tls`]): certificate, key, CA bundle and CRLs, from the
///   `[tls]` section (which may itself have changed). On SIGHUP at once; after a file change
///   once the files have stayed unchanged for one poll, so a set being copied in is not read
///   half-written.
async fn watch(node: Arc<Node>, path: Option<std::path::PathBuf>) {
    let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut seen = path.as_deref().and_then(modified);
    let mut tls_applied = crate::rotation::stamp(&node.tls.files());
    let mut tls_pending: Option<crate::rotation::Stamp> = None;
    #[cfg(unix)]
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(error = %e, "cannot listen for SIGHUP; files are still polled for changes");
            None
        }
    };
    loop {
        #[cfg(unix)]
        let signalled = async {
            match hup.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let signalled = std::future::pending::<()>();
        let forced = tokio::select! {
            () = tokio::time::sleep(RELOAD_POLL) => false,
            () = signalled => true,
        };
        if forced {
            info!("SIGHUP: reloading the configuration and the TLS files");
        }
        let mut new_tls = None;
        if let Some(path) = &path {
            let now = modified(path);
            if forced || now != seen {
                seen = now;
                new_tls = reload_config(&node, path);
            }
        }
        let current = node.tls.files();
        let files = new_tls.unwrap_or_else(|| current.clone());
        let now = crate::rotation::stamp(&files);
        let due = if forced || files != current {
            true
        } else if now == tls_applied {
            tls_pending = None;
            false
        } else if tls_pending.as_ref() == Some(&now) {
            true
        } else {
            // Changed since the last poll: wait one more poll for the set to settle.
            tls_pending = Some(now);
            false
        };
        if due {
            let _ = node.reload_tls(files);
            // What is in force now (the new files, or after a refusal the old ones): a refused
            // set is not retried until it changes again or a SIGHUP asks.
            tls_applied = crate::rotation::stamp(&node.tls.files());
            tls_pending = None;
        }
    }
}

/// Reloads the policy from `path`; returns the `[tls]` files it names when they differ from
/// those in force.
fn reload_config(node: &Node, path: &std::path::Path) -> Option<crate::tls::TlsFiles> {
    match NodeConfig::load(path) {
        Err(e) => {
            tracing::error!(error = %e, "configuration not reloaded; the policy in force stays");
            None
        }
        Ok(new) => {
            let old = node.policy();
            if new.federation != node.config.federation
                || new.agency != node.config.agency
                || new.listen != node.config.listen
                || new.data_dir != node.config.data_dir
                || new.peers != node.config.peers
                || new.policy.memory_limit_bytes != old.memory_limit_bytes
            {
                warn!(
                    "identity, listen, data_dir, peers and memory_limit_mb changes take effect at restart"
                );
            }
            // The memory pool is sized at start: the policy in force (and GET /v1/policy)
            // keeps the limit that is really enforced.
            let mut policy = new.policy;
            policy.memory_limit_bytes = old.memory_limit_bytes;
            if *old != policy {
                info!(k = policy.k, hidden = ?policy.hidden_dimensions, allowed = ?policy.allowed_agencies, "policy reloaded");
                node.set_policy(policy);
            }
            (new.tls != node.tls.files()).then_some(new.tls)
        }
    }
}

/// Serves until `shutdown` completes (mini-redis style: a thin `main` calls this).
pub async fn run(config: NodeConfig, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
    let running = start(config, None).await?;
    shutdown.await;
    info!("shutting down");
    running.shutdown().await;
    Ok(())
}

/// The routes.
pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/v1/query", post(query))
        .route("/v1/partial", post(partial))
        .route("/v1/secagg/key", post(secagg_key))
        .route("/v1/journey", post(journey))
        .route("/v1/explain", post(explain))
        .route("/v1/schema", get(schema))
        .route("/v1/health", get(health))
        .route("/v1/audit", get(audit))
        .route("/v1/budget", get(budget))
        .route("/v1/policy", get(policy))
        .route("/v1/activity", get(activity))
        .fallback(not_found)
        .method_not_allowed_fallback(not_found)
        .with_state(node)
}

/// Everything that can go wrong in a request, turned into a response in one place.
#[derive(Debug)]
pub enum ApiError {
    /// The query broke a rule.
    Rejected(Rejection, Option<String>),
    /// The steward's policy refused the query.
    Policy(PolicyRefusal, Option<String>),
    /// The caller's certificate is not allowed here.
    Forbidden(String),
    /// The request is not provably the analyst's (unsigned, forged, altered, stale, replayed).
    Unsigned(SignatureRefusal, Option<String>),
    /// The request body is malformed.
    BadRequest(String),
    /// The analyst asked for an ε no node can spend.
    BadEpsilon(cxfed_queries::dp::BadEpsilon, Option<String>),
    /// Some nodes failed and the analyst required all.
    NodesFailed(String, Vec<NodeStatus>),
    /// No such endpoint.
    NotFound,
    /// The request body is over the limit (bytes) this node reads.
    TooLarge(usize),
    /// A bug or engine failure; details are logged, not returned.
    Internal(String),
}

impl ApiError {
    /// The same error, naming the query it answers (refusals only).
    fn for_query(self, query_id: &str) -> ApiError {
        let id = Some(query_id.to_string());
        match self {
            ApiError::Rejected(r, _) => ApiError::Rejected(r, id),
            ApiError::Policy(p, _) => ApiError::Policy(p, id),
            ApiError::BadEpsilon(e, _) => ApiError::BadEpsilon(e, id),
            other => other,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = |code: &str, kind: &str, message: String| ErrorBody {
            code: code.into(),
            kind: kind.into(),
            message,
            line: None,
            column: None,
            query_id: None,
            nodes: vec![],
        };
        let api = |c: ApiCode, message: String| body(c.code(), c.slug(), message);
        let (status, body) = match self {
            ApiError::Rejected(r, query_id) => (
                StatusCode::BAD_REQUEST,
                ErrorBody {
                    line: r.position.map(|p| p.line),
                    column: r.position.map(|p| p.column),
                    query_id,
                    ..body(r.rule.code(), r.rule.slug(), r.reason)
                },
            ),
            ApiError::Policy(p, query_id) => (
                StatusCode::from_u16(p.status()).unwrap_or(StatusCode::FORBIDDEN),
                ErrorBody {
                    query_id,
                    ..body(p.code(), p.slug(), p.reason)
                },
            ),
            ApiError::Forbidden(m) => (StatusCode::FORBIDDEN, api(ApiCode::Forbidden, m)),
            ApiError::Unsigned(r, query_id) => (
                StatusCode::UNAUTHORIZED,
                ErrorBody {
                    query_id,
                    ..api(r.kind, r.message)
                },
            ),
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, api(ApiCode::BadRequest, m)),
            ApiError::BadEpsilon(e, query_id) => (
                StatusCode::BAD_REQUEST,
                ErrorBody {
                    query_id,
                    ..api(ApiCode::BadEpsilon, e.to_string())
                },
            ),
            ApiError::NotFound => (
                StatusCode::NOT_FOUND,
                api(ApiCode::NotFound, "no such endpoint".into()),
            ),
            ApiError::TooLarge(limit) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                api(
                    ApiCode::BodyTooLarge,
                    format!(
                        "the request body is over this node's limit of {limit} bytes ({} MiB)",
                        limit / (1024 * 1024)
                    ),
                ),
            ),
            ApiError::NodesFailed(query_id, nodes) => {
                let failed: Vec<String> = nodes
                    .iter()
                    .filter(|n| n.error.is_some())
                    .map(|n| format!("{}: {}", n.agency, n.error.as_deref().unwrap_or("")))
                    .collect();
                (
                    StatusCode::BAD_GATEWAY,
                    ErrorBody {
                        query_id: Some(query_id),
                        nodes,
                        ..api(
                            ApiCode::NodesFailed,
                            format!(
                                "not every node answered ({}); pass --allow-partial to accept a partial federation answer",
                                failed.join("; ")
                            ),
                        )
                    },
                )
            }
            ApiError::Internal(m) => {
                tracing::error!(error = %m, "internal error");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    api(
                        ApiCode::Internal,
                        "internal error; see the node's log".into(),
                    ),
                )
            }
        };
        (status, axum::Json(body)).into_response()
    }
}

impl From<PartialError> for ApiError {
    fn from(e: PartialError) -> Self {
        match e {
            PartialError::Query(q) => ApiError::from(q),
            PartialError::Policy(p) => ApiError::Policy(p, None),
            PartialError::Epsilon(e) => ApiError::BadEpsilon(e, None),
        }
    }
}

impl From<crate::coordinator::CoordinatorError> for ApiError {
    fn from(e: crate::coordinator::CoordinatorError) -> Self {
        use crate::coordinator::CoordinatorError as C;
        match e {
            C::Refused(p) => ApiError::from(p),
            C::NodesFailed(query_id, nodes) => ApiError::NodesFailed(query_id, nodes),
            C::Internal(m) => ApiError::Internal(m),
        }
    }
}

impl From<PolicyRefusal> for ApiError {
    fn from(p: PolicyRefusal) -> Self {
        ApiError::Policy(p, None)
    }
}

impl From<QueryError> for ApiError {
    fn from(e: QueryError) -> Self {
        match e {
            QueryError::Rejected(r) => ApiError::Rejected(r, None),
            QueryError::Internal(m) => ApiError::Internal(m),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

/// A new random query id (128 bits, hex).
pub fn new_query_id() -> String {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut b = [0u8; 16];
    if SystemRandom::new().fill(&mut b).is_err() {
        // The OS RNG failing is fatal for keys, but a query id only needs uniqueness.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        b[..16].copy_from_slice(&t.as_nanos().to_le_bytes());
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Node {
    /// The verified identity of the TLS peer, if it is allowed `roles` here. Refusals are
    /// logged and audited.
    async fn authorize(
        &self,
        tls: &TlsInfo,
        endpoint: &'static str,
        roles: &[Role],
    ) -> Result<Identity, ApiError> {
        let id = match crate::tls::peer_identity(&tls.peer_certificates) {
            Ok(id) => id,
            Err(e) => {
                let peer = peer_label(&tls.peer_certificates);
                warn!(%peer, endpoint, reason = %e, "refused caller without a usable identity");
                self.record(Record {
                    endpoint: endpoint.into(),
                    peer,
                    decision: Some(Decision::Refused),
                    code: Some(ApiCode::Forbidden.code().into()),
                    ..Record::default()
                })
                .await?;
                return Err(ApiError::Forbidden(format!(
                    "client certificate has no usable identity: {e}"
                )));
            }
        };
        let refusal = if id.federation() != self.config.federation {
            Some(format!(
                "{id} is not of federation {}",
                self.config.federation
            ))
        } else if !roles.contains(&id.role()) {
            let allowed: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
            Some(format!(
                "role {} may not call {endpoint} (allowed: {})",
                id.role().as_str(),
                allowed.join(", ")
            ))
        } else if id.role() == Role::Node
            && id.agency() != self.config.agency
            && !self.config.peers.iter().any(|p| p.agency == id.agency())
        {
            Some(format!("node {} is not a configured peer", id.agency()))
        } else {
            None
        };
        match refusal {
            None => Ok(id),
            Some(reason) => {
                warn!(peer = %id, endpoint, %reason, "refused caller");
                self.record(Record {
                    endpoint: endpoint.into(),
                    peer: id.to_string(),
                    decision: Some(Decision::Refused),
                    code: Some(ApiCode::Forbidden.code().into()),
                    ..Record::default()
                })
                .await?;
                Err(ApiError::Forbidden(reason))
            }
        }
    }

    /// Logs that `who` read `endpoint` (reads that touch no data: schema, explain, budget).
    async fn record_access(
        &self,
        endpoint: &'static str,
        who: &Identity,
        sql: Option<String>,
    ) -> Result<(), ApiError> {
        self.record(Record {
            endpoint: endpoint.into(),
            peer: who.to_string(),
            sql,
            decision: Some(Decision::Executed),
            ..Record::default()
        })
        .await
    }

    /// Refuses a request this node cannot read (body, parameters, protocol version) after its
    /// caller was authorized, and logs the refusal (the message itself may quote the input, so
    /// it goes only to the caller).
    async fn bad_request(
        &self,
        endpoint: &'static str,
        who: &Identity,
        query_id: &str,
        message: String,
    ) -> ApiError {
        warn!(peer = %who, endpoint, query_id, "refused malformed request");
        let logged = self
            .record(Record {
                query_id: query_id.to_string(),
                endpoint: endpoint.into(),
                peer: who.to_string(),
                decision: Some(Decision::Refused),
                code: Some(ApiCode::BadRequest.code().into()),
                ..Record::default()
            })
            .await;
        match logged {
            Ok(()) => ApiError::BadRequest(message),
            Err(e) => e,
        }
    }

    /// Parses a JSON body; a malformed one is refused and logged ([`Node::bad_request`]).
    async fn parse_body<T: serde::de::DeserializeOwned>(
        &self,
        body: &[u8],
        endpoint: &'static str,
        who: &Identity,
        query_id: &str,
    ) -> Result<T, ApiError> {
        match serde_json::from_slice(body) {
            Ok(v) => Ok(v),
            Err(e) => Err(self
                .bad_request(endpoint, who, query_id, format!("request body: {e}"))
                .await),
        }
    }

    /// Appends to the audit log; a log that cannot be written stops the answer.
    pub async fn record(&self, record: Record) -> Result<(), ApiError> {
        self.audit
            .append(record)
            .await
            .map(|_| ())
            .map_err(|e| ApiError::Internal(format!("audit log: {e}")))
    }

    /// Checks an analyst's signature a coordinator (`peer`, a node) forwarded: signed for the
    /// analyst the coordinator names, and for this coordinator, the TLS peer.
    pub async fn check_forwarded(
        &self,
        endpoint: &'static str,
        peer: &Identity,
        query_id: &str,
        analyst: &str,
        received: Received<'_>,
    ) -> Result<Identity, ApiError> {
        let expected = Expected {
            analyst,
            coordinator: peer.agency(),
        };
        self.check_signature(endpoint, &peer.to_string(), query_id, expected, received)
            .await
    }

    /// Checks an analyst's signature on a request as this node received it, for the analyst
    /// and coordinator this node knows it must be from; a refusal is logged and audited with
    /// what was claimed.
    pub async fn check_signature(
        &self,
        endpoint: &'static str,
        peer: &str,
        query_id: &str,
        expected: Expected<'_>,
        req: Received<'_>,
    ) -> Result<Identity, ApiError> {
        let claimed_analyst = expected.analyst;
        let checked = self.requests.check(req, expected);
        match checked {
            Ok(id) => Ok(id),
            Err(refusal) => {
                warn!(query_id, peer, kind = refusal.kind.slug(), reason = %refusal.message, "refused request signature");
                self.record(Record {
                    query_id: query_id.to_string(),
                    endpoint: endpoint.into(),
                    peer: peer.to_string(),
                    analyst: claimed_analyst.to_string(),
                    sql: Some(req.sql.to_string()),
                    requested_epsilon: req.epsilon,
                    require_all: Some(req.require_all),
                    request: req.signature.cloned(),
                    received_at: req.signature.map(|_| req.received_at),
                    decision: Some(Decision::Refused),
                    code: Some(SignatureRefusal::CODE.into()),
                    ..Record::default()
                })
                .await?;
                Err(ApiError::Unsigned(refusal, Some(query_id.to_string())))
            }
        }
    }
}

async fn query(
    State(node): State<Arc<Node>>,
    Extension(tls): Extension<Arc<TlsInfo>>,
    LimitedBody(body): LimitedBody,
) -> Result<Response, ApiError> {
    let received_at = cxfed_protocol::signing::unix_now();
    let peer = node.authorize(&tls, "/v1/query", &[Role::Analyst]).await?;
    let query_id = new_query_id();
    let span = tracing::info_span!("query", query_id = %query_id, analyst = %peer);
    async move {
        let req: QueryRequest = node
            .parse_body(&body, "/v1/query", &peer, &query_id)
            .await?;
        let received = Received {
            signature: req.signature.as_ref(),
            sql: &req.sql,
            epsilon: req.epsilon,
            require_all: req.require_all,
            received_at,
        };
        // The analyst on the TLS connection must be the one who signed, for this node.
        let analyst = peer.to_string();
        let expected = Expected {
            analyst: &analyst,
            coordinator: &node.config.agency,
        };
        node.check_signature("/v1/query", &analyst, &query_id, expected, received)
            .await?;
        let mut fanout = Vec::new();
        let result =
            crate::coordinator::query(&node, &peer, &query_id, &req, received_at, &mut fanout)
                .await
                .map_err(ApiError::from);
        let (decision, code) = match &result {
            Ok(_) => (Decision::Executed, None),
            Err(ApiError::Rejected(r, _)) => (Decision::Refused, Some(r.rule.code().to_string())),
            Err(ApiError::Policy(p, _)) => (Decision::Refused, Some(p.code().to_string())),
            Err(ApiError::NodesFailed(..)) => (
                Decision::Failed,
                Some(ApiCode::NodesFailed.code().to_string()),
            ),
            Err(ApiError::BadEpsilon(..)) => (
                Decision::Refused,
                Some(ApiCode::BadEpsilon.code().to_string()),
            ),
            Err(_) => (Decision::Failed, Some(ApiCode::Internal.code().to_string())),
        };
        let answer = match &result {
            Ok(resp) => {
                Some(serde_json::to_vec(resp).map_err(|e| ApiError::Internal(e.to_string()))?)
            }
            Err(_) => None,
        };
        node.record(Record {
            query_id: query_id.clone(),
            endpoint: "/v1/query".into(),
            peer: peer.to_string(),
            analyst: peer.to_string(),
            sql: Some(req.sql.clone()),
            requested_epsilon: req.epsilon,
            require_all: Some(req.require_all),
            request: req.signature.clone(),
            received_at: Some(received_at),
            decision: Some(decision),
            code: code.clone(),
            groups_released: result.as_ref().map(|r| r.rows.len() as u64).unwrap_or(0),
            groups_withheld: result.as_ref().map(|r| r.suppressed_groups).unwrap_or(0),
            epsilon_spent: None,
            digest: answer.as_deref().map(crate::audit::digest),
            fanout,
        })
        .await?;
        info!(decision = ?decision, code = ?code, "query answered");
        result.map_err(|e| e.for_query(&query_id))?;
        let mut response = (
            [(header::CONTENT_TYPE, "application/json")],
            answer.unwrap_or_default(),
        )
            .into_response();
        if let Ok(v) = HeaderValue::from_str(&query_id) {
            response.headers_mut().insert(HEADER_QUERY_ID, v);
        }
        Ok(response)
    }
    .instrument(span)
    .await
}

async fn partial(
    State(node): State<Arc<Node>>,
    Extension(tls): Extension<Arc<TlsInfo>>,
    LimitedBody(body): LimitedBody,
) -> Result<Response, ApiError> {
    let received_at = cxfed_protocol::signing::unix_now();
    let peer = node.authorize(&tls, "/v1/partial", &[Role::Node]).await?;
    let req: PartialRequest = node.parse_body(&body, "/v1/partial", &peer, "").await?;
    if req.protocol != PROTOCOL_VERSION {
        let message = format!(
            "protocol {} is not spoken here (this node speaks {PROTOCOL_VERSION})",
            req.protocol
        );
        return Err(node
            .bad_request("/v1/partial", &peer, &req.query_id, message)
            .await);
    }
    let span = tracing::info_span!("partial", query_id = %req.query_id, peer = %peer);
    let received = Received {
        signature: req.signature.as_ref(),
        sql: &req.sql,
        epsilon: req.epsilon,
        require_all: req.require_all,
        received_at,
    };
    async {
        let analyst = node
            .check_forwarded("/v1/partial", &peer, &req.query_id, &req.analyst, received)
            .await?;
        node.answer_partial(
            &peer.to_string(),
            &analyst,
            &req.query_id,
            received,
            None,
            req.secagg.as_ref(),
        )
        .await
        .map_err(|e| ApiError::from(e).for_query(&req.query_id))
    }
    .instrument(span)
    .await
    .map(|out| ([(header::CONTENT_TYPE, ARROW_STREAM)], out.ipc).into_response())
}

/// One step of a journey query (role node; see [`crate::journey`]): the analyst's signed
/// request is checked at the first step this node sees.
async fn journey(
    State(node): State<Arc<Node>>,
    Extension(tls): Extension<Arc<TlsInfo>>,
    LimitedBody(body): LimitedBody,
) -> Result<Response, ApiError> {
    let received_at = cxfed_protocol::signing::unix_now();
    let endpoint = crate::journey::ENDPOINT;
    let peer = node.authorize(&tls, endpoint, &[Role::Node]).await?;
    let req: cxfed_protocol::wire::JourneyRequest =
        node.parse_body(&body, endpoint, &peer, "").await?;
    let span = tracing::info_span!("journey", query_id = %req.query_id, peer = %peer);
    async {
        let analyst = match req.step {
            cxfed_protocol::wire::JourneyStep::Sums { .. } => None,
            _ => {
                let received = Received {
                    signature: req.signature.as_ref(),
                    sql: &req.sql,
                    epsilon: req.epsilon,
                    require_all: req.require_all,
                    received_at,
                };
                Some(
                    node.check_forwarded(endpoint, &peer, &req.query_id, &req.analyst, received)
                        .await?,
                )
            }
        };
        node.answer_journey(&peer.to_string(), analyst.as_ref(), &req, received_at)
            .await
            .map_err(|e| ApiError::from(e).for_query(&req.query_id))
    }
    .instrument(span)
    .await
    .map(|bytes| ([(header::CONTENT_TYPE, "application/json")], bytes).into_response())
}

/// Round 1 of secure aggregation (role node): this node's one-time key for a query.
async fn secagg_key(
    State(node): State<Arc<Node>>,
    Extension(tls): Extension<Arc<TlsInfo>>,
    LimitedBody(body): LimitedBody,
) -> Result<Response, ApiError> {
    let peer = node
        .authorize(&tls, "/v1/secagg/key", &[Role::Node])
        .await?;
    let req: cxfed_protocol::wire::SecAggKeyRequest =
        node.parse_body(&body, "/v1/secagg/key", &peer, "").await?;
    if req.protocol != PROTOCOL_VERSION {
        let message = format!(
            "protocol {} is not spoken here (this node speaks {PROTOCOL_VERSION})",
            req.protocol
        );
        return Err(node
            .bad_request("/v1/secagg/key", &peer, &req.query_id, message)
            .await);
    }
    let query_id = req.query_id.clone();
    node.secagg_key(&peer.to_string(), &req)
        .await
        .map(|key| axum::Json(key).into_response())
        .map_err(|e| ApiError::from(e).for_query(&query_id))
}

async fn explain(
    State(node): State<Arc<Node>>,
    Extension(tls): Extension<Arc<TlsInfo>>,
    LimitedBody(body): LimitedBody,
) -> Result<Response, ApiError> {
    let who = node
        .authorize(&tls, "/v1/explain", &[Role::Analyst, Role::Steward])
        .await?;
    let req: QueryRequest = node.parse_body(&body, "/v1/explain", &who, "").await?;
    // An analyst's explain is held to the same admission as a query: an agency the steward
    // does not allow cannot probe this node's k and hidden dimensions, nor flood it.
    if who.role() == Role::Analyst
        && let Err(refusal) = node.admit(&who.to_string(), "explain")
    {
        node.record(Record {
            endpoint: "/v1/explain".into(),
            peer: who.to_string(),
            analyst: who.to_string(),
            sql: Some(req.sql.clone()),
            decision: Some(Decision::Refused),
            code: Some(refusal.code().into()),
            ..Record::default()
        })
        .await?;
        return Err(refusal.into());
    }
    node.record_access("/v1/explain", &who, Some(req.sql.clone()))
        .await?;
    let policy = node.policy();
    let params = policy.dp.as_ref().map(|d| d.params(policy.k, None));
    let dp = policy.dp.as_ref().zip(params.as_ref()).map(|(d, params)| {
        cxfed_queries::explain::DpContext {
            params,
            public_keys: &d.public_keys,
            max_groups: policy.max_groups,
            secure_aggregation: d.secure_aggregation && !node.config.peers.is_empty(),
        }
    });
    let mut explanation =
        cxfed_queries::explain::explain_with(&node.ctx.state(), &req.sql, policy.k, policy.k, dp)
            .await?;
    if matches!(
        explanation,
        cxfed_queries::explain::Explanation::Accepted { .. }
    ) && let Ok(approved) = cxfed_queries::validate::approve(&node.ctx.state(), &req.sql).await
        && let Err(p) = policy
            .check_query(&approved)
            .and_then(|()| match &policy.dp {
                Some(d) => approved
                    .group_keys_under(&d.public_keys, policy.max_groups)
                    .map(|_| ())
                    .map_err(|e| crate::policy::PolicyRefusal::groups(e.to_string())),
                None => Ok(()),
            })
    {
        explanation = cxfed_queries::explain::Explanation::Refused {
            code: p.code().into(),
            rule: p.slug().into(),
            reason: p.reason,
            line: None,
            column: None,
        };
    }
    Ok(axum::Json(explanation).into_response())
}

async fn budget(
    State(node): State<Arc<Node>>,
    Extension(tls): Extension<Arc<TlsInfo>>,
) -> Result<Response, ApiError> {
    let who = node.authorize(&tls, "/v1/budget", &[Role::Steward]).await?;
    node.record_access("/v1/budget", &who, None).await?;
    let policy = node.policy();
    let (mode, eps, budget, period, analysts) = match &policy.dp {
        None => ("k-only", None, None, None, vec![]),
        Some(d) => (
            "dp",
            Some(d.epsilon_per_query),
            Some(d.budget_epsilon),
            Some(d.budget_period.as_secs() / 86_400),
            node.ledger
                .usage(d.budget_epsilon, d.budget_period)
                .await
                .into_iter()
                .map(|u| cxfed_protocol::wire::BudgetUse {
                    analyst: u.analyst,
                    used: u.used,
                    remaining: u.remaining,
                    queries: u.queries,
                })
                .collect(),
        ),
    };
    Ok(axum::Json(cxfed_protocol::wire::BudgetResponse {
        agency: node.config.agency.clone(),
        mode: mode.into(),
        epsilon_per_query: eps,
        budget_epsilon: budget,
        period_days: period,
        analysts,
    })
    .into_response())
}

async fn policy(
    State(node): State<Arc<Node>>,
    Extension(tls): Extension<Arc<TlsInfo>>,
) -> Result<Response, ApiError> {
    let who = node.authorize(&tls, "/v1/policy", &[Role::Steward]).await?;
    node.record_access("/v1/policy", &who, None).await?;
    let p = node.policy();
    Ok(axum::Json(serde_json::json!({
        "agency": node.config.agency,
        "allowed_agencies": p.allowed_agencies,
        "hidden_dimensions": p.hidden_dimensions,
        "k": p.k,
        "max_groups": p.max_groups,
        "rate_limit_per_minute": p.rate_limit_per_minute,
        "max_in_flight_per_analyst": p.max_in_flight_per_analyst,
        "query_timeout_secs": p.query_timeout.as_secs_f64(),
        "memory_limit_mb": p.memory_limit_bytes / (1024 * 1024),
        "privacy": match &p.dp {
            None => serde_json::json!({"mode": "k-only"}),
            Some(d) => serde_json::json!({
                "mode": "dp",
                "epsilon_per_query": d.epsilon_per_query,
                "delta": d.delta,
                "budget_epsilon": d.budget_epsilon,
                "budget_period_days": d.budget_period.as_secs() / 86_400,
                "max_groups_per_person": d.max_groups_per_person,
                "max_rows_per_person": d.max_rows_per_person,
            }),
        },
    }))
    .into_response())
}

#[derive(Debug, Deserialize)]
struct ActivityParams {
    #[serde(default = "default_activity")]
    limit: usize,
}

fn default_activity() -> usize {
    50
}

/// A steward's view of what this node was asked: the newest query and partial requests, with
/// their decisions (the full, verifiable log is the auditor's `/v1/audit`).
async fn activity(
    State(node): State<Arc<Node>>,
    Extension(tls): Extension<Arc<TlsInfo>>,
    params: Result<Query<ActivityParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let who = node
        .authorize(&tls, "/v1/activity", &[Role::Steward])
        .await?;
    let Query(params) = match params {
        Ok(p) => p,
        Err(e) => {
            return Err(node
                .bad_request("/v1/activity", &who, "", format!("limit: {e}"))
                .await);
        }
    };
    node.record_access("/v1/activity", &who, None).await?;
    let entries = node
        .audit
        .recent_requests(params.limit.min(1000))
        .await
        .map_err(|e| ApiError::Internal(format!("audit log: {e}")))?;
    let rows: Vec<serde_json::Value> = entries
        .into_iter()
        .map(|e| {
            serde_json::json!({
                "seq": e.seq, "time": e.time, "query_id": e.query_id, "endpoint": e.endpoint,
                "analyst": e.analyst, "peer": e.peer, "sql": e.sql, "decision": e.decision,
                "code": e.code, "groups_released": e.groups_released,
                "groups_withheld": e.groups_withheld, "epsilon_spent": e.epsilon_spent,
            })
        })
        .collect();
    Ok(axum::Json(rows).into_response())
}

async fn health(
    State(node): State<Arc<Node>>,
    Extension(tls): Extension<Arc<TlsInfo>>,
) -> Result<Response, ApiError> {
    node.authorize(
        &tls,
        "/v1/health",
        &[Role::Node, Role::Analyst, Role::Steward, Role::Auditor],
    )
    .await?;
    Ok(axum::Json(Health {
        status: "ok".into(),
        agency: node.config.agency.clone(),
        federation: node.config.federation.clone(),
        protocol: PROTOCOL_VERSION,
        version: env!("CARGO_PKG_VERSION").into(),
    })
    .into_response())
}

async fn schema(
    State(node): State<Arc<Node>>,
    Extension(tls): Extension<Arc<TlsInfo>>,
) -> Result<Response, ApiError> {
    let who = node
        .authorize(
            &tls,
            "/v1/schema",
            &[Role::Node, Role::Analyst, Role::Steward, Role::Auditor],
        )
        .await?;
    node.record_access("/v1/schema", &who, None).await?;
    // Exact row counts and ingest times are not differentially private: for this node's
    // steward only.
    let steward = who.role() == Role::Steward && who.agency() == node.config.agency;
    let mut tables = Vec::new();
    for t in Table::ALL {
        let rows = if steward {
            Some(
                crate::engine::row_count(&node.ctx, t)
                    .await
                    .map_err(|e| ApiError::Internal(e.to_string()))?,
            )
        } else {
            None
        };
        let columns = t
            .columns()
            .iter()
            .map(|c| SchemaColumn {
                name: c.name.into(),
                ty: c.ty.data_type().to_string(),
                kind: match c.kind {
                    Kind::Identifier => "identifier",
                    Kind::Dimension => "dimension",
                    Kind::Date => "date",
                    Kind::Measure => "measure",
                }
                .into(),
                required: c.required,
                domain: match c.domain {
                    Domain::Vocabulary(v) => Some(v.join(", ")),
                    Domain::Range(lo, hi) => Some(format!("{lo}..={hi}")),
                    Domain::Agency => Some("agency abbreviation".into()),
                    Domain::FreeText | Domain::Any => None,
                },
                dp_bounds: (c.kind == Kind::Measure)
                    .then(|| cxfed_queries::schema::dp_bounds(c.name))
                    .flatten()
                    .map(|(lo, hi)| [lo, hi]),
            })
            .collect();
        tables.push(SchemaTable {
            name: t.name().into(),
            rows,
            last_ingest: if steward {
                crate::storage::last_ingest(&node.config.data_dir, t)
            } else {
                None
            },
            columns,
        });
    }
    Ok(axum::Json(SchemaResponse {
        version: cxfed_queries::schema::SCHEMA_VERSION,
        tables,
    })
    .into_response())
}

#[derive(Debug, Deserialize)]
struct AuditParams {
    #[serde(default)]
    since: u64,
}

async fn audit(
    State(node): State<Arc<Node>>,
    Extension(tls): Extension<Arc<TlsInfo>>,
    params: Result<Query<AuditParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let auditor = node.authorize(&tls, "/v1/audit", &[Role::Auditor]).await?;
    let Query(params) = match params {
        Ok(p) => p,
        Err(e) => {
            return Err(node
                .bad_request("/v1/audit", &auditor, "", format!("since: {e}"))
                .await);
        }
    };
    node.record(Record {
        endpoint: "/v1/audit".into(),
        peer: auditor.to_string(),
        decision: Some(Decision::Executed),
        ..Record::default()
    })
    .await?;
    let lines = node
        .audit
        .export_since(params.since)
        .await
        .map_err(|e| ApiError::Internal(format!("audit log: {e}")))?;
    Ok(([(header::CONTENT_TYPE, AUDIT_MEDIA_TYPE)], lines).into_response())
}

/// Media type of `GET /v1/audit`: the log's lines exactly as on disk.
pub const AUDIT_MEDIA_TYPE: &str = "application/x-ndjson";

/// The largest request body a node reads (`/v1/query`, `/v1/partial`, `/v1/explain`), in bytes.
pub const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;
/// The largest journey step a node reads from another node (`/v1/journey`), in bytes: A's
/// values message is about 553 bytes per person for a value side without groups (one point and
/// three ciphertexts, hex in JSON; `bench/journey.py`), so 1 GiB carries about 1.9M people a
/// side (1M × 1M measured: 553 MB, over the 512 MiB this was before).
pub const MAX_JOURNEY_BODY_BYTES: usize = 1024 * 1024 * 1024;
/// The code of a request refused because its body is over [`MAX_BODY_BYTES`] (HTTP 413).
pub const BODY_TOO_LARGE: &str = ApiCode::BodyTooLarge.code();
/// How much of an oversized body is still read, and thrown away, so that a client that is
/// still sending reads the 413 rather than a reset connection. A body longer than this (or
/// slower than [`DRAIN_TIMEOUT`]) gets the 413 and then the connection is closed under it.
const MAX_DRAIN_BYTES: u64 = 64 * 1024 * 1024;
/// How long an oversized body is drained at most.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// A request body of at most [`MAX_BODY_BYTES`]. A longer one is refused with
/// [`BODY_TOO_LARGE`] and audited with the caller's identity, before the handler (and so
/// before the caller's role is checked): nothing of the body is kept or logged.
pub struct LimitedBody(pub Bytes);

impl axum::extract::FromRequest<Arc<Node>> for LimitedBody {
    type Rejection = ApiError;

    async fn from_request(
        req: axum::extract::Request,
        node: &Arc<Node>,
    ) -> Result<Self, Self::Rejection> {
        use futures::StreamExt as _;
        let (parts, body) = req.into_parts();
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        // A journey step between nodes carries one record per person (about 1.3 kB each):
        // only a node's certificate gets the larger limit.
        let from_node = parts
            .extensions
            .get::<Arc<TlsInfo>>()
            .and_then(|t| crate::tls::peer_identity(&t.peer_certificates).ok())
            .is_some_and(|id| id.role() == Role::Node);
        let limit = if from_node && parts.uri.path() == crate::journey::ENDPOINT {
            MAX_JOURNEY_BODY_BYTES
        } else {
            MAX_BODY_BYTES
        };
        let mut stream = body.into_data_stream();
        let mut buf = Vec::new();
        let mut failed = None;
        let mut over = declared.is_some_and(|n| n > limit as u64);
        while !over {
            match stream.next().await {
                None => break,
                Some(Ok(chunk)) if buf.len() + chunk.len() <= limit => {
                    buf.extend_from_slice(&chunk)
                }
                Some(Ok(_)) => over = true,
                Some(Err(e)) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        if over && declared.is_none_or(|n| n <= MAX_DRAIN_BYTES) {
            drop(buf);
            let drain = async {
                let mut drained = 0u64;
                while let Some(Ok(chunk)) = stream.next().await {
                    drained += chunk.len() as u64;
                    if drained > MAX_DRAIN_BYTES {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, drain).await;
        } else if !over && failed.is_none() {
            return Ok(LimitedBody(Bytes::from(buf)));
        }
        let peer = match parts.extensions.get::<Arc<TlsInfo>>() {
            Some(t) => match crate::tls::peer_identity(&t.peer_certificates) {
                Ok(id) => id.to_string(),
                Err(_) => peer_label(&t.peer_certificates),
            },
            None => String::new(),
        };
        let endpoint = parts.uri.path().to_string();
        let (code, refusal) = match failed {
            Some(e) if !over => {
                warn!(%peer, endpoint, error = %e, "request body could not be read");
                (
                    ApiCode::BadRequest.code(),
                    ApiError::BadRequest(format!("request body: {e}")),
                )
            }
            _ => {
                warn!(%peer, endpoint, declared, limit = MAX_BODY_BYTES, "refused oversized request body");
                (BODY_TOO_LARGE, ApiError::TooLarge(limit))
            }
        };
        let logged = node
            .record(Record {
                endpoint: endpoint.into(),
                peer,
                decision: Some(Decision::Refused),
                code: Some(code.into()),
                ..Record::default()
            })
            .await;
        Err(match logged {
            Ok(()) => refusal,
            Err(e) => e,
        })
    }
}

/// The longest request path a 404 line keeps.
const MAX_LOGGED_PATH: usize = 200;

/// No such endpoint (or not with this method): 404, logged with the caller's identity. Every
/// connection got here through the mutual-TLS handshake, so the caller holds a federation
/// certificate; handshake refusals never reach the audit log (see the README).
async fn not_found(
    State(node): State<Arc<Node>>,
    tls: Option<Extension<Arc<TlsInfo>>>,
    uri: axum::http::Uri,
) -> ApiError {
    let peer = tls
        .map(
            |Extension(t)| match crate::tls::peer_identity(&t.peer_certificates) {
                Ok(id) => id.to_string(),
                Err(_) => peer_label(&t.peer_certificates),
            },
        )
        .unwrap_or_default();
    let mut path = uri.path().to_string();
    if path.len() > MAX_LOGGED_PATH {
        let mut cut = MAX_LOGGED_PATH;
        while !path.is_char_boundary(cut) {
            cut -= 1;
        }
        path.truncate(cut);
        path.push('…');
    }
    warn!(%peer, path, "no such endpoint");
    let logged = node
        .record(Record {
            endpoint: path.into(),
            peer,
            decision: Some(Decision::Refused),
            code: Some(ApiCode::NotFound.code().into()),
            ..Record::default()
        })
        .await;
    match logged {
        Ok(()) => ApiError::NotFound,
        Err(e) => e,
    }
}

/// How the log names a verified certificate that carries no usable identity: by fingerprint.
fn peer_label(peer_certificates: &[Vec<u8>]) -> String {
    match peer_certificates.first() {
        Some(leaf) => format!(
            "certificate without a usable identity, sha256:{}",
            crate::audit::digest(leaf)
        ),
        None => "no client certificate".into(),
    }
}
