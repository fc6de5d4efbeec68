//! The most rows any one person holds in each of the node's Parquet files, so that a `k-only`
//! node can bound the people behind a count from the count itself (people ≥ ⌈rows / R⌉, see
//! [`cxfed_queries::cells::lower_bounds`]) instead of counting distinct people, which costs
//! far more than the query.
//!
//! ```text
//!  file ─▶ (once, in the background) max rows per person_id, max rows per case_id
//!  table:  R = Σ over its files          (a person's rows may be spread over files)
//!  join:   R = min(R_exp · C_ops, R_ops · C_exp)   (rows join on case and person)
//! ```
//!
//! A [`Snapshot`] names the files its bound covers; the node uses the bound only if the files
//! are unchanged after the query ran (files are only ever added, each atomically), and counts
//! people exactly otherwise, or while a new file's statistics are being computed.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arrow::array::{Array, StringArray};
use datafusion::parquet::arrow::ProjectionMask;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use tracing::{debug, warn};

use cxfed_queries::schema::{JOIN_KEY, PERSON_ID, Table};

use crate::storage::table_dir;

/// A file as listed: path, length and modification time.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct FileId {
    path: PathBuf,
    len: u64,
    modified: SystemTime,
}

/// The most rows one person, and one case, hold in a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStats {
    /// Most rows with the same `person_id`.
    pub per_person: u64,
    /// Most rows with the same `case_id`.
    pub per_case: u64,
}

#[derive(Debug, Clone, Copy)]
enum Entry {
    Pending,
    Ready(FileStats),
    Failed,
}

/// Per-file statistics of one data directory, computed lazily.
#[derive(Debug)]
pub struct RowBounds {
    data_dir: PathBuf,
    files: Mutex<HashMap<FileId, Entry>>,
}

/// A bound on rows per person for one query, valid for the files it was computed on.
#[derive(Debug)]
pub struct Snapshot {
    /// No person holds more rows of the query's input than this.
    pub rows_per_person: u64,
    files: Listing,
}

impl Snapshot {
    /// Whether the tables still hold exactly the files the bound was computed on.
    pub fn still_current(&self) -> bool {
        self.files.still_current()
    }
}

/// The Parquet files of some tables as listed at one moment (path, length, modification
/// time): what a query run then reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    tables: Vec<(Table, Vec<FileId>)>,
    data_dir: PathBuf,
}

impl Listing {
    /// The files of `tables` under `data_dir` now.
    pub fn of(data_dir: &Path, tables: &[Table]) -> std::io::Result<Listing> {
        let tables = tables
            .iter()
            .map(|&t| Ok((t, listing(data_dir, t)?)))
            .collect::<std::io::Result<_>>()?;
        Ok(Listing {
            tables,
            data_dir: data_dir.to_path_buf(),
        })
    }

    /// Whether the tables still hold exactly these files.
    pub fn still_current(&self) -> bool {
        self.tables
            .iter()
            .all(|(t, files)| listing(&self.data_dir, *t).is_ok_and(|now| now == *files))
    }
}

fn listing(data_dir: &Path, table: Table) -> std::io::Result<Vec<FileId>> {
    let mut out = Vec::new();
    let dir = table_dir(data_dir, table);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        if path.extension().is_none_or(|x| x != "parquet")
            || path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        {
            continue;
        }
        let meta = entry.metadata()?;
        out.push(FileId {
            path,
            len: meta.len(),
            modified: meta.modified()?,
        });
    }
    out.sort();
    Ok(out)
}

impl RowBounds {
    /// Statistics of the files under `data_dir` (nothing is read until asked).
    pub fn new(data_dir: &Path) -> Arc<RowBounds> {
        Arc::new(RowBounds {
            data_dir: data_dir.to_path_buf(),
            files: Mutex::new(HashMap::new()),
        })
    }

