//! Journey queries: the same people at two agencies, joined by the private linkage key
//! ([`crate::linkage`]) and answered by the private intersection-sum of
//! [`cxfed_protocol::psi_sum`]. This module owns this node's three steps of that protocol (as
//! the membership node B or the value node A) and the coordinator's run of them.
//!
//! ```text
//!  coordinator C             B (membership side)                 A (value side)
//!  fresh result key ──members──▶ checks the signed SQL, runs its
//!                    ◀──m1────── per-person SQL, blinds its members
//!                   ──values(m1)───────────────────────────────▶ checks the signed SQL,
//!                                                                charges its ledger, runs
//!                   ◀──m2──────────────────────────────────────── its SQL, encrypts to C
//!                   ──sums(m2)──▶ charges its ledger, sums the
//!                    ◀──m3────── matched and unmatched payloads,
//!  decrypts only the             adds discrete Laplace noise (dp)
//!  released sums, applies k      and re-randomizes
//! ```
//! - Each side reduces its rows to **one record per person** (the plan's per-person SQL), and
//!   only people with a linkage value take part. With a measure, A's records are the people
//!   with a value, clipped to the measure's bounds and rounded to a whole number at random
//!   (unbiased), so COUNT counts those people.
//! - `dp`: the analyst names ε, at most each node's `epsilon_per_query` (both spend exactly
//!   it). B adds the noise, at the scales of that ε over the count and, when asked
//!   for, the sum: sensitivity 1 and `hi − lo` per person for an INNER JOIN, twice that for a
//!   LEFT JOIN (one of B's people moves one of A's between a matched and an unmatched cell).
//!   Both nodes charge their ledgers before reading data. What is not asked for (sums of
//!   squares) is sent as encryptions of 0. A trusts B to add the noise (documented in
//!   README).
//! - `k-only`: no noise; the coordinator withholds every cell of fewer than k people, with k
//!   the largest of its own, A's and B's.
//! - A step refused or failed anywhere fails the query (a journey has no partial answer).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use arrow::array::{Array, Float64Array};
use arrow::util::display::array_value_to_string;

use cxfed_protocol::Identity;
use cxfed_protocol::psi_sum::{self, Cell, MemberParty, PublicKey, Stat, ValueParty, ValueRecord};
use cxfed_protocol::signing::RequestSignature;
use cxfed_protocol::wire::{
    ColumnFormat, JourneyRequest, JourneyShape, JourneyStep, JourneySums, JourneyValues,
    PROTOCOL_VERSION, QueryResponse,
};
use cxfed_queries::dp::{RandomSource, Scale, Z95, uniform_below};
use cxfed_queries::journey::{JourneyPlan, Output, Side};
use cxfed_queries::rules::QueryError;

use crate::partial::PartialError;

/// How long B keeps its secret for a run between `members` and `sums`.
const PENDING_FOR: Duration = Duration::from_secs(300);

/// The endpoint every step is audited under; B's `members` step under [`MEMBERS_ENDPOINT`].
pub const ENDPOINT: &str = "/v1/journey";
/// B's first step, audited apart from the step whose answer carries data.
pub const MEMBERS_ENDPOINT: &str = "/v1/journey/members";

/// What a step needs of this node (the node's state, without HTTP or the node type itself).
pub struct Here<'a> {
    /// The node's session over its files, and where its plans run.
    pub engine: &'a crate::engine::Engine,
    /// This node's agency.
    pub agency: &'a str,
    /// Its data directory (the linkage key and store live there).
    pub data_dir: &'a std::path::Path,
    /// The policy in force.
    pub policy: std::sync::Arc<crate::policy::Policy>,
    /// Validated queries, cached.
    pub approvals: &'a crate::approvals::Approvals,
    /// The budget ledger.
    pub ledger: &'a crate::ledger::Ledger,
    /// Runs waiting for their `sums` step.
    pub pending: &'a Pending,
    /// The node's admission check (rate limits, allowed agencies) for an analyst.
    #[allow(clippy::type_complexity)]
    pub admit: Box<dyn Fn(&str) -> Result<(), crate::policy::PolicyRefusal> + Send + Sync + 'a>,
}

