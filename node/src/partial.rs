//! What a node does with a query from a coordinator (or from itself): plan and validate the
//! analyst's SQL again with its own rules, derive the partial plan itself, run it on its own
//! data, withhold groups below its own k, and encode the rest as Arrow IPC.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::Schema;
use arrow::ipc::writer::StreamWriter;
use datafusion::error::DataFusionError;
use datafusion::execution::memory_pool::MemoryConsumer;
use datafusion::logical_expr::LogicalPlan;
use futures::StreamExt;

use cxfed_protocol::wire::{META_AGENCY, META_PARTIAL, META_SUPPRESSED, META_SUPPRESSED_CELLS};
use cxfed_queries::bounding::Bounder;
use cxfed_queries::cells::{lower_bounds, nullable, suppress_cells};
use cxfed_queries::dp::{BadEpsilon, EpsilonRange, RandomFailure, RandomSource};
use cxfed_queries::partial::suppress;
use cxfed_queries::partial::{Part, PartialMeta};
use cxfed_queries::privacy::DpPartial;
use cxfed_queries::rules::QueryError;
use cxfed_queries::schema::Table;
use cxfed_queries::validate::approve;
use ring::rand::{SecureRandom, SystemRandom};

use crate::engine::Engine;
use crate::exact_cache::ExactCache;
use crate::ledger::Ledger;
use crate::policy::{Policy, PolicyRefusal};
use crate::row_bounds::{Listing, RowBounds};

/// A node's answer to a partial request, ready to send.
#[derive(Debug, Clone)]
pub struct PartialOutput {
    /// Arrow IPC stream bytes.
    pub ipc: Vec<u8>,
    /// Groups released.
    pub groups: u64,
    /// Groups withheld (below this node's k; 0 in `dp` mode, where the count is not released).
    pub suppressed_groups: u64,
    /// Cells withheld within released groups (`k-only`: a region with 1 to k − 1 people).
    pub suppressed_cells: u64,
    /// ε spent (`dp` mode).
    pub epsilon: Option<f64>,
}