    /// The data directory whose files these are.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The bound for a query that reads `tables` (both: the case_id join), if every file's
    /// statistics are known. Files not yet seen are scheduled, and the answer is `None` until
    /// they are done.
    pub fn snapshot(self: &Arc<Self>, tables: &[Table]) -> Option<Snapshot> {
        let mut listings = Vec::new();
        let mut totals: Vec<(Table, FileStats)> = Vec::new();
        let mut complete = true;
        for &t in tables {
            let files = match listing(&self.data_dir, t) {
                Ok(f) => f,
                Err(e) => {
                    warn!(table = t.name(), error = %e, "cannot list data files");
                    return None;
                }
            };
            let mut total = FileStats {
                per_person: 0,
                per_case: 0,
            };
            for f in &files {
                match self.entry(f) {
                    Some(s) => {
                        total.per_person = total.per_person.saturating_add(s.per_person);
                        total.per_case = total.per_case.saturating_add(s.per_case);
                    }
                    None => complete = false,
                }
            }
            totals.push((t, total));
            listings.push((t, files));
        }
        if !complete {
            return None;
        }
        let of = |table: Table| totals.iter().find(|(t, _)| *t == table).map(|(_, s)| s);
        let rows_per_person = match (of(Table::Experience), of(Table::Operational)) {
            (Some(e), Some(o)) => (e.per_person.saturating_mul(o.per_case))
                .min(o.per_person.saturating_mul(e.per_case)),
            (Some(s), None) | (None, Some(s)) => s.per_person,
            (None, None) => return None,
        };
        Some(Snapshot {
            rows_per_person: rows_per_person.max(1),
            files: Listing {
                tables: listings,
                data_dir: self.data_dir.clone(),
            },
        })
    }

    /// The file's statistics if known; otherwise schedules computing them.
    fn entry(self: &Arc<Self>, f: &FileId) -> Option<FileStats> {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        match files.get(f) {
            Some(Entry::Ready(s)) => Some(*s),
            Some(Entry::Pending | Entry::Failed) => None,
            None => {
                files.insert(f.clone(), Entry::Pending);
                let this = Arc::clone(self);
                let f = f.clone();
                let compute = move || {
                    let result = file_stats(&f.path);
                    let entry = match result {
                        Ok(s) => {
                            debug!(file = %f.path.display(), per_person = s.per_person, per_case = s.per_case, "row bounds ready");
                            Entry::Ready(s)
                        }
                        Err(e) => {
                            warn!(file = %f.path.display(), error = %e, "cannot compute row bounds; people are counted exactly");
                            Entry::Failed
                        }
                    };
                    this.files
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(f, entry);
                };
                match tokio::runtime::Handle::try_current() {
                    Ok(rt) => {
                        rt.spawn_blocking(compute);
                    }
                    Err(_) => compute(),
                }
                None
            }
        }
    }

    /// Computes the statistics of every file of `tables` now (for tests and start-up).
    pub fn compute_all(&self, tables: &[Table]) -> std::io::Result<()> {
        for &t in tables {
            for f in listing(&self.data_dir, t)? {
                let s = file_stats(&f.path)?;
                self.files
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(f, Entry::Ready(s));
            }
        }
        Ok(())
    }
}

/// Reads a file's `person_id` and `case_id` columns and finds the most rows any one value
/// holds. Values are counted by a 64-bit hash: two values sharing a hash only make the count
/// larger, which only makes the bound weaker, never wrong.
pub fn file_stats(path: &Path) -> std::io::Result<FileStats> {
    let io = |e: datafusion::parquet::errors::ParquetError| std::io::Error::other(e.to_string());
    let file = std::fs::File::open(path)?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(io)?;
    let schema = builder.schema().clone();
    let wanted: Vec<usize> = [PERSON_ID, JOIN_KEY]
        .iter()
        .map(|name| {
            schema
                .index_of(name)
                .map_err(|e| std::io::Error::other(e.to_string()))
        })
        .collect::<Result<_, _>>()?;
    let mask = ProjectionMask::roots(builder.parquet_schema(), wanted);
    let reader = builder
        .with_projection(mask)
        .with_batch_size(64 * 1024)
        .build()
        .map_err(io)?;
    let hasher = RandomState::new();
    let mut people: HashMap<u64, u32> = HashMap::new();
    let mut cases: HashMap<u64, u32> = HashMap::new();
    for batch in reader {
        let batch = batch.map_err(|e| std::io::Error::other(e.to_string()))?;
        for (name, counts) in [(PERSON_ID, &mut people), (JOIN_KEY, &mut cases)] {
            let col = batch
                .column_by_name(name)
                .and_then(|c| c.as_any().downcast_ref::<StringArray>())
                .ok_or_else(|| std::io::Error::other(format!("{name} is not text")))?;
            for r in 0..col.len() {
                if col.is_valid(r) {
                    *counts.entry(hasher.hash_one(col.value(r))).or_insert(0) += 1;
                }
            }
        }
    }
    let max = |m: &HashMap<u64, u32>| u64::from(m.values().copied().max().unwrap_or(0));
    Ok(FileStats {
        per_person: max(&people),
        per_case: max(&cases),
    })
}
