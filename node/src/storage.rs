//! The node's data directory.
//!
//! # Layout
//! ```text
//! <data_dir>/
//!   experience/   <unix_nanos>-<random hex>.parquet ...
//!   operational/  <unix_nanos>-<random hex>.parquet ...
//! ```
//! Each table is the union of the `*.parquet` files in its directory, every one written in the
//! exact [`Table::arrow_schema`]. `SCHEMA_VERSION` holds the schema version the directory is in
//! (absent: version 1, written before versions were recorded); [`crate::ingest::migrate`]
//! upgrades older directories file by file. Files are only ever added, each one atomically (see
//! [`crate::ingest`]): a file being written is named `.<name>.tmp` (hidden, and not ending in
//! `.parquet`), so a reader that lists `*.parquet` never sees a half-written file.

use std::io;
use std::path::{Path, PathBuf};

use cxfed_queries::schema::Table;

/// The file recording the schema version of a data directory.
pub const VERSION_FILE: &str = "SCHEMA_VERSION";

/// The schema version of `data_dir` (1 when it has data but no version file).
pub fn schema_version(data_dir: &Path) -> io::Result<u32> {
    match std::fs::read_to_string(data_dir.join(VERSION_FILE)) {
        Ok(text) => text.trim().parse().map_err(|_| {
            io::Error::other(format!(
                "{}: not a schema version: {:?}",
                data_dir.join(VERSION_FILE).display(),
                text.trim()
            ))
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(1),
        Err(e) => Err(e),
    }
}

/// Records that `data_dir` is in the current schema version.
pub fn mark_version(data_dir: &Path) -> io::Result<()> {
    let text = format!("{}\n", cxfed_queries::schema::SCHEMA_VERSION);
    if std::fs::read_to_string(data_dir.join(VERSION_FILE))
        .ok()
        .as_deref()
        == Some(&text)
    {
        return Ok(());
    }
    write_atomic(&data_dir.join(VERSION_FILE), text.as_bytes(), false)
}

pub(crate) fn parquet_columns(file: &Path) -> io::Result<usize> {
    let f = std::fs::File::open(file)?;
    let reader = datafusion::parquet::file::reader::SerializedFileReader::new(f)
        .map_err(io::Error::other)?;
    use datafusion::parquet::file::reader::FileReader;
    Ok(reader
        .metadata()
        .file_metadata()
        .schema_descr()
        .root_schema()
        .get_fields()
        .len())
}

/// When the newest data file of `table` was added (RFC 3339, UTC), if there is one: the time in
/// its name (`<unix_nanos>-<hex>.parquet`, see [`crate::ingest`]), which a migration (a rewrite
/// in place) or a copy keeps; the modification time only for a file not named that way.
pub fn last_ingest(data_dir: &Path, table: Table) -> Option<String> {
    let newest = data_files(data_dir, table)
        .ok()?
        .iter()
        .filter_map(|f| {
            ingest_time(f).or_else(|| {
                let t = std::fs::metadata(f).and_then(|m| m.modified()).ok()?;
                Some(chrono::DateTime::<chrono::Utc>::from(t))
            })
        })
        .max()?;
    Some(newest.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

/// The time in a data file's name `<unix_nanos>-<hex>.parquet`.
fn ingest_time(file: &Path) -> Option<chrono::DateTime<chrono::Utc>> {
    let name = file.file_name()?.to_str()?;
    let (nanos, rest) = name.split_once('-')?;
    let hex = rest.strip_suffix(&format!(".{DATA_FILE_EXTENSION}"))?;
    if nanos.is_empty()
        || !nanos.bytes().all(|b| b.is_ascii_digit())
        || hex.is_empty()
        || !hex.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return None;
    }
    let nanos: i64 = nanos.parse().ok()?;
    Some(chrono::DateTime::from_timestamp_nanos(nanos))
}

/// Refuses a data directory written by a newer cxfed (without changing anything).
pub fn refuse_newer(data_dir: &Path) -> io::Result<()> {
    use cxfed_queries::schema::SCHEMA_VERSION;
    if !data_dir.exists() {
        return Ok(());
    }
    let version = schema_version(data_dir)?;
    if version > SCHEMA_VERSION {
        return Err(io::Error::other(format!(
            "the data directory is in schema version {version}, written by a newer cxfed; this \
             one reads version {SCHEMA_VERSION}"
        )));
    }
    Ok(())
}

/// The file extension of a table's data files.
pub const DATA_FILE_EXTENSION: &str = "parquet";

/// Writes `contents` to `path` through a temporary file in the same directory, synced, then a
/// rename: readers see the old file or the new one, never half of one. `private` files are
/// created with mode 0600 (never readable by others, even briefly).
pub fn write_atomic(path: &Path, contents: &[u8], private: bool) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = parent_dir(path);
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

/// An append-only file of lines (the audit log, the budget ledger): a trait so that tests can
/// make writes fail.
pub trait AppendFile: Send {
    /// Writes all of `bytes` at the end.
    fn append(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// Makes what was written durable.
    fn sync(&mut self) -> io::Result<()>;
    /// Cuts the file back to `len` bytes.
    fn cut_to(&mut self, len: u64) -> io::Result<()>;
}

impl AppendFile for std::fs::File {
    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        io::Write::write_all(self, bytes)
    }
    fn sync(&mut self) -> io::Result<()> {
        self.sync_data()
    }
    fn cut_to(&mut self, len: u64) -> io::Result<()> {
        self.set_len(len)
    }
}

/// Appends `bytes` to `file`, whose last good length is `*good_len`, and syncs them. When the
/// write or the sync fails, some of the bytes may be in the file: it is cut back to `*good_len`
/// (and synced) before the error is returned, so nothing half-written stays. `Err((error,
/// None))` means the file is as it was; `Err((error, Some(why)))` that cutting it back failed
/// too, and the file must not be appended to again.
pub fn append_durably(
    file: &mut dyn AppendFile,
    good_len: &mut u64,
    bytes: &[u8],
) -> Result<(), (io::Error, Option<io::Error>)> {
    match file.append(bytes).and_then(|()| file.sync()) {
        Ok(()) => {
            *good_len += bytes.len() as u64;
            Ok(())
        }
        Err(e) => match file.cut_to(*good_len).and_then(|()| file.sync()) {
            Ok(()) => Err((e, None)),
            Err(rollback) => Err((e, Some(rollback))),
        },
    }
}

/// Runs `f`, blocking work (a write and fsync that may take milliseconds, or a long computation
/// such as a journey step's curve operations), without stalling the async
/// runtime: on a multi-threaded runtime the worker hands its other tasks to another thread
/// first (`block_in_place`), so a node waiting on its disk still plans and runs other queries;
/// elsewhere (a single-threaded test runtime, or no runtime) `f` simply runs. Synchronous, so
/// a caller cancelled meanwhile never leaves a write half done.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Creates (if absent) the append-only file at `path` and opens it for appending; a newly created
/// file's directory entry is synced, so the file survives a crash with what is synced in it.
pub fn open_append(path: &Path) -> io::Result<std::fs::File> {
    let created = !path.exists();
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    if created {
        let dir = parent_dir(path);
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(file)
}

/// The directory `path` is in, to fsync after creating or renaming it: a bare relative name's
/// parent is `""`, which is the current directory.
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
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

/// Files that fail on purpose, for testing what a failed write leaves.
#[cfg(test)]
pub(crate) mod testing {
    use std::io;

    use super::AppendFile;

    /// Writes through to a real file until told to fail.
    pub(crate) struct FailingFile {
        /// Bytes written before a write fails (`None`: writes succeed).
        fail_after: Option<usize>,
        /// The sync fails.
        fail_sync: bool,
        /// Cutting the file back fails too.
        fail_cut: bool,
        inner: Option<std::fs::File>,
    }

    impl FailingFile {
        /// Writes `n` bytes of the next line, then fails (a full disk).
        pub(crate) fn after_bytes(n: usize) -> FailingFile {
            FailingFile {
                fail_after: Some(n),
                fail_sync: false,
                fail_cut: false,
                inner: None,
            }
        }

        /// Writes whole lines but fails to sync the first one (an I/O error).
        pub(crate) fn on_sync() -> FailingFile {
            FailingFile {
                fail_after: None,
                fail_sync: true,
                fail_cut: false,
                inner: None,
            }
        }

        /// Also fails to cut the file back.
        pub(crate) fn and_cut(mut self) -> FailingFile {
            self.fail_cut = true;
            self
        }

        /// Over this file (opened for appending).
        pub(crate) fn wrapping(mut self, file: std::fs::File) -> FailingFile {
            self.inner = Some(file);
            self
        }

        fn file(&mut self) -> io::Result<&mut std::fs::File> {
            self.inner
                .as_mut()
                .ok_or_else(|| io::Error::other("no file"))
        }
    }

    impl AppendFile for FailingFile {
        fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
            let n = self.fail_after;
            let f = self.file()?;
            match n {
                Some(n) => {
                    f.append(&bytes[..n.min(bytes.len())])?;
                    Err(io::Error::other("no space left on device (test)"))
                }
                None => f.append(bytes),
            }
        }
        fn sync(&mut self) -> io::Result<()> {
            if self.fail_sync {
                self.fail_sync = false; // once
                return Err(io::Error::other("input/output error (test)"));
            }
            self.file()?.sync()
        }
        fn cut_to(&mut self, len: u64) -> io::Result<()> {
            if self.fail_cut {
                return Err(io::Error::other("read-only file system (test)"));
            }
            self.file()?.cut_to(len)
        }
    }
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
    fn last_ingest_is_the_time_in_the_file_name_not_its_mtime() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = table_dir(tmp.path(), Table::Experience);
        std::fs::create_dir_all(&dir).expect("mkdir");
        assert_eq!(last_ingest(tmp.path(), Table::Experience), None);
        // 2023-11-14T22:13:20Z and 2024-05-01T00:00:00Z; the files themselves are new (as after a
        // migration rewrote them in place).
        for name in [
            "1700000000000000000-00ff.parquet",
            "1714521600123456789-ab12cd34ef56ab78.parquet",
        ] {
            std::fs::write(dir.join(name), b"x").expect("write");
        }
        assert_eq!(
            last_ingest(tmp.path(), Table::Experience).as_deref(),
            Some("2024-05-01T00:00:00Z")
        );
        assert_eq!(ingest_time(&dir.join("notes-1.parquet")), None);
        assert_eq!(ingest_time(&dir.join("17-.parquet")), None);
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