/// Why a node did not answer a partial.
#[derive(Debug, thiserror::Error)]
pub enum PartialError {
    /// The query broke a rule, or failed.
    #[error(transparent)]
    Query(#[from] QueryError),
    /// The steward's policy refused it.
    #[error(transparent)]
    Policy(#[from] PolicyRefusal),
    /// The analyst asked for an ε no node can spend (refused before any budget is charged).
    #[error(transparent)]
    Epsilon(#[from] BadEpsilon),
}

/// Refuses an ε this node cannot spend under `policy` (before anything is read or charged).
pub fn check_epsilon(policy: &Policy, requested: Option<f64>) -> Result<(), BadEpsilon> {
    let range = match &policy.dp {
        Some(d) => EpsilonRange::Node {
            max: d.epsilon_per_query,
        },
        None => EpsilonRange::KOnly,
    };
    requested.map_or(Ok(()), |e| cxfed_queries::dp::check_epsilon(e, range))
}

/// Who a partial is for, and where to charge its privacy budget.
#[derive(Debug, Clone, Copy)]
pub struct Charge<'a> {
    /// The budget ledger of this node.
    pub ledger: &'a Ledger,
    /// The analyst the query is for.
    pub analyst: &'a str,
    /// The query id.
    pub query_id: &'a str,
    /// ε the analyst asked for (at most the node's own maximum is spent).
    pub requested_epsilon: Option<f64>,
}

/// A partial that leaves masked for a secure-aggregation roster (see [`crate::secagg`]).
pub struct Masking<'a> {
    /// The roster the coordinator sent.
    pub round: &'a cxfed_protocol::wire::SecAggRound,
    /// The keys this node issued.
    pub keys: &'a crate::secagg::KeyStore,
    /// How the roster is checked.
    pub check: crate::secagg::RosterCheck<'a>,
}

/// The dp partial this node would release for `approved` with public keys, and its
/// calibration digest (what a secure-aggregation key commits to). Refuses data-dependent keys
/// and a public product over the cap.
fn secagg_partial(
    approved: &cxfed_queries::query::ApprovedQuery,
    policy: &Policy,
    settings: &crate::policy::DpSettings,
    requested_epsilon: Option<f64>,
) -> Result<(DpPartial, String), PartialError> {
    let keys = approved
        .group_keys_under(&settings.public_keys, policy.max_groups)
        .map_err(|e| PolicyRefusal::groups(e.to_string()))?;
    if let cxfed_queries::keyset::GroupKeys::DataDependent { key, why } = &keys {
        return Err(PolicyRefusal::secure_aggregation(format!(
            "secure aggregation needs public group keys; {key} is not ({why})"
        ))
        .into());
    }
    let dp = approved
        .dp_partial(&settings.params(policy.k, requested_epsilon))?
        .with_keys(keys)?;
    let digest = crate::secagg::calibration_digest(&dp.calibration()?);
    Ok((dp, digest))
}

/// The calibration digest of `approved` at this node (round 1 of secure aggregation).
pub fn secagg_calibration(
    approved: &cxfed_queries::query::ApprovedQuery,
    policy: &Policy,
    settings: &crate::policy::DpSettings,
    requested_epsilon: Option<f64>,
) -> Result<String, PartialError> {
    secagg_partial(approved, policy, settings, requested_epsilon).map(|(_, d)| d)
}

/// Validates `sql`, checks it against `policy`, charges the analyst's budget (in `dp` mode),
/// runs its partial plan on this node's data within the policy's time limit, then suppresses
/// groups and cells (`k-only`) or noises and selects groups (`dp`), and encodes what may leave.
// Each argument is a separate piece of the node's state; `Node::answer_partial` is the caller.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    engine: &Engine,
    agency: &str,
    policy: &Policy,
    sql: &str,
    charge: Charge<'_>,
    data: DataState<'_>,
    approved: Option<&cxfed_queries::query::ApprovedQuery>,
    masking: Option<Masking<'_>>,
) -> Result<PartialOutput, PartialError> {
    check_epsilon(policy, charge.requested_epsilon)?;
    let approved = match approved {
        Some(a) if a.sql() == sql => a.clone(),
        _ => approve(&engine.planner().state(), sql).await?,
    };
    policy.check_query(&approved)?;
    let deadline = tokio::time::Instant::now() + policy.query_timeout;
    let run_plan = |plan: LogicalPlan| execute(engine, plan, deadline, policy);
    let (fields, kept, suppressed_groups, suppressed_cells, meta) = match &policy.dp {
        None if masking.is_some() => {
            return Err(PolicyRefusal::secure_aggregation(
                "this node runs in k-only mode: secure aggregation is for dp partials".into(),
            )
            .into());
        }
        None => {
            let kp = approved.k_partial()?;
            let fields = nullable(&Arc::new(kp.exact.schema().as_arrow().clone()))
                .fields()
                .clone();
            let k = policy.k;
            let key = format!("k-only k={k}\0{sql}");
            let batches = exact(&data, key, &approved.tables(), async {
                // People bounded from row counts when every person's rows are known to be
                // few; counted exactly when the bound does not decide, or the files changed
                // meanwhile.
                let mut batches = None;
                if let Some(snapshot) = data.row_bounds.snapshot(&approved.tables()) {
                    let rows = run_plan(kp.counting_rows.clone()).await?;
                    if snapshot.still_current() {
                        batches =
                            lower_bounds(&rows, &kp.support_columns, snapshot.rows_per_person, k)?;
                    }
                }
                let people = if batches.is_some() {
                    "bounded"
                } else {
                    "exact"
                };
                let batches = match batches {
                    Some(b) => b,
                    None => run_plan(kp.exact.clone()).await?,
                };
                tracing::debug!(people, "k-only partial computed");
                Ok(batches)
            })
            .await?;
            let (kept, groups_withheld) = suppress(&batches, k)?;
            let (kept, cells_withheld) = suppress_cells(&kept, &approved.cells(&Part::VALUES)?, k)?;
            (
                fields,
                kept,
                groups_withheld,
                cells_withheld,
                approved.k_only_meta(),
            )
        }
        Some(settings) => {
            let params = settings.params(policy.k, charge.requested_epsilon);
            let epsilon = params.epsilon;
            // Every group of a public key set, or partition selection; a public cross
            // product over the steward's cap is refused before it is built or charged.
            let (dp, mask) = match &masking {
                None => {
                    let keys = approved
                        .group_keys_under(&settings.public_keys, policy.max_groups)
                        .map_err(|e| PolicyRefusal::groups(e.to_string()))?;
                    (approved.dp_partial(&params)?.with_keys(keys)?, None)
                }
                Some(m) => {
                    // Secure aggregation: the roster is checked before anything is charged
                    // or read, and this query id's key is used up whatever happens next.
                    let (dp, calibration) =
                        secagg_partial(&approved, policy, settings, charge.requested_epsilon)?;
                    let refuse = PolicyRefusal::secure_aggregation;
                    let (key, issued) = m.keys.take(charge.query_id).ok_or_else(|| {
                        refuse(format!(
                            "no secure-aggregation key waits for query id {}: none was issued, it expired, or it was used (a query id runs once)",
                            charge.query_id
                        ))
                    })?;
                    if issued != calibration {
                        return Err(refuse(
                            "the query's calibration changed since this node issued its key".into(),
                        )
                        .into());
                    }
                    let roster = crate::secagg::check_roster(
                        m.round,
                        charge.query_id,
                        &key,
                        &calibration,
                        &m.check,
                    )?;
                    let honest = crate::secagg::honest_for(
                        settings.assume_honest_nodes,
                        roster.members().len(),
                    );
                    (dp.with_noise_shares(honest)?, Some((key, roster)))
                }
            };
            // Charged and synced before any data is read.
            match charge
                .ledger
                .charge(
                    charge.analyst,
                    charge.query_id,
                    epsilon,
                    settings.budget_epsilon,
                    settings.budget_period,
                )
                .await
                .map_err(|e| QueryError::Internal(format!("budget ledger: {e}")))?
            {
                Ok(_) => {}
                Err(exhausted) => return Err(PolicyRefusal::budget(exhausted.to_string()).into()),
            }
            let fields = dp.plan.schema().as_arrow().fields().clone();
            let mut rng = OsRandom::default();
            // The exact partial depends on the data, the row plan and the bounding (G, R, caps).
            let key = format!("dp\0{:?}\0{}\0{sql}", dp.bounding, dp.rows.display_indent());
            let batches = exact(&data, key, &approved.tables(), async {
                Ok(vec![
                    execute_bounded(engine, &dp, deadline, policy, &mut rng).await?,
                ])
            })
            .await?;
            let mut noisy = dp.add_noise(&batches, &mut rng)?;
            if let Some((key, roster)) = &mask {
                let groups = approved.group_keys().len();
                noisy = noisy
                    .iter()
                    .map(|b| crate::secagg::mask_batch(b, groups, agency, key, roster))
                    .collect::<Result<_, _>>()
                    .map_err(|e| QueryError::Internal(format!("masking the partial: {e}")))?;
            }
            // How many groups fell below the DP threshold is not itself protected: not reported.
            (fields, noisy, 0, 0, dp.meta.clone())
        }
    };
    let groups = kept.iter().map(|b| b.num_rows() as u64).sum();
    policy.check_groups(groups)?;
    let metadata = HashMap::from([
        (META_SUPPRESSED.to_string(), suppressed_groups.to_string()),
        (
            META_SUPPRESSED_CELLS.to_string(),
            suppressed_cells.to_string(),
        ),
        (META_AGENCY.to_string(), agency.to_string()),
        (
            META_PARTIAL.to_string(),
            serde_json::to_string(&meta).map_err(|e| QueryError::Internal(e.to_string()))?,
        ),
    ]);
    let schema = Arc::new(Schema::new_with_metadata(fields, metadata));
    let ipc = encode(&schema, &kept)
        .map_err(|e| QueryError::Internal(format!("encoding partial: {e}")))?;
    Ok(PartialOutput {
        ipc,
        groups,
        suppressed_groups,
        suppressed_cells,
        epsilon: meta.epsilon,
    })
}

