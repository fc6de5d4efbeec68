//! The node's DataFusion session: `experience` and `operational` as listing tables over the
//! Parquet files in the data directory, re-listed on every query so newly ingested files are
//! seen without a restart.

use std::path::Path;
use std::sync::Arc;

use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::execution::cache::cache_manager::CacheManagerConfig;
use datafusion::execution::context::SessionContext;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;

use cxfed_queries::context::{register_functions, session_config};
use cxfed_queries::schema::Table;

use crate::storage::table_dir;

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
    let ctx = SessionContext::new_with_config_rt(session_config(), runtime);
    register_functions(&ctx);
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
