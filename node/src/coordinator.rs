//! Coordinating a federated query: validate it here first, send the analyst's SQL to every
//! node (this one in-process, peers over mTLS), collect their partials, merge, apply the
//! federation k, and report per-node status.

use std::time::Instant;

use futures::future::join_all;
use tracing::{info, warn};

use cxfed_protocol::Identity;
use cxfed_protocol::wire::{
    ARROW_STREAM, ErrorBody, NodeState, NodeStatus, PROTOCOL_VERSION, PartialRequest, QueryRequest,
    QueryResponse, SecAggKey, SecAggKeyRequest, SecAggRound,
};
use cxfed_queries::dp::Z95;
use cxfed_queries::partial::Partial;
use cxfed_queries::rules::QueryError;

use crate::audit::Fanout;
use crate::config::Peer;
use crate::node::Node;
use crate::partial::{DecodedPartial, PartialError, decode};
use crate::requests::Received;

mod journey;

/// Why a federated query has no answer.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// Refused or failed here before fan-out (policy, rules, ε), or refused by every node
    /// (this node's own reason, with its code).
    #[error(transparent)]
    Refused(#[from] PartialError),
    /// Some nodes failed and the analyst required all (or none answered).
    #[error("not every node answered query {0}")]
    NodesFailed(String, Vec<NodeStatus>),
    /// Merging failed: a bug; details are logged, not returned.
    #[error("{0}")]
    Internal(String),
}

impl From<QueryError> for CoordinatorError {
    fn from(e: QueryError) -> Self {
        CoordinatorError::Refused(PartialError::Query(e))
    }
}

impl From<crate::policy::PolicyRefusal> for CoordinatorError {
    fn from(e: crate::policy::PolicyRefusal) -> Self {
        CoordinatorError::Refused(PartialError::Policy(e))
    }
}

/// Largest partial a peer may send, in bytes.
pub const MAX_PARTIAL_BYTES: usize = 256 * 1024 * 1024;

