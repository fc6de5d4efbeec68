//! Coordinating a federated query: validate it here first, send the analyst's SQL to every
//! node (this one in-process, peers over mTLS), collect their partials, merge, apply the
//! federation k, and report per-node status.

use std::time::Instant;

use futures::future::join_all;
use tracing::{info, warn};

use cxfed_protocol::Identity;
use cxfed_protocol::wire::{
    ARROW_STREAM, ErrorBody, NodeState, NodeStatus, PROTOCOL_VERSION, PartialRequest, QueryRequest,
    QueryResponse,
};
use cxfed_queries::dp::Z95;
use cxfed_queries::rewrite::Partial;
use cxfed_queries::validate::QueryError;

use crate::audit::Fanout;
use crate::config::Peer;
use crate::node::Node;
use crate::partial::{DecodedPartial, PartialError, decode};
use crate::requests::Received;

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
    let remote = node.config.peers.iter().map(|p| async {
        (
            p.agency.clone(),
            ask_peer(node, p, query_id, &analyst_uri, req).await,
        )
    });
    let (local, remote) = futures::join!(local, join_all(remote));

    let mut statuses = Vec::new();
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
        ci95: if merged.dp { merged.ci95 } else { vec![] },
    })
}

/// Sends the analyst's signed request to one peer and decodes its partial; also returns the
/// SHA-256 of the bytes received.
async fn ask_peer(
    node: &Node,
    peer: &Peer,
    query_id: &str,
    analyst: &str,
    req: &QueryRequest,
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
    };
    // The client in force now: after a certificate rotation, new connections present the new
    // certificate; a request already sent keeps the connection it was sent on.
    let client = node.tls.peer(&peer.agency).ok_or_else(|| {
        (
            NodeState::Error,
            format!("no client for peer {}", peer.agency),
        )
    })?;
    let resp = client
        .post(&url)
        .json(&body)
        .send()
        .await
        .map_err(|e| (NodeState::Unreachable, describe_reqwest(&e)))?;
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
    let message = match serde_json::from_slice::<ErrorBody>(&bytes) {
        Ok(b) => format!("{} {}: {}", b.code, b.kind, b.message),
        Err(_) => format!("HTTP {status}"),
    };
    Err((state, message))
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
