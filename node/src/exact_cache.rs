//! Exact partials — what a node computes from its data before it suppresses or noises
//! anything — kept while the data files they were computed from are unchanged, so that a
//! repeated query (a dashboard's refresh, many analysts asking the same question) does not
//! scan and aggregate the same files again.
//!
//! ```text
//!  query ─▶ policy, ε, budget charge (every time) ─▶ files listed ─▶ hit: the exact partial
//!                                                               └▶ miss: DataFusion (+ bounding);
//!                                                                  kept if the files did not change
//!        ─▶ suppression (k-only) or fresh noise (dp), every time ─▶ partial
//! ```
//!
//! Only the exact partial is reused. The steward's policy, the ε check, the budget charge, k
//! suppression, noise and masking happen for every query as before, and each is audited as
//! before. In `dp` mode the exact partial already holds the contribution bounding: which ≤ G
//! groups and ≤ R rows each person keeps, drawn from the node's CSPRNG once and reused for as
//! long as the files are unchanged. Every release stays ε-DP for any fixed draw — removing a
//! person changes only that person's own ≤ G·R contributions whatever the draw — so releases
//! compose exactly as before, and nobody outside the node sees, predicts or steers the draw.
//!
//! An entry is valid for the exact listing (path, length, modification time) of the tables'
//! Parquet files taken before the run, and is stored only if the listing is the same after the
//! run: files are only ever added, each atomically, so an unchanged listing means the run read
//! exactly those files. The cache holds at most `[query] cache_mb` of Arrow memory (0: off),
//! and is emptied when full (simple, and bounded).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use arrow::array::RecordBatch;

use crate::row_bounds::Listing;

/// The default size, in MiB, of a node's cache of exact partials.
pub const DEFAULT_CACHE_MB: u64 = 64;

/// One cached exact partial.
#[derive(Debug)]
struct Entry {
    files: Listing,
    batches: Arc<Vec<RecordBatch>>,
    bytes: usize,
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<String, Entry>,
    bytes: usize,
}

/// A node's cache of exact partials, keyed by the query and everything the exact partial
/// depends on besides the data (the mode, k, the bounding plan).
#[derive(Debug)]
pub struct ExactCache {
    capacity: usize,
    inner: Mutex<Inner>,
}

impl ExactCache {
    /// A cache holding at most `capacity` bytes of Arrow memory (0: nothing is kept).
    pub fn new(capacity: usize) -> Self {
        ExactCache {
            capacity,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Whether anything is ever kept.
    pub fn enabled(&self) -> bool {
        self.capacity > 0
    }

    /// The exact partial for `key` if it was computed from exactly `files`.
    pub fn get(&self, key: &str, files: &Listing) -> Option<Arc<Vec<RecordBatch>>> {
        let inner = self.lock();
        let entry = inner.entries.get(key)?;
        (entry.files == *files).then(|| Arc::clone(&entry.batches))
    }

    /// Keeps `batches`, the exact partial for `key` computed from `files`, if the files are
    /// still exactly those and it fits.
    pub fn put(&self, key: String, files: Listing, batches: Arc<Vec<RecordBatch>>) {
        if !self.enabled() || !files.still_current() {
            return;
        }
        let bytes = key.len()
            + batches
                .iter()
                .map(RecordBatch::get_array_memory_size)
                .sum::<usize>();
        // One entry may take at most an eighth of the cache, so a big answer cannot flush it.
        if bytes > self.capacity / 8 {
            return;
        }
        let mut inner = self.lock();
        if let Some(old) = inner.entries.remove(&key) {
            inner.bytes -= old.bytes;
        }
        if inner.bytes + bytes > self.capacity {
            inner.entries.clear();
            inner.bytes = 0;
        }
        inner.bytes += bytes;
        inner.entries.insert(
            key,
            Entry {
                files,
                batches,
                bytes,
            },
        );
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The map holds no invariant a panicking holder could break.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};
    use cxfed_queries::schema::Table;

    fn batch(v: i64) -> Arc<Vec<RecordBatch>> {
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        let col = Arc::new(Int64Array::from(vec![v]));
        Arc::new(vec![
            RecordBatch::try_new(schema, vec![col]).expect("batch"),
        ])
    }

    fn write_file(dir: &std::path::Path, name: &str) {
        let table = crate::storage::table_dir(dir, Table::Experience);
        std::fs::create_dir_all(&table).expect("mkdir");
        std::fs::write(table.join(name), b"not read").expect("write");
    }

    #[test]
    fn a_partial_is_reused_only_for_the_same_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_file(dir.path(), "a.parquet");
        let cache = ExactCache::new(1 << 20);
        let files = Listing::of(dir.path(), &[Table::Experience]).expect("listing");
        assert!(cache.get("q", &files).is_none(), "empty at first");
        cache.put("q".into(), files.clone(), batch(7));
        assert_eq!(cache.get("q", &files).expect("hit")[0].num_rows(), 1);
        assert!(cache.get("other", &files).is_none(), "keys differ");

        // A new file: the old entry no longer matches, and a stale listing is not stored.
        write_file(dir.path(), "b.parquet");
        let now = Listing::of(dir.path(), &[Table::Experience]).expect("listing");
        assert_ne!(now, files);
        assert!(cache.get("q", &now).is_none(), "new data is read");
        cache.put("stale".into(), files.clone(), batch(1));
        assert!(
            cache.get("stale", &files).is_none(),
            "computed from old files"
        );
    }

    #[test]
    fn the_cache_stays_within_its_size_and_can_be_off() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = Listing::of(dir.path(), &[Table::Experience]).expect("listing");
        let one = batch(0)
            .iter()
            .map(RecordBatch::get_array_memory_size)
            .sum::<usize>();
        let cache = ExactCache::new(8 * (one + 8) * 3);
        for i in 0..100 {
            cache.put(format!("q{i:04}"), files.clone(), batch(i));
            assert!(cache.lock().bytes <= cache.capacity);
        }
        assert!(!cache.is_empty() && cache.len() < 100);

        let off = ExactCache::new(0);
        off.put("q".into(), files.clone(), batch(1));
        assert!(off.is_empty() && !off.enabled());
    }
}