/// Answers an analyst's query (its signature already checked here, at `received_at`) across the
/// federation, forwarding the signature to every peer. `fanout` receives every node asked, what
/// it did and the digest of the partial it returned, for the audit log, whether or not the query
/// succeeds.
pub async fn query(
    node: &Node,
    analyst: &Identity,
    query_id: &str,
    req: &QueryRequest,
    received_at: i64,
    fanout: &mut Vec<Fanout>,
) -> Result<QueryResponse, CoordinatorError> {
    let started = Instant::now();
    // The same people at two agencies: a protocol of its own between those two nodes.
    if cxfed_queries::journey::is_journey(&req.sql) {
        return journey::run(node, analyst, query_id, req, received_at, fanout).await;
    }
    // An ε no node can spend is refused before anything is read, charged or sent; every node
    // checks again anyway.
    crate::partial::check_epsilon(&node.policy(), req.epsilon).map_err(PartialError::Epsilon)?;
    // Refuse here before bothering any peer; every node checks again anyway.
    let analyst_uri = analyst.to_string();
    node.admit(&analyst_uri, "query")?;
    let approved = node.approvals.approve(&node.ctx, &req.sql).await?;
    node.policy().check_query(&approved)?;

    // A query this node could not answer in its own mode is refused before fan-out: in DP
    // mode one it cannot bound, in k-only mode an argument the cell check cannot see through.
    let policy = node.policy();
    match &policy.dp {
        Some(dp) => drop(approved.dp_partial(&dp.params(policy.k, req.epsilon))?),
        None => drop(approved.k_partial()?),
    }

    // dp with public group keys and peers to add to: only the sum of the nodes' partials is
    // ever readable here (round 1 gathers each node's one-time key; see `crate::secagg`).
    let secure = policy.dp.as_ref().is_some_and(|d| {
        d.secure_aggregation
            && !node.config.peers.is_empty()
            && matches!(
                approved.group_keys_under(&d.public_keys, policy.max_groups),
                Ok(cxfed_queries::keyset::GroupKeys::Public(_))
            )
    });
    let mut round_failures = Vec::new();
    let round = if secure {
        let (roster, failures) = gather_keys(node, query_id, req).await;
        if !failures.is_empty() && req.require_all {
            return Err(CoordinatorError::NodesFailed(
                query_id.to_string(),
                failures,
            ));
        }
        if roster.len() < 2 {
            let mut statuses = failures;
            statuses.extend(roster.iter().map(|k| NodeStatus {
                agency: k.agency.clone(),
                status: NodeState::Ok,
                ..Default::default()
            }));
            return Err(CoordinatorError::NodesFailed(
                query_id.to_string(),
                statuses,
            ));
        }
        round_failures = failures;
        Some(SecAggRound { roster })
    } else {
        None
    };
    let in_round = |agency: &str| {
        round
            .as_ref()
            .is_none_or(|r| r.roster.iter().any(|k| k.agency == agency))
    };

    let mut local_refusal = None;
    let local = async {
        let r = node
            .answer_partial(
                &format!("{} (coordinator)", node.config.agency),
                analyst,
                query_id,
                Received {
                    signature: req.signature.as_ref(),
                    sql: &req.sql,
                    epsilon: req.epsilon,
                    require_all: req.require_all,
                    received_at,
                },
                Some(&approved),
                round.as_ref(),
            )
            .await;
        let r = r.map_err(|e| {
            let shown = match &e {
                PartialError::Query(QueryError::Rejected(r)) => (NodeState::Refused, r.to_string()),
                PartialError::Policy(p) => (NodeState::Refused, p.to_string()),
                PartialError::Epsilon(e) => (NodeState::Refused, e.to_string()),
                other => (NodeState::Error, other.to_string()),
            };
            local_refusal = Some(e);
            shown
        });
        let r = r.and_then(|out| {
            let digest = crate::audit::digest(&out.ipc);
            decode(&out.ipc)
                .map(|p| (p, digest))
                .map_err(|e| (NodeState::Error, e))
        });
        (node.config.agency.clone(), r)
    };
    let remote = node
        .config
        .peers
        .iter()
        .filter(|p| in_round(&p.agency))
        .map(|p| async {
            (
                p.agency.clone(),
                ask_peer(node, p, query_id, &analyst_uri, req, round.as_ref()).await,
            )
        });
    let (local, remote) = futures::join!(local, join_all(remote));

    let mut statuses = round_failures;
    let mut partials = Vec::new();
    // For each partial, its node's index in `statuses`.
    let mut contributing: Vec<usize> = Vec::new();
    let mut node_suppressed = 0;
    let mut node_cells = 0;
    for (agency, result) in std::iter::once(local).chain(remote) {
        let digest = match &result {
            Ok((_, d)) => Some(d.clone()),
            Err(_) => None,
        };
        let result = result.map(|(p, _)| p);
        // Peers are untrusted: a partial must have exactly the shape this query implies.
        let checked = result.and_then(|p| {
            let meta = p.meta.clone().ok_or((
                NodeState::Error,
                "partial without encoding metadata".to_string(),
            ))?;
            for b in &p.batches {
                approved
                    .check_partial(&b.schema(), &meta)
                    .map_err(|e| (NodeState::Error, e))?;
            }
            Ok((p, meta))
        });
        fanout.push(Fanout {
            agency: agency.clone(),
            status: match &checked {
                Ok(_) => NodeState::Ok,
                Err((state, _)) => *state,
            },
            digest,
        });
        match checked {
            Ok((p, meta)) => {
                let groups = p.batches.iter().map(|b| b.num_rows() as u64).sum();
                node_suppressed += p.suppressed_groups;
                node_cells += p.suppressed_cells;
                statuses.push(NodeStatus {
                    agency,
                    status: NodeState::Ok,
                    error: None,
                    suppressed_groups: p.suppressed_groups,
                    suppressed_cells: p.suppressed_cells,
                    groups,
                    epsilon: meta.epsilon,
                });
                contributing.push(statuses.len() - 1);
                partials.push(Partial {
                    batches: p.batches,
                    meta,
                });
            }
            Err((state, error)) => {
                warn!(query_id, node = %agency, ?state, %error, "node did not contribute");
                statuses.push(NodeStatus {
                    agency,
                    status: state,
                    error: Some(error),
                    ..Default::default()
                });
            }
        }
    }
    // Refused everywhere (e.g. the analyst's budget is spent on every node): answer with this
    // node's own refusal and its code rather than a generic failure.
    if statuses.iter().all(|s| s.status == NodeState::Refused)
        && let Some(
            e @ (PartialError::Policy(_)
            | PartialError::Epsilon(_)
            | PartialError::Query(QueryError::Rejected(_))),
        ) = local_refusal
    {
        return Err(CoordinatorError::Refused(e));
    }
    let complete = statuses.iter().all(|s| s.status == NodeState::Ok);
    if !complete && (req.require_all || statuses.iter().all(|s| s.status != NodeState::Ok)) {
        return Err(CoordinatorError::NodesFailed(
            query_id.to_string(),
            statuses,
        ));
    }
    if let Some(round) = &round {
        // Masks cancel only over the whole roster: a member that failed aborts the run (a
        // rerun is a new query id, with new keys and new noise).
        let answered = round.roster.len() == partials.len();
        if !answered {
            warn!(
                query_id,
                "a secure-aggregation member failed; the run is aborted"
            );
            return Err(CoordinatorError::NodesFailed(
                query_id.to_string(),
                statuses,
            ));
        }
        partials = vec![add_masked(&approved, partials).map_err(|e| {
            warn!(query_id, error = %e, "masked partials do not add up");
            CoordinatorError::Internal(format!("adding the masked partials: {e}"))
        })?];
        contributing.truncate(1);
    }

    let merged = approved
        .merge_partials(&node.ctx, partials, node.policy().k)
        .await?;
    let rows = crate::output::rows(&merged.batches)
        .map_err(|e| CoordinatorError::Internal(e.to_string()))?;
    // Per row, the answering nodes that returned nothing for its group.
    let missing_parts: Vec<Vec<String>> = merged
        .contributors
        .iter()
        .map(|bits| {
            contributing
                .iter()
                .enumerate()
                .filter(|(p, _)| bits & (1u64 << p) == 0)
                .map(|(_, &s)| statuses[s].agency.clone())
                .collect()
        })
        .collect();
    let incomplete_groups = missing_parts.iter().filter(|m| !m.is_empty()).count() as u64;
    let columns: Vec<String> = merged
        .schema
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let formats = approved.column_formats();
    // Per row, the columns whose interval is wider than their whole range.
    let not_informative: Vec<Vec<String>> = if merged.dp {
        cxfed_queries::present::not_informative(&formats, &merged.ci95)
            .into_iter()
            .map(|cols| cols.into_iter().map(|c| columns[c].clone()).collect())
            .collect()
    } else {
        vec![]
    };
    let any_uninformative = not_informative.iter().any(|r: &Vec<String>| !r.is_empty());
    info!(
        query_id,
        rows = rows.len(),
        suppressed_here = merged.suppressed_groups,
        suppressed_at_nodes = node_suppressed,
        complete,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "query merged"
    );
    Ok(QueryResponse {
        query_id: query_id.to_string(),
        columns,
        rows,
        suppressed_groups: merged.suppressed_groups + node_suppressed,
        suppressed_cells: merged.suppressed_cells + node_cells,
        incomplete_cells: merged.incomplete_cells,
        incomplete_groups,
        missing_parts: if incomplete_groups > 0 {
            missing_parts
        } else {
            vec![]
        },
        formats,
        not_informative: if any_uninformative {
            not_informative
        } else {
            vec![]
        },
        nodes: statuses,
        complete,
        privacy: if merged.dp {
            "dp".into()
        } else {
            "k-only".into()
        },
        noise_sd: if merged.dp {
            merged
                .ci95
                .iter()
                .map(|row| row.iter().map(|c| c.map(|x| x / Z95)).collect())
                .collect()
        } else {
            vec![]
        },
        journey: None,
        ci95: if merged.dp { merged.ci95 } else { vec![] },
    })
}