/// What a step did, for the audit log.
pub struct Outcome {
    /// The answer's bytes (JSON), or why there is none.
    pub result: Result<Vec<u8>, PartialError>,
    /// [`ENDPOINT`] or [`MEMBERS_ENDPOINT`].
    pub endpoint: &'static str,
    /// The analyst the step is for.
    pub analyst: String,
    /// The analyst's signed request this step runs under, and when it was received.
    pub request: Option<(RequestSignature, i64)>,
    /// ε charged here.
    pub spent: Option<f64>,
}

/// Runs of which this node is B, between `members` and `sums`: one per query id, used once.
#[derive(Default)]
pub struct Pending {
    runs: Mutex<HashMap<String, Waiting>>,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pending(<secrets>)")
    }
}

struct Waiting {
    party: MemberParty,
    key: PublicKey,
    coordinator: String,
    analyst: String,
    sql: String,
    epsilon: Option<f64>,
    require_all: bool,
    signature: Option<RequestSignature>,
    received_at: i64,
    since: Instant,
}

fn internal(e: impl std::fmt::Display) -> PartialError {
    PartialError::Query(QueryError::Internal(e.to_string()))
}

pub(crate) fn refused(why: impl Into<String>) -> PartialError {
    PartialError::Query(QueryError::Rejected(cxfed_queries::rules::Rejection::new(
        cxfed_queries::rules::Rule::JourneyShape,
        why,
    )))
}

/// A journey's ε in `dp` mode: B adds the noise for A's people too, so both nodes must spend
/// the same ε. The analyst names it, and it must be at most this node's `epsilon_per_query`
/// (no silent cap, as partials have). Checked by the coordinator and by each node.
pub fn check_epsilon(
    policy: &crate::policy::Policy,
    requested: Option<f64>,
) -> Result<(), PartialError> {
    crate::partial::check_epsilon(policy, requested)?;
    let Some(settings) = &policy.dp else {
        return Ok(());
    };
    match requested {
        None => Err(refused(
            "a journey query in differential-privacy mode names its ε (--epsilon): both nodes must calibrate and charge the same one",
        )),
        Some(e) if e > settings.epsilon_per_query => Err(refused(format!(
            "ε = {e} is above this node's epsilon_per_query ({}); a journey spends the same ε at both nodes, so it must be at most each one's",
            settings.epsilon_per_query
        ))),
        Some(_) => Ok(()),
    }
}

/// The plan of a journey query under this node's public keys.
pub async fn plan_here(here: &Here<'_>, sql: &str) -> Result<JourneyPlan, PartialError> {
    let keys = here
        .policy
        .dp
        .as_ref()
        .map(|d| d.public_keys.clone())
        .unwrap_or_else(cxfed_queries::keyset::PublicKeys::schema_only);
    Ok(cxfed_queries::journey::plan_with_keys(&here.engine.planner().state(), sql, &keys).await?)
}

/// Checks that `side` is this node's and passes its policy (hidden dimensions, ...).
async fn check_side(here: &Here<'_>, side: &Side) -> Result<(), PartialError> {
    if side.agency != here.agency {
        return Err(refused(format!(
            "this step is for {}'s side of the journey, and this node is {}",
            side.agency, here.agency
        )));
    }
    let approved = here
        .approvals
        .approve(here.engine.planner(), &side.check_sql)
        .await?;
    here.policy.check_query(&approved)?;
    Ok(())
}

/// One person of a side: its group cell (index into `side.cells()`) and value, if any.
struct Person {
    linkage: [u8; 32],
    cell: u32,
    value: Option<f64>,
}