/// What a node knows about its data files besides the data: the rows one person holds per
/// file, and the exact partials computed from them.
#[derive(Debug, Clone, Copy)]
pub struct DataState<'a> {
    /// Per-file rows-per-person bounds (`k-only` people bounds).
    pub row_bounds: &'a Arc<RowBounds>,
    /// Exact partials of the current files.
    pub exact: &'a ExactCache,
}

/// The exact partial for `key` over `tables`: reused while the tables' files are unchanged,
/// or computed by `compute` (and kept if the files did not change while it ran).
async fn exact(
    data: &DataState<'_>,
    key: String,
    tables: &[Table],
    compute: impl std::future::Future<Output = Result<Vec<RecordBatch>, PartialError>>,
) -> Result<Arc<Vec<RecordBatch>>, PartialError> {
    let files = if data.exact.enabled() {
        Listing::of(data.row_bounds.data_dir(), tables).ok()
    } else {
        None
    };
    if let Some(hit) = files.as_ref().and_then(|f| data.exact.get(&key, f)) {
        tracing::debug!("exact partial reused: the data files are unchanged");
        return Ok(hit);
    }
    let batches = Arc::new(compute.await?);
    if let Some(files) = files {
        data.exact.put(key, files, Arc::clone(&batches));
    }
    Ok(batches)
}