/// Round 1 of secure aggregation: every node's signed one-time key for `query_id` (this
/// node's in-process), and the status of each node that gave none.
async fn gather_keys(
    node: &Node,
    query_id: &str,
    req: &QueryRequest,
) -> (Vec<SecAggKey>, Vec<NodeStatus>) {
    let ask = SecAggKeyRequest {
        protocol: PROTOCOL_VERSION,
        query_id: query_id.to_string(),
        sql: req.sql.clone(),
        epsilon: req.epsilon,
    };
    let me = format!("{} (coordinator)", node.config.agency);
    let local = async {
        let r = node.secagg_key(&me, &ask).await.map_err(|e| {
            let state = match &e {
                PartialError::Query(QueryError::Rejected(_))
                | PartialError::Policy(_)
                | PartialError::Epsilon(_) => NodeState::Refused,
                PartialError::Query(_) => NodeState::Error,
            };
            (state, e.to_string())
        });
        (node.config.agency.clone(), r)
    };
    let remote = node.config.peers.iter().map(|p| {
        let ask = &ask;
        async move {
            let url = format!("{}/v1/secagg/key", p.url.trim_end_matches('/'));
            let r = async {
                let resp = post(node, &p.agency, &url, ask).await?;
                let status = resp.status();
                let bytes = resp
                    .bytes()
                    .await
                    .map_err(|e| (NodeState::Unreachable, describe_reqwest(&e)))?;
                if status.is_success() {
                    serde_json::from_slice::<SecAggKey>(&bytes)
                        .map_err(|e| (NodeState::Error, format!("invalid key: {e}")))
                } else {
                    Err(error_of(status, &bytes))
                }
            }
            .await;
            (p.agency.clone(), r)
        }
    });
    let (local, remote) = futures::join!(local, join_all(remote));
    let mut keys = Vec::new();
    let mut failures = Vec::new();
    for (agency, r) in std::iter::once(local).chain(remote) {
        match r {
            // Each node checks every entry; here only that it names the node asked.
            Ok(k) if k.agency == agency => keys.push(k),
            Ok(k) => failures.push(NodeStatus {
                agency: agency.clone(),
                status: NodeState::Error,
                error: Some(format!("answered with a key for {}", k.agency)),
                ..Default::default()
            }),
            Err((status, error)) => {
                warn!(query_id, node = %agency, %error, "no secure-aggregation key");
                failures.push(NodeStatus {
                    agency,
                    status,
                    error: Some(error),
                    ..Default::default()
                });
            }
        }
    }
    (keys, failures)
}

