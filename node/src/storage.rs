//! The node's data directory.
//!
//! # Layout
//! ```text
//! <data_dir>/
//!   experience/   <unix_nanos>-<random hex>.parquet ...
//!   operational/  <unix_nanos>-<random hex>.parquet ...
//! ```
//! Each table is the union of the `*.parquet` files in its directory, every one written in the
//! exact [`Table::arrow_schema`]. Files are only ever added, each one atomically (see
//! [`crate::ingest`]): a file being written is named `.<name>.tmp` (hidden, and not ending in
//! `.parquet`), so a reader that lists `*.parquet` never sees a half-written file.

use std::io;
use std::path::{Path, PathBuf};

use cxfed_queries::schema::Table;

/// The file extension of a table's data files.
pub const DATA_FILE_EXTENSION: &str = "parquet";

/// Writes `contents` to `path` through a temporary file in the same directory, synced, then a
/// rename: readers see the old file or the new one, never half of one. `private` files are
/// created with mode 0600 (never readable by others, even briefly).
pub fn write_atomic(path: &Path, contents: &[u8], private: bool) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let mut tag = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut tag)
        .map_err(|_| io::Error::other("random number generator failed"))?;
    let tmp = dir.join(format!(
        ".{file_name}.{}.tmp",
        cxfed_protocol::signing::hex(&tag)
    ));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(&tmp)
        .and_then(|mut file| {
            file.write_all(contents)?;
            file.sync_all()
        });
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    // Make the rename durable; failing to sync a directory is not worth failing for.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The directory that holds the Parquet files of `table`: `<data_dir>/<table name>`.
pub fn table_dir(data_dir: &Path, table: Table) -> PathBuf {
    data_dir.join(table.name())
}

/// Whether `path` names a complete data file: ends in `.parquet` and is not hidden (temporary
/// files start with `.`).
pub fn is_data_file(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    !name.starts_with('.') && path.extension().and_then(|e| e.to_str()) == Some(DATA_FILE_EXTENSION)
}

/// The data files of `table`, sorted by name (that is, by ingestion time). A missing table
/// directory is an empty table.
pub fn data_files(data_dir: &Path, table: Table) -> io::Result<Vec<PathBuf>> {
    let dir = table_dir(data_dir, table);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        if is_data_file(&path) && entry.file_type()?.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let d = Path::new("/data");
        assert_eq!(
            table_dir(d, Table::Experience),
            PathBuf::from("/data/experience")
        );
        assert_eq!(
            table_dir(d, Table::Operational),
            PathBuf::from("/data/operational")
        );
        assert!(is_data_file(Path::new("/data/experience/1-ab.parquet")));
        assert!(!is_data_file(Path::new(
            "/data/experience/.1-ab.parquet.x.tmp"
        )));
        assert!(!is_data_file(Path::new("/data/experience/.hidden.parquet")));
        assert!(!is_data_file(Path::new("/data/experience/notes.txt")));
    }

    #[test]
    fn missing_table_dir_is_empty() {
        let tmp = tempfile::tempdir().expect("tempdir");
        assert!(
            data_files(tmp.path(), Table::Experience)
                .expect("list")
                .is_empty()
        );
    }
}
