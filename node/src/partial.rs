//! What a node does with a query from a coordinator (or from itself): plan and validate the
//! analyst's SQL again with its own rules, derive the partial plan itself, run it on its own
//! data, withhold groups below its own k, and encode the rest as Arrow IPC.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::Schema;
use arrow::ipc::writer::StreamWriter;
use datafusion::execution::context::SessionContext;

use cxfed_protocol::wire::{META_AGENCY, META_SUPPRESSED};
use cxfed_queries::rewrite::suppress;
use cxfed_queries::validate::{QueryError, approve};

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

/// Validates `sql`, runs its partial plan on this node's data and suppresses small groups.
pub async fn run(ctx: &SessionContext, agency: &str, k: u64, sql: &str) -> Result<PartialOutput, QueryError> {
    let approved = approve(&ctx.state(), sql).await?;
    let plan = approved.partial_plan()?;
    let batches = ctx.execute_logical_plan(plan).await?.collect().await?;
    let (kept, suppressed_groups) = suppress(&batches, k)?;
    let groups = kept.iter().map(|b| b.num_rows() as u64).sum();
    let metadata = HashMap::from([
        (META_SUPPRESSED.to_string(), suppressed_groups.to_string()),
        (META_AGENCY.to_string(), agency.to_string()),
    ]);
    let schema = Arc::new(Schema::new_with_metadata(approved.partial_schema()?.fields().clone(), metadata));
    let ipc = encode(&schema, &kept).map_err(|e| QueryError::Internal(format!("encoding partial: {e}")))?;
    Ok(PartialOutput { ipc, groups, suppressed_groups })
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
