//! The coordinator's run of a journey query (see [`crate::journey`]): a fresh result key, the
//! three steps between the membership node B and the value node A, decryption of only the
//! released sums, and the answer.

use std::sync::OnceLock;

use cxfed_protocol::Identity;
use cxfed_protocol::psi_sum::{self, DiscreteLog, ResultKey};
use cxfed_protocol::wire::{
    JourneyRequest, JourneyStep, JourneySums, JourneyValues, NodeState, NodeStatus,
    PROTOCOL_VERSION, QueryRequest, QueryResponse,
};
use cxfed_queries::rules::QueryError;

use super::{CoordinatorError, error_of, post_within};
use crate::audit::Fanout;
use crate::journey::{ENDPOINT, answer_rows, plan_here};
use crate::node::Node;
use crate::partial::PartialError;

/// The table for decrypting sums, built once (a quarter of a second) and shared.
fn discrete_log() -> Result<&'static DiscreteLog, CoordinatorError> {
    static TABLE: OnceLock<Option<DiscreteLog>> = OnceLock::new();
    TABLE
        .get_or_init(|| DiscreteLog::new(psi_sum::DEFAULT_BOUND).ok())
        .as_ref()
        .ok_or_else(|| CoordinatorError::Internal("discrete-log table".into()))
}

/// One step at `agency` (this node in-process, a peer over mTLS): the answer's bytes.
async fn ask(
    node: &Node,
    agency: &str,
    analyst: &Identity,
    req: &JourneyRequest,
    received_at: i64,
) -> Result<Vec<u8>, (NodeState, String)> {
    if agency == node.config.agency {
        let me = format!("{} (coordinator)", node.config.agency);
        return node
            .answer_journey(&me, Some(analyst), req, received_at)
            .await
            .map_err(|e| {
                let state = match &e {
                    PartialError::Query(QueryError::Rejected(_))
                    | PartialError::Policy(_)
                    | PartialError::Epsilon(_) => NodeState::Refused,
                    PartialError::Query(_) => NodeState::Error,
                };
                (state, e.to_string())
            });
    }
    let peer = node
        .config
        .peers
        .iter()
        .find(|p| p.agency == agency)
        .ok_or_else(|| {
            (
                NodeState::Error,
                format!("{agency} is not a peer of this node"),
            )
        })?;
    let url = format!("{}{ENDPOINT}", peer.url.trim_end_matches('/'));
    // A step's curve work grows with the people on both sides (about a minute and a half for
    // A's step at 1M x 1M): it has its own limit, `[query] journey_timeout_secs`.
    let resp = post_within(node, agency, &url, req, Some(node.config.journey_timeout)).await?;
    let status = resp.status();
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| (NodeState::Unreachable, e.to_string()))?;
    if status.is_success() {
        Ok(bytes.to_vec())
    } else {
        Err(error_of(status, &bytes))
    }
}

/// Answers an analyst's journey query (its signature already checked here) by running the
/// protocol between its two agencies; `fanout` receives both nodes, what they did and the
/// digests of what they sent.
pub async fn run(
    node: &Node,
    analyst: &Identity,
    query_id: &str,
    req: &QueryRequest,
    received_at: i64,
    fanout: &mut Vec<Fanout>,
) -> Result<QueryResponse, CoordinatorError> {
    let policy = node.policy();
    crate::journey::check_epsilon(&policy, req.epsilon)?;
    node.admit(&analyst.to_string(), "query")?;
    let plan = plan_here(&node.here(), &req.sql).await?;
    let known = node.known_agencies();
    for side in [&plan.value_side, &plan.member_side] {
        if !known.contains(&side.agency.as_str()) {
            return Err(crate::journey::refused(format!(
                "{} is not a node of this federation (known: {})",
                side.agency,
                known.join(", ")
            ))
            .into());
        }
    }
    let key = ResultKey::new().map_err(|e| CoordinatorError::Internal(e.to_string()))?;
    let step = |step| JourneyRequest {
        protocol: PROTOCOL_VERSION,
        query_id: query_id.to_string(),
        sql: req.sql.clone(),
        analyst: analyst.to_string(),
        epsilon: req.epsilon,
        require_all: req.require_all,
        signature: req.signature.clone(),
        step,
    };
    let (a, b) = (
        plan.value_side.agency.clone(),
        plan.member_side.agency.clone(),
    );
    let fail = |agency: &str, (state, error): (NodeState, String), fanout: &mut Vec<Fanout>| {
        fanout.push(Fanout {
            agency: agency.to_string(),
            status: state,
            digest: None,
        });
        let statuses = [&a, &b]
            .into_iter()
            .map(|x| NodeStatus {
                agency: x.clone(),
                status: if x == agency { state } else { NodeState::Ok },
                error: (x == agency).then(|| error.clone()),
                ..Default::default()
            })
            .collect();
        CoordinatorError::NodesFailed(query_id.to_string(), statuses)
    };
    let m1 = match ask(
        node,
        &b,
        analyst,
        &step(JourneyStep::Members {
            result_key: key.public_key(),
        }),
        received_at,
    )
    .await
    {
        Ok(bytes) => serde_json::from_slice::<psi_sum::MembersMessage>(&bytes).map_err(|e| {
            fail(
                &b,
                (NodeState::Error, format!("invalid members message: {e}")),
                fanout,
            )
        })?,
        Err(e) => return Err(fail(&b, e, fanout)),
    };
    let a_bytes = match ask(
        node,
        &a,
        analyst,
        &step(JourneyStep::Values {
            result_key: key.public_key(),
            members: m1,
        }),
        received_at,
    )
    .await
    {
        Ok(bytes) => bytes,
        Err(e) => return Err(fail(&a, e, fanout)),
    };
    let values: JourneyValues = serde_json::from_slice(&a_bytes).map_err(|e| {
        fail(
            &a,
            (NodeState::Error, format!("invalid values message: {e}")),
            fanout,
        )
    })?;
    fanout.push(Fanout {
        agency: a.clone(),
        status: NodeState::Ok,
        digest: Some(crate::audit::digest(&a_bytes)),
    });
    let (a_k, a_eps) = (values.k, values.epsilon);
    let b_bytes = match ask(
        node,
        &b,
        analyst,
        &step(JourneyStep::Sums {
            values: values.values,
        }),
        received_at,
    )
    .await
    {
        Ok(bytes) => bytes,
        Err(e) => return Err(fail(&b, e, fanout)),
    };
    let sums: JourneySums = serde_json::from_slice(&b_bytes).map_err(|e| {
        fail(
            &b,
            (NodeState::Error, format!("invalid sums message: {e}")),
            fanout,
        )
    })?;
    fanout.push(Fanout {
        agency: b.clone(),
        status: NodeState::Ok,
        digest: Some(crate::audit::digest(&b_bytes)),
    });
    let released = key.decrypt(&sums.sums, discrete_log()?).map_err(|e| {
        fail(
            &b,
            (NodeState::Error, format!("the sums do not decrypt: {e}")),
            &mut Vec::new(),
        )
    })?;
    let k = node.config.k.max(a_k).max(sums.k);
    let mut resp = answer_rows(&plan, &released, &sums, k).map_err(CoordinatorError::Internal)?;
    resp.query_id = query_id.to_string();
    resp.nodes = vec![
        NodeStatus {
            agency: a.clone(),
            status: NodeState::Ok,
            epsilon: a_eps,
            ..Default::default()
        },
        NodeStatus {
            agency: b.clone(),
            status: NodeState::Ok,
            epsilon: sums.epsilon,
            ..Default::default()
        },
    ];
    Ok(resp)
}
