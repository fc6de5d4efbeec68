//! What a node does with a query from a coordinator (or from itself): plan and validate the
//! analyst's SQL again with its own rules, derive the partial plan itself, run it on its own
//! data, withhold groups below its own k, and encode the rest as Arrow IPC.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::Schema;
use arrow::ipc::writer::StreamWriter;
use datafusion::error::DataFusionError;
use datafusion::execution::context::SessionContext;

use cxfed_protocol::wire::{META_AGENCY, META_SUPPRESSED};
use cxfed_queries::rewrite::suppress;
use cxfed_queries::validate::{QueryError, approve};

use crate::policy::{Policy, PolicyRefusal};

/// A node's answer to a partial request, ready to send.
#[derive(Debug, Clone)]
pub struct PartialOutput {
    /// Arrow IPC stream bytes.
    pub ipc: Vec<u8>,
    /// Groups released.
    pub groups: u64,
    /// Groups withheld (below this node's k).
    pub suppressed_groups: u64,
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
}

/// Validates `sql`, checks it against `policy`, runs its partial plan on this node's data
/// within the policy's time limit, withholds groups below the policy's k and encodes the rest.
pub async fn run(ctx: &SessionContext, agency: &str, policy: &Policy, sql: &str) -> Result<PartialOutput, PartialError> {
    let approved = approve(&ctx.state(), sql).await?;
    policy.check_query(&approved)?;
    let plan = approved.partial_plan()?;
    let execute = async { ctx.execute_logical_plan(plan).await?.collect().await };
    let batches = match tokio::time::timeout(policy.query_timeout, execute).await {
        Err(_) => {
            return Err(PolicyRefusal::timeout(format!(
                "the query ran longer than this node's limit of {} s",
                policy.query_timeout.as_secs()
            ))
            .into());
        }
        Ok(Err(e)) if is_resources_exhausted(&e) => {
            return Err(PolicyRefusal::memory("the query needs more memory than this node's pool allows".into()).into());
        }
        Ok(Err(e)) => return Err(QueryError::from(e).into()),
        Ok(Ok(b)) => b,
    };
    let (kept, suppressed_groups) = suppress(&batches, policy.k)?;
    let groups = kept.iter().map(|b| b.num_rows() as u64).sum();
    policy.check_groups(groups)?;
    let metadata = HashMap::from([
        (META_SUPPRESSED.to_string(), suppressed_groups.to_string()),
        (META_AGENCY.to_string(), agency.to_string()),
    ]);
    let schema = Arc::new(Schema::new_with_metadata(approved.partial_schema()?.fields().clone(), metadata));
    let ipc = encode(&schema, &kept).map_err(|e| QueryError::Internal(format!("encoding partial: {e}")))?;
    Ok(PartialOutput { ipc, groups, suppressed_groups })
}

fn is_resources_exhausted(e: &DataFusionError) -> bool {
    matches!(e.find_root(), DataFusionError::ResourcesExhausted(_))
}

fn encode(schema: &Arc<Schema>, batches: &[RecordBatch]) -> Result<Vec<u8>, arrow::error::ArrowError> {
    let mut buf = Vec::new();
    {
        let mut writer = StreamWriter::try_new(&mut buf, schema)?;
        for b in batches {
            writer.write(&RecordBatch::try_new(Arc::clone(schema), b.columns().to_vec())?)?;
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
}

/// Decodes an IPC stream. Structural checks against the expected schema are the caller's.
pub fn decode(bytes: &[u8]) -> Result<DecodedPartial, String> {
    let reader = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)
        .map_err(|e| format!("invalid Arrow IPC: {e}"))?;
    let schema = reader.schema();
    let suppressed_groups = match schema.metadata().get(META_SUPPRESSED) {
        Some(v) => v.parse().map_err(|_| format!("invalid {META_SUPPRESSED} metadata"))?,
        None => return Err(format!("missing {META_SUPPRESSED} metadata")),
    };
    let plain = Arc::new(Schema::new(schema.fields().clone()));
    let mut batches = Vec::new();
    for b in reader {
        let b = b.map_err(|e| format!("invalid Arrow IPC batch: {e}"))?;
        batches.push(RecordBatch::try_new(Arc::clone(&plain), b.columns().to_vec()).map_err(|e| e.to_string())?);
    }
    Ok(DecodedPartial { batches, suppressed_groups })
}
