//! Migration of a data directory to the current schema version: each older data file validated
//! again and rewritten in place by ingest's own validation ([`upgrade_file`]), then the
//! directory's version mark ([`crate::storage`] owns the layout and the marks).

use std::io;
use std::path::Path;

use cxfed_queries::schema::Table;

use super::{IngestError, upgrade_file};
use crate::storage::{data_files, mark_version, parquet_columns, refuse_newer, schema_version};

/// What [`migrate`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Migration {
    /// The version the directory was in.
    pub from: u32,
    /// Files rewritten.
    pub files: usize,
    /// Rows in them.
    pub rows: u64,
}

/// Brings `data_dir` to the current schema version: every data file with fewer columns than
/// the current schema is validated and rewritten in place (atomically, one file at a time, so
/// an interrupted migration resumes where it stopped), then the version file is written. A
/// directory of a newer version is refused. A missing directory is left alone.
pub fn migrate(data_dir: &Path) -> Result<Migration, IngestError> {
    use cxfed_queries::schema::SCHEMA_VERSION;
    let io = |e: io::Error| IngestError::Io {
        path: data_dir.to_path_buf(),
        source: e,
    };
    if !data_dir.exists() {
        return Ok(Migration {
            from: SCHEMA_VERSION,
            ..Migration::default()
        });
    }
    refuse_newer(data_dir).map_err(io)?;
    let from = schema_version(data_dir).map_err(io)?;
    let mut done = Migration {
        from,
        ..Migration::default()
    };
    if from == SCHEMA_VERSION {
        return Ok(done);
    }
    let mut any = false;
    for table in Table::ALL {
        let want = table.columns().len();
        for file in data_files(data_dir, table).map_err(io)? {
            any = true;
            let columns = parquet_columns(&file).map_err(io)?;
            if columns < want {
                done.rows += upgrade_file(table, &file)?;
                done.files += 1;
                tracing::info!(file = %file.display(), from, to = SCHEMA_VERSION, "upgraded data file");
            }
        }
    }
    // A directory without data has no version yet (ingest marks it when it adds a file).
    if any {
        mark_version(data_dir).map_err(io)?;
    }
    Ok(done)
}
