//! The node's DataFusion session: `experience` and `operational` as listing tables over the
//! Parquet files in the data directory, re-listed on every query so newly ingested files are
//! seen without a restart; and the [`Engine`] its validated partial plans run on.
//!
//! ```text
//!  node process                                          [engine] kind = "ballista" only
//!  ┌──────────────────────────────────────────────┐
//!  │ planner session: parse, validate, approve,   │
//!  │ derive the partial plan (LogicalPlan)        │
//!  │            │                                 │      ┌───────────────────────────┐
//!  │            ▼ Engine::execute / execute_stream│ ───▶ │ Ballista scheduler        │
//!  │ runner session ── local: the planner itself  │      │  plans the stages, sends  │
//!  │                └─ ballista: its DataFusion   │ ◀─── │  them to executors, which │
//!  │                   state, upgraded to submit  │ rows │  read the same Parquet    │
//!  │                   to the scheduler           │      │  paths                    │
//!  │            │                                 │      └───────────────────────────┘
//!  │            ▼ record batches                  │
//!  │ bounding, k / DP, noise, masking, ledger,    │
//!  │ audit, encoding: always here                 │
//!  └──────────────────────────────────────────────┘
//! ```

use std::path::Path;
use std::sync::Arc;

use arrow::array::RecordBatch;
use datafusion::error::DataFusionError;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::logical_expr::LogicalPlan;

use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::execution::cache::cache_manager::CacheManagerConfig;
use datafusion::execution::context::SessionContext;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;

use cxfed_queries::context::{new_context, session_config};
use cxfed_queries::schema::Table;

use crate::config::EngineConfig;
use crate::storage::table_dir;

/// Where a node's validated partial plans run: in its own process, or on the agency's Ballista
/// cluster. Planning and validation always use [`Engine::planner`], the node's own session;
/// only [`Engine::execute`] and [`Engine::execute_stream`] go to the cluster.
#[derive(Clone)]
pub struct Engine {
    planner: SessionContext,
    runner: SessionContext,
    /// The scheduler, when plans run on a cluster.
    cluster: Option<String>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("cluster", &self.cluster)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Plans run where they are planned, in `ctx` (`kind = "local"`).
    pub fn local(ctx: SessionContext) -> Engine {
        Engine {
            runner: ctx.clone(),
            planner: ctx,
            cluster: None,
        }
    }

    /// The engine `config` names, over the node's own session `ctx` (its tables, functions,
    /// options and memory pool are the cluster session's too), with the node's `tls` files
    /// if the cluster is reached over mutual TLS. Connecting is lazy: a scheduler that is
    /// down fails the queries sent to it, not the node's start.
    #[cfg_attr(not(feature = "ballista"), allow(unused_variables))]
    pub fn new(
        config: &EngineConfig,
        tls: &crate::tls::TlsFiles,
        ctx: SessionContext,
    ) -> Result<Engine, DataFusionError> {
        match config {
            EngineConfig::Local => Ok(Engine::local(ctx)),
            #[cfg(feature = "ballista")]
            EngineConfig::Ballista {
                scheduler,
                tls: with_tls,
            } => {
                let tls = match with_tls {
                    false => None,
                    true => Some(
                        crate::ballista::ClusterTls::load(tls)
                            .map_err(|e| DataFusionError::Configuration(e.to_string()))?,
                    ),
                };
                Ok(Engine {
                    runner: crate::ballista::client_context(&ctx, scheduler, tls.as_ref())?,
                    planner: ctx,
                    cluster: Some(scheduler.to_string()),
                })
            }
            #[cfg(not(feature = "ballista"))]
            EngineConfig::Ballista { .. } => Err(DataFusionError::Configuration(
                "engine.kind = \"ballista\" needs a cxfed built with the `ballista` feature".into(),
            )),
        }
    }

    /// The node's own session: what plans, validates and explains queries.
    pub fn planner(&self) -> &SessionContext {
        &self.planner
    }

    /// The scheduler plans are sent to (`df://host:port`), if not run here.
    pub fn cluster(&self) -> Option<&str> {
        self.cluster.as_deref()
    }

    /// Runs a validated `plan` to completion.
    pub async fn execute(&self, plan: LogicalPlan) -> Result<Vec<RecordBatch>, DataFusionError> {
        let run = async {
            self.runner
                .execute_logical_plan(plan)
                .await?
                .collect()
                .await
        };
        run.await.map_err(|e| self.context(e))
    }

    /// Runs a validated `plan`, its rows as a stream (errors while streaming, which is when
    /// a cluster is first reached, are wrapped by the caller with [`Engine::context`]).
    pub async fn execute_stream(
        &self,
        plan: LogicalPlan,
    ) -> Result<SendableRecordBatchStream, DataFusionError> {
        let run = async {
            self.runner
                .execute_logical_plan(plan)
                .await?
                .execute_stream()
                .await
        };
        run.await.map_err(|e| self.context(e))
    }

    /// The node's memory pool (a cluster session shares the node's runtime).
    pub fn memory_pool(&self) -> Arc<dyn datafusion::execution::memory_pool::MemoryPool> {
        Arc::clone(&self.planner.runtime_env().memory_pool)
    }

    /// Names the cluster in an error from it (the root cause is kept for limit checks).
    pub fn context(&self, e: DataFusionError) -> DataFusionError {
        match &self.cluster {
            None => e,
            Some(s) => e.context(format!(
                "running the partial on the Ballista cluster at {s}"
            )),
        }
    }
}

/// Builds the session for a node whose tables live under `data_dir` (created if missing), with
/// a memory pool of `memory_limit` bytes shared by all its queries.
pub fn node_context(
    data_dir: &Path,
    memory_limit: usize,
) -> datafusion::error::Result<SessionContext> {
    // No list-files cache: a file ingested while serving must be visible to the next query.
    let runtime = RuntimeEnvBuilder::new()
        .with_cache_manager(CacheManagerConfig::default().with_list_files_cache_limit(0))
        .with_memory_limit(memory_limit, 1.0)
        .build_arc()?;
    let ctx = new_context(session_config(), Some(runtime));
    for table in Table::ALL {
        let dir = table_dir(data_dir, table);
        std::fs::create_dir_all(&dir)?;
        let dir = std::fs::canonicalize(&dir)?;
        let url = ListingTableUrl::parse(format!("{}/", dir.display()))?;
        let options =
            ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
        let config = ListingTableConfig::new(url)
            .with_listing_options(options)
            .with_schema(scan_schema(table));
        ctx.register_table(table.name(), Arc::new(ListingTable::try_new(config)?))?;
    }
    Ok(ctx)
}

/// The schema the node scans `table` with: the stored schema, with text as `Utf8View`, which
/// the Parquet reader fills without copying each string out of its dictionary page (a third
/// less time for a typical grouped query). Partials and answers carry the same view type on
/// every node.
pub fn scan_schema(table: Table) -> arrow::datatypes::SchemaRef {
    use arrow::datatypes::{DataType, Field, Schema};
    let stored = table.arrow_schema();
    Arc::new(Schema::new(
        stored
            .fields()
            .iter()
            .map(|f| match f.data_type() {
                DataType::Utf8 => Field::new(f.name(), DataType::Utf8View, f.is_nullable()),
                _ => f.as_ref().clone(),
            })
            .collect::<Vec<_>>(),
    ))
}

/// Rows this node holds in `table`.
pub async fn row_count(ctx: &SessionContext, table: Table) -> datafusion::error::Result<u64> {
    Ok(ctx.table(table.name()).await?.count().await? as u64)
}