/// The sum of the roster's masked partials, as one partial: the masks cancel; noise variances
/// add (each node's share counts `variance_factor` of one draw). Every member must have
/// calibrated alike (each node checked the others' signed calibration before masking).
fn add_masked(
    approved: &cxfed_queries::query::ApprovedQuery,
    partials: Vec<Partial>,
) -> Result<Partial, String> {
    let first = partials.first().ok_or("no partial")?;
    let mut meta = first.meta.clone();
    meta.variance_factor = 0.0;
    let mut batches = Vec::with_capacity(partials.len());
    for p in &partials {
        let mut same = p.meta.clone();
        same.variance_factor = first.meta.variance_factor;
        if same != first.meta || !p.meta.public_keys {
            return Err("members sent partials of another calibration".into());
        }
        meta.variance_factor += p.meta.variance_factor;
        match p.batches.as_slice() {
            [b] => batches.push(b.clone()),
            _ => return Err("a masked partial must be one dense batch".into()),
        }
    }
    let sum = crate::secagg::unmask(&batches, approved.group_keys().len())?;
    Ok(Partial {
        batches: vec![sum],
        meta,
    })
}

/// POSTs `body` as JSON to `url` with the mTLS client for peer `agency` in force now.
pub(crate) async fn post<T: serde::Serialize>(
    node: &Node,
    agency: &str,
    url: &str,
    body: &T,
) -> Result<reqwest::Response, (NodeState, String)> {
    post_within(node, agency, url, body, None).await
}