/// Runs `side`'s per-person SQL and joins each person to its keyed linkage value.
async fn side_people(here: &Here<'_>, side: &Side) -> Result<Vec<Person>, PartialError> {
    let policy = &here.policy;
    let key_path = here.data_dir.join(crate::linkage::KEY_FILE);
    let key = crate::linkage::LinkageKey::load(&key_path).map_err(|e| {
        refused(format!(
            "this node holds no linkage key ({}: {e}); a steward installs it with `cxfed linkage keygen` or a copy of the federation's",
            crate::linkage::KEY_FILE
        ))
    })?;
    let linkage = crate::linkage::load(here.data_dir, &key)
        .map_err(|e| internal(format!("linkage store: {e}")))?;
    let plan = here
        .engine
        .planner()
        .state()
        .create_logical_plan(&side.side_sql)
        .await
        .map_err(|e| internal(format!("journey side plan: {e}")))?;
    let deadline = tokio::time::Instant::now() + policy.query_timeout;
    let batches = crate::partial::execute(here.engine, plan, deadline, policy).await?;
    let cells = side.cells();
    let index: HashMap<Option<&str>, u32> = cells
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_deref(), i as u32))
        .collect();
    let mut out = Vec::new();
    for b in &batches {
        let schema = b.schema();
        let column = |name: &str| schema.index_of(name).ok().map(|i| b.column(i));
        let persons = column("person_id").ok_or_else(|| internal("no person_id column"))?;
        let groups = column("g");
        let values = match column("v") {
            Some(v) => Some(
                v.as_any()
                    .downcast_ref::<Float64Array>()
                    .ok_or_else(|| internal("v is not Float64"))?
                    .clone(),
            ),
            None => None,
        };
        for r in 0..b.num_rows() {
            let person = array_value_to_string(persons, r).map_err(internal)?;
            let Some(keyed) = linkage.get(&person) else {
                continue;
            };
            let group = match groups {
                None => None,
                Some(g) if g.is_null(r) => None,
                Some(g) => Some(array_value_to_string(g, r).map_err(internal)?),
            };
            let cell = match side.group {
                None => 0,
                Some(_) => match index.get(&group.as_deref()) {
                    Some(i) => *i,
                    // A value outside the public vocabulary (or a NULL where none is listed):
                    // no cell to count the person in.
                    None => continue,
                },
            };
            let value = values
                .as_ref()
                .and_then(|v| (!v.is_null(r)).then(|| v.value(r)));
            out.push(Person {
                linkage: keyed.0,
                cell,
                value,
            });
        }
    }
    Ok(out)
}

/// Fixed point of a measure's values on the wire: the largest power of ten (at most 1000)
/// with which one person's value, `(hi − lo)·factor`, stays below 2³²/10⁶, so that a million
/// people's sum decrypts within [`psi_sum::DEFAULT_BOUND`]. A and the coordinator compute it
/// alike from the plan.
pub fn value_factor(lo: f64, hi: f64) -> f64 {
    let room = psi_sum::DEFAULT_BOUND as f64 / 1e6;
    [1000.0, 100.0, 10.0, 1.0]
        .into_iter()
        .find(|f| (hi - lo) * f <= room)
        .unwrap_or(1.0)
}

/// `x` rounded to a neighbouring whole number at random, up with probability equal to its
/// fraction (so its expectation is `x`).
fn round_at_random(x: f64, rng: &mut dyn RandomSource) -> Result<i64, PartialError> {
    let floor = x.floor();
    let frac = x - floor;
    let up = frac > 0.0
        && (uniform_below(rng, 1 << 53).map_err(internal)? as f64) < frac * (1u64 << 53) as f64;
    Ok(floor as i64 + i64::from(up))
}

/// Charges this node's ledger for the analyst (dp mode): the ε spent, or None in k-only.
async fn charge(
    here: &Here<'_>,
    analyst: &str,
    query_id: &str,
    requested: Option<f64>,
) -> Result<Option<f64>, PartialError> {
    let policy = &here.policy;
    let Some(settings) = &policy.dp else {
        return Ok(None);
    };
    let epsilon = settings.params(policy.k, requested).epsilon;
    match here
        .ledger
        .charge(
            analyst,
            query_id,
            epsilon,
            settings.budget_epsilon,
            settings.budget_period,
        )
        .await
        .map_err(|e| internal(format!("budget ledger: {e}")))?
    {
        Ok(_) => Ok(Some(epsilon)),
        Err(exhausted) => Err(crate::policy::PolicyRefusal::budget(exhausted.to_string()).into()),
    }
}