/// Runs `plan` on the node's engine before `deadline`, mapping the policy's limits to their
/// refusals. With [`execute_bounded`], the one place a validated plan becomes record batches.
pub(crate) async fn execute(
    engine: &Engine,
    plan: LogicalPlan,
    deadline: tokio::time::Instant,
    policy: &Policy,
) -> Result<Vec<RecordBatch>, PartialError> {
    within_limits(deadline, policy, engine.execute(plan)).await
}

/// Awaits `run` before `deadline`, mapping the policy's time and memory limits to their
/// refusals (one place for every plan a partial runs).
async fn within_limits<T>(
    deadline: tokio::time::Instant,
    policy: &Policy,
    run: impl std::future::Future<Output = Result<T, DataFusionError>>,
) -> Result<T, PartialError> {
    match tokio::time::timeout_at(deadline, run).await {
        Err(_) => Err(PolicyRefusal::timeout(format!(
            "the query ran longer than this node's limit of {:?}",
            policy.query_timeout
        ))
        .into()),
        Ok(Err(e)) if is_resources_exhausted(&e) => Err(PolicyRefusal::memory(
            "the query needs more memory than this node's pool allows".into(),
        )
        .into()),
        Ok(Err(e)) => Err(QueryError::from(e).into()),
        Ok(Ok(b)) => Ok(b),
    }
}

/// Runs the DP partial's row plan and its contribution bounding before `deadline`: rows stream
/// from DataFusion into a [`Bounder`], whose state is held against the node's memory pool
/// (the row plan's own operators spill or refuse as DataFusion decides).
async fn execute_bounded(
    engine: &Engine,
    dp: &DpPartial,
    deadline: tokio::time::Instant,
    policy: &Policy,
    rng: &mut OsRandom,
) -> Result<RecordBatch, PartialError> {
    let run = async {
        let mut stream = engine.execute_stream(dp.rows.clone()).await?;
        // The bounder runs here, in the node, whatever the engine: its state is held
        // against the node's own pool.
        let reservation =
            MemoryConsumer::new("cxfed contribution bounding").register(&engine.memory_pool());
        let mut bounder = Bounder::new(Arc::clone(&dp.bounding));
        while let Some(batch) = stream.next().await {
            bounder
                .push(&batch.map_err(|e| engine.context(e))?)
                .map_err(query_error)?;
            reservation.try_resize(bounder.allocated())?;
        }
        drop(stream);
        bounder.finish(rng).map_err(query_error)
    };
    within_limits(deadline, policy, run).await
}