/// [`post`] with its own time limit instead of the client's (`[query] timeout_secs`).
pub(crate) async fn post_within<T: serde::Serialize>(
    node: &Node,
    agency: &str,
    url: &str,
    body: &T,
    timeout: Option<std::time::Duration>,
) -> Result<reqwest::Response, (NodeState, String)> {
    // The client in force now: after a certificate rotation, new connections present the new
    // certificate; a request already sent keeps the connection it was sent on.
    let client = node
        .tls
        .peer(agency)
        .ok_or_else(|| (NodeState::Error, format!("no client for peer {agency}")))?;
    let request = client.post(url).json(body);
    let request = match timeout {
        Some(t) => request.timeout(t),
        None => request,
    };
    request
        .send()
        .await
        .map_err(|e| (NodeState::Unreachable, describe_reqwest(&e)))
}

/// A peer's refusal or failure, from its status and [`ErrorBody`].
pub(crate) fn error_of(status: reqwest::StatusCode, bytes: &[u8]) -> (NodeState, String) {
    let state = if [
        reqwest::StatusCode::BAD_REQUEST,
        reqwest::StatusCode::FORBIDDEN,
        reqwest::StatusCode::TOO_MANY_REQUESTS,
    ]
    .contains(&status)
    {
        NodeState::Refused
    } else {
        NodeState::Error
    };
    let message = match serde_json::from_slice::<ErrorBody>(bytes) {
        Ok(b) => format!("{} {}: {}", b.code, b.kind, b.message),
        Err(_) => format!("HTTP {status}"),
    };
    (state, message)
}

/// Sends the analyst's signed request to one peer (with the secure-aggregation roster, when
/// there is one) and decodes its partial; also returns the SHA-256 of the bytes received.
async fn ask_peer(
    node: &Node,
    peer: &Peer,
    query_id: &str,
    analyst: &str,
    req: &QueryRequest,
    secagg: Option<&SecAggRound>,
) -> Result<(DecodedPartial, String), (NodeState, String)> {
    let url = format!("{}/v1/partial", peer.url.trim_end_matches('/'));
    let body = PartialRequest {
        protocol: PROTOCOL_VERSION,
        query_id: query_id.into(),
        sql: req.sql.clone(),
        analyst: analyst.into(),
        epsilon: req.epsilon,
        require_all: req.require_all,
        signature: req.signature.clone(),
        secagg: secagg.cloned(),
    };
    let resp = post(node, &peer.agency, &url, &body).await?;
    let status = resp.status();
    if let Some(len) = resp.content_length()
        && len as usize > MAX_PARTIAL_BYTES
    {
        return Err((
            NodeState::Error,
            format!("partial of {len} bytes is over the {MAX_PARTIAL_BYTES}-byte limit"),
        ));
    }
    let is_arrow = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == ARROW_STREAM.as_bytes());
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| (NodeState::Unreachable, describe_reqwest(&e)))?;
    if bytes.len() > MAX_PARTIAL_BYTES {
        return Err((NodeState::Error, "partial is over the size limit".into()));
    }
    if status.is_success() && is_arrow {
        let digest = crate::audit::digest(&bytes);
        return decode(&bytes)
            .map(|p| (p, digest))
            .map_err(|e| (NodeState::Error, e));
    }
    Err(error_of(status, &bytes))
}

fn describe_reqwest(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        let mut msg = "connection failed".to_string();
        let mut src: Option<&dyn std::error::Error> = std::error::Error::source(e);
        while let Some(s) = src {
            msg = format!("connection failed: {s}");
            src = s.source();
        }
        msg
    } else {
        e.to_string()
    }
}