/// Runs one step for the coordinator `peer` (the caller audits the [`Outcome`]). `analyst` is
/// the verified analyst of the signed request (`members`, `values`); `sums` continues a run
/// this node started, under the request it checked then.
pub async fn step(
    here: &Here<'_>,
    peer: &str,
    analyst: Option<&Identity>,
    req: &JourneyRequest,
    received_at: i64,
) -> Outcome {
    let endpoint = match req.step {
        JourneyStep::Members { .. } => MEMBERS_ENDPOINT,
        _ => ENDPOINT,
    };
    let mut spent = None;
    let mut logged_request = req.signature.clone().map(|s| (s, received_at));
    let mut analyst_uri = analyst.map(ToString::to_string).unwrap_or_default();
    let result: Result<Vec<u8>, PartialError> = async {
        if req.protocol != PROTOCOL_VERSION {
            return Err(refused(format!(
                "protocol {} is not spoken here (this node speaks {PROTOCOL_VERSION})",
                req.protocol
            )));
        }
        let policy = here.policy.clone();
        check_epsilon(&policy, req.epsilon)?;
        match &req.step {
            JourneyStep::Members { result_key } => {
                let analyst = analyst.ok_or_else(|| internal("members without an analyst"))?;
                (here.admit)(&analyst_uri)?;
                let plan = plan_here(here, &req.sql).await?;
                check_side(here, &plan.member_side).await?;
                let people = side_people(here, &plan.member_side).await?;
                let members: Vec<([u8; 32], u32)> =
                    people.iter().map(|p| (p.linkage, p.cell)).collect();
                let gb = plan.member_side.cells().len() as u32;
                // The curve work runs on every core (rayon); this worker's other tasks move
                // to another thread meanwhile.
                let (party, m1) =
                    crate::storage::blocking(|| MemberParty::new(gb, &members)).map_err(internal)?;
                let mut runs = here.pending.runs.lock().map_err(|_| internal("journeys lock"))?;
                runs.retain(|_, w| w.since.elapsed() < PENDING_FOR);
                if runs.contains_key(&req.query_id) {
                    return Err(refused(format!(
                        "query {} already has a journey run here: a rerun is a new query id",
                        req.query_id
                    )));
                }
                runs.insert(
                    req.query_id.clone(),
                    Waiting {
                        party,
                        key: *result_key,
                        coordinator: peer.to_string(),
                        analyst: analyst.to_string(),
                        sql: req.sql.clone(),
                        epsilon: req.epsilon,
                        require_all: req.require_all,
                        signature: req.signature.clone(),
                        received_at,
                        since: Instant::now(),
                    },
                );
                serde_json::to_vec(&m1).map_err(internal)
            }
            JourneyStep::Values {
                result_key,
                members,
            } => {
                (here.admit)(&analyst_uri)?;
                let plan = plan_here(here, &req.sql).await?;
                check_side(here, &plan.value_side).await?;
                if members.b_groups as usize != plan.member_side.cells().len() {
                    return Err(refused(format!(
                        "the members message has {} groups, the query's membership side {}",
                        members.b_groups,
                        plan.member_side.cells().len()
                    )));
                }
                spent = charge(here, &analyst_uri, &req.query_id, req.epsilon).await?;
                let people = side_people(here, &plan.value_side).await?;
                let (lo, hi) = plan.measure.as_ref().map_or((0.0, 0.0), |m| (m.lo, m.hi));
                let factor = value_factor(lo, hi);
                let max = ((hi - lo) * factor).max(0.0).round();
                let mut rng = crate::partial::OsRandom::default();
                let mut records = Vec::with_capacity(people.len());
                for p in &people {
                    let value = match (&plan.measure, p.value) {
                        (None, _) => 0,
                        (Some(_), None) => continue,
                        (Some(_), Some(v)) => {
                            let shifted = (v.clamp(lo, hi) - lo) * factor;
                            round_at_random(shifted, &mut rng)?.clamp(0, max as i64) as u32
                        }
                    };
                    records.push(ValueRecord {
                        linkage: p.linkage,
                        group: p.cell,
                        value,
                    });
                }
                let ga = plan.value_side.cells().len() as u32;
                let values = crate::storage::blocking(|| {
                    ValueParty::new(ga, max as u32)
                        .and_then(|a| a.respond(result_key, members, &records))
                })
                    .map_err(|e| refused(format!("journey values: {e}")))?;
                let answer = JourneyValues {
                    values,
                    k: policy.k,
                    epsilon: spent,
                };
                serde_json::to_vec(&answer).map_err(internal)
            }
            JourneyStep::Sums { values } => {
                let waiting = here
                    .pending
                    .runs
                    .lock()
                    .map_err(|_| internal("journeys lock"))?
                    .remove(&req.query_id)
                    .ok_or_else(|| {
                        refused(format!(
                            "no journey run of query {} is waiting here (never started, already summed, or expired)",
                            req.query_id
                        ))
                    })?;
                analyst_uri = waiting.analyst.clone();
                logged_request = waiting.signature.clone().map(|s| (s, waiting.received_at));
                if waiting.coordinator != peer
                    || waiting.sql != req.sql
                    || waiting.epsilon != req.epsilon
                    || waiting.require_all != req.require_all
                {
                    return Err(refused(
                        "the sums step comes from another coordinator or for another request than the members step",
                    ));
                }
                let plan = plan_here(here, &req.sql).await?;
                let ga = plan.value_side.cells().len() as u32;
                if values.a_groups != ga {
                    return Err(refused(format!(
                        "the values message has {} groups, the query's value side {ga}",
                        values.a_groups
                    )));
                }
                spent = charge(here, &analyst_uri, &req.query_id, req.epsilon).await?;
                let asks_sum = plan
                    .outputs
                    .iter()
                    .any(|o| matches!(o, Output::Sum { .. } | Output::Avg { .. }));
                let (count_scale, sum_scale) = match spent {
                    None => (None, None),
                    Some(epsilon) => {
                        let factor: u64 = if plan.left { 2 } else { 1 };
                        let stats: u64 = if asks_sum { 2 } else { 1 };
                        let max = plan
                            .measure
                            .as_ref()
                            .map_or(0.0, |m| ((m.hi - m.lo) * value_factor(m.lo, m.hi)).round())
                            as u64;
                        let scale = |sensitivity: u64| {
                            Scale::for_epsilon(sensitivity * factor * stats, epsilon)
                                .ok_or_else(|| internal(format!("cannot calibrate noise for ε = {epsilon}")))
                        };
                        (Some(scale(1)?), if asks_sum { Some(scale(max.max(1))?) } else { None })
                    }
                };
                let gb = plan.member_side.cells().len() as u32;
                let mut rng = crate::partial::OsRandom::default();
                let mut noise = HashMap::new();
                let cells = (0..ga)
                    .flat_map(|a| (0..gb).map(move |b| Cell::Matched { a_group: a, b_group: b }))
                    .chain((0..ga).map(|a| Cell::Unmatched { a_group: a }));
                for cell in cells {
                    for (stat, scale) in [(Stat::Count, count_scale), (Stat::Sum, sum_scale)] {
                        if let Some(s) = scale {
                            noise.insert((cell, stat), s.sample(&mut rng).map_err(internal)?);
                        }
                    }
                }
                let sums = crate::storage::blocking(|| {
                    waiting.party.aggregate_released(
                        &waiting.key,
                        values,
                        &|cell, stat| noise.get(&(cell, stat)).copied().unwrap_or(0),
                        &|stat| stat == Stat::Count || (stat == Stat::Sum && asks_sum),
                    )
                })
                    .map_err(|e| refused(format!("journey sums: {e}")))?;
                let answer = JourneySums {
                    sums,
                    count_scale: count_scale.map_or(0.0, Scale::value),
                    sum_scale: sum_scale.map_or(0.0, Scale::value),
                    k: policy.k,
                    epsilon: spent,
                };
                serde_json::to_vec(&answer).map_err(internal)
            }
        }
    }
    .await;
    Outcome {
        result,
        endpoint,
        analyst: analyst_uri,
        request: logged_request,
        spent,
    }
}