/// Carries a bounding error through DataFusion's error type (it is always internal).
fn query_error(e: QueryError) -> DataFusionError {
    DataFusionError::Internal(e.to_string())
}

/// The OS CSPRNG (ring's `SystemRandom`) as a noise source, read 512 bytes at a time so that
/// a noise draw is not a system call per word. A failure stops the sampler at once, and the
/// caller releases nothing.
pub(crate) struct OsRandom {
    rng: SystemRandom,
    buf: [u8; 512],
    used: usize,
}

impl Default for OsRandom {
    fn default() -> Self {
        OsRandom {
            rng: SystemRandom::new(),
            buf: [0; 512],
            used: 512,
        }
    }
}

impl RandomSource for OsRandom {
    fn next_u64(&mut self) -> Result<u64, RandomFailure> {
        if self.used + 8 > self.buf.len() {
            self.rng.fill(&mut self.buf).map_err(|_| RandomFailure)?;
            self.used = 0;
        }
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.buf[self.used..self.used + 8]);
        // Each word is used once: wipe it so no draw lingers in memory.
        self.buf[self.used..self.used + 8].fill(0);
        self.used += 8;
        Ok(u64::from_le_bytes(b))
    }
}

fn is_resources_exhausted(e: &DataFusionError) -> bool {
    matches!(e.find_root(), DataFusionError::ResourcesExhausted(_))
}

fn encode(
    schema: &Arc<Schema>,
    batches: &[RecordBatch],
) -> Result<Vec<u8>, arrow::error::ArrowError> {
    let mut buf = Vec::new();
    {
        let mut writer = StreamWriter::try_new(&mut buf, schema)?;
        for b in batches {
            writer.write(&RecordBatch::try_new(
                Arc::clone(schema),
                b.columns().to_vec(),
            )?)?;
        }
        writer.finish()?;
    }
    Ok(buf)
}

/// A partial decoded from a peer's IPC bytes (untrusted input).
#[derive(Debug)]
pub struct DecodedPartial {
    /// The batches, schema metadata stripped.
    pub batches: Vec<RecordBatch>,
    /// What the peer says it withheld.
    pub suppressed_groups: u64,
    /// Cells the peer says it withheld.
    pub suppressed_cells: u64,
    /// How the peer encoded and noised its partial.
    pub meta: Option<PartialMeta>,
}

/// Decodes an IPC stream. Structural checks against the expected schema are the caller's.
pub fn decode(bytes: &[u8]) -> Result<DecodedPartial, String> {
    let reader = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)
        .map_err(|e| format!("invalid Arrow IPC: {e}"))?;
    let schema = reader.schema();
    let suppressed_groups = match schema.metadata().get(META_SUPPRESSED) {
        Some(v) => v
            .parse()
            .map_err(|_| format!("invalid {META_SUPPRESSED} metadata"))?,
        None => return Err(format!("missing {META_SUPPRESSED} metadata")),
    };
    let suppressed_cells = match schema.metadata().get(META_SUPPRESSED_CELLS) {
        Some(v) => v
            .parse()
            .map_err(|_| format!("invalid {META_SUPPRESSED_CELLS} metadata"))?,
        None => 0,
    };
    let meta = match schema.metadata().get(META_PARTIAL) {
        Some(m) => Some(
            serde_json::from_str(m).map_err(|e| format!("invalid {META_PARTIAL} metadata: {e}"))?,
        ),
        None => None,
    };
    let plain = Arc::new(Schema::new(schema.fields().clone()));
    let mut batches = Vec::new();
    for b in reader {
        let b = b.map_err(|e| format!("invalid Arrow IPC batch: {e}"))?;
        batches.push(
            RecordBatch::try_new(Arc::clone(&plain), b.columns().to_vec())
                .map_err(|e| e.to_string())?,
        );
    }
    Ok(DecodedPartial {
        batches,
        suppressed_groups,
        suppressed_cells,
        meta,
    })
}