/// The released rows: each cell of the plan, from the decrypted sums (k applied in k-only
/// mode; in dp mode every cell, with 95% intervals from B's noise scales).
pub fn answer_rows(
    plan: &JourneyPlan,
    released: &psi_sum::Released,
    sums: &JourneySums,
    k: u64,
) -> Result<QueryResponse, String> {
    let dp = sums.count_scale > 0.0;
    let lo = plan.measure.as_ref().map_or(0.0, |m| m.lo);
    let hi = plan.measure.as_ref().map_or(0.0, |m| m.hi);
    let factor = value_factor(lo, hi);
    let a_cells = plan.value_side.cells();
    let b_cells = plan.member_side.cells();
    let var_count = cxfed_queries::dp::variance(sums.count_scale);
    // In the measure's units.
    let var_sum = cxfed_queries::dp::variance(sums.sum_scale) / (factor * factor);
    let mut rows = Vec::new();
    let mut ci95 = Vec::new();
    let mut suppressed = 0u64;
    for (a_cell, b_cell) in plan.cells() {
        let a = a_cells
            .iter()
            .position(|c| *c == a_cell)
            .ok_or("a cell of the value side")? as u32;
        // The parts of this cell: B's group (if it is one of B's cells), and under LEFT JOIN
        // the people not at B, who read NULL on B's side.
        let mut parts = Vec::new();
        if let Some(bi) = b_cells.iter().position(|c| *c == b_cell) {
            parts.push(Cell::Matched {
                a_group: a,
                b_group: bi as u32,
            });
        }
        if plan.left && b_cell.is_none() {
            parts.push(Cell::Unmatched { a_group: a });
        }
        let (mut n, mut fixed) = (0i64, 0i64);
        for part in &parts {
            let stats = released.cell(*part).ok_or("a released cell is missing")?;
            n += stats.count;
            fixed += stats.sum;
        }
        // The sum of the values shifted to start at `lo`, in the measure's units.
        let s = fixed as f64 / factor;
        let terms = parts.len() as f64;
        if !dp && (n as u64) < k {
            suppressed += 1;
            continue;
        }
        let count = n.max(0);
        let nf = n as f64;
        let avg = (n > 0).then(|| (lo + s / nf).clamp(lo, hi));
        let total = (n > 0).then_some(s + lo * nf);
        let mut row = Vec::new();
        let mut ci = Vec::new();
        for o in &plan.outputs {
            let (value, interval) = match o {
                Output::GroupA { .. } => (
                    a_cell.clone().map_or(serde_json::Value::Null, Into::into),
                    None,
                ),
                Output::GroupB { .. } => (
                    b_cell.clone().map_or(serde_json::Value::Null, Into::into),
                    None,
                ),
                Output::Count { .. } => {
                    (count.into(), dp.then(|| Z95 * (terms * var_count).sqrt()))
                }
                Output::Sum { .. } => (
                    total.map_or(serde_json::Value::Null, Into::into),
                    dp.then(|| Z95 * (terms * (var_sum + lo * lo * var_count)).sqrt()),
                ),
                Output::Avg { .. } => (
                    avg.map_or(serde_json::Value::Null, Into::into),
                    (dp && n > 0).then(|| {
                        let m = s / nf;
                        Z95 * (terms * (var_sum + m * m * var_count)).sqrt() / nf
                    }),
                ),
            };
            row.push(value);
            ci.push(interval);
        }
        rows.push(row);
        ci95.push(ci);
    }
    // An average's whole range: an interval wider than it says nothing (marked, as for any
    // dp answer).
    let formats: Vec<ColumnFormat> = plan
        .outputs
        .iter()
        .map(|o| ColumnFormat {
            range: matches!(o, Output::Avg { .. }).then_some(hi - lo),
            ..ColumnFormat::default()
        })
        .collect();
    let columns: Vec<String> = plan.outputs.iter().map(|o| o.name().to_string()).collect();
    let not_informative: Vec<Vec<String>> = if dp {
        cxfed_queries::present::not_informative(&formats, &ci95)
            .into_iter()
            .map(|cols| cols.into_iter().map(|c| columns[c].clone()).collect())
            .collect()
    } else {
        vec![]
    };
    let any_uninformative = not_informative.iter().any(|r| !r.is_empty());
    Ok(QueryResponse {
        query_id: String::new(),
        columns,
        rows,
        suppressed_groups: suppressed,
        suppressed_cells: 0,
        incomplete_cells: 0,
        incomplete_groups: 0,
        missing_parts: vec![],
        formats,
        not_informative: if any_uninformative {
            not_informative
        } else {
            vec![]
        },
        nodes: vec![],
        complete: true,
        privacy: if dp { "dp" } else { "k-only" }.into(),
        noise_sd: if dp {
            ci95.iter()
                .map(|r| r.iter().map(|c| c.map(|x| x / Z95)).collect())
                .collect()
        } else {
            vec![]
        },
        ci95: if dp { ci95 } else { vec![] },
        journey: Some(shape(plan)),
    })
}

/// What the answer's columns are, for drawing it as a flow between the two agencies.
pub fn shape(plan: &JourneyPlan) -> JourneyShape {
    JourneyShape {
        from: plan.value_side.agency.clone(),
        from_table: plan.value_side.table.name().to_string(),
        to: plan.member_side.agency.clone(),
        to_table: plan.member_side.table.name().to_string(),
        left: plan.left,
        to_group_optional: plan.member_side.group.is_some() && plan.member_side.group_null,
        roles: plan
            .outputs
            .iter()
            .map(|o| {
                match o {
                    Output::GroupA { .. } => "from-group",
                    Output::GroupB { .. } => "to-group",
                    Output::Count { .. } => "count",
                    Output::Sum { .. } => "sum",
                    Output::Avg { .. } => "avg",
                }
                .to_string()
            })
            .collect(),
        measure: plan.measure.as_ref().map(|m| m.column.clone()),
    }
}
