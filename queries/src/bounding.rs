//! Contribution bounding for the `dp` partial, run over the stream of row-level values that
//! [`crate::privacy::DpPartial::rows`] produces. It computes exactly what the tail of the DP
//! partial plan (`GROUP BY keys, person` → keep ≤ G groups per person → `GROUP BY keys`)
//! computes, in one hash pass over the rows, with no sort and no window.
//!
//! ```text
//!  row batches ─▶ per (person, group): Σ of each row value        (one hash lookup per row)
//!  finish      ─▶ per person: ≤ G of its groups, chosen uniformly  (CSPRNG; only when > G),
//!                 among the groups where the person adds to some statistic first
//!              ─▶ per kept (person, group): a mean's rows scaled to R ([`Mean`]), a histogram's
//!                 rows sampled to R ([`Share`]), then each Σ clamped to its cap (count ≤ R,
//!                 |sum| ≤ R·h …)
//!              ─▶ per group: Σ of the capped values, persons = kept people
//! ```
//!
//! Which groups a person keeps is drawn from the node's CSPRNG at `finish`, after every row
//! has been read, so neither the coordinator nor the analyst can predict or steer it. The
//! state is one entry per person and one slot per (person, group); [`Bounder::allocated`]
//! reports its size so the node can hold it against its memory pool.
//!
//! `Stat` is each statistic's per-person (L1) bound, which the aggregate modules
//! ([`crate::percentile`], and [`crate::privacy`] for the others) declare and `privacy` turns
//! into noise scales.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, Int64Array, RecordBatch, UInt32Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::logical_expr::EmitTo;
use datafusion::physical_plan::aggregates::group_values::{GroupValues, new_group_values};
use datafusion::physical_plan::aggregates::order::GroupOrdering;

use crate::dp::{RandomSource, uniform_below};
use crate::rules::QueryError;

/// The per-person bound (L1) of a statistic, and the columns it is released in (one for a
/// count or a sum; every bucket of a percentile's histogram, whose buckets are disjoint):
/// what decides its share of ε (see [`crate::privacy`]).
#[derive(Debug, Clone)]
pub(crate) struct Stat {
    pub(crate) names: Vec<String>,
    pub(crate) sensitivity: u64,
}

/// The clamp applied to one statistic of one (person, group) before it is summed per group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cap {
    /// Smallest value one person may contribute to one group.
    pub lo: i64,
    /// Largest value one person may contribute to one group.
    pub hi: i64,
}

/// Statistic columns whose per-person values in one group are capped *jointly* (the buckets
/// of a histogram, see [`crate::percentile`]): when a person's values there (row counts) add
/// up to more than `total`, `total` of the person's rows are kept, drawn uniformly without
/// replacement (CSPRNG), so that together they stay within `total` (their L1 norm) and the
/// person's rows are represented as a sample, whatever their spread. Applied before the
/// per-column [`Cap`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    /// Index of the first column (among the statistics).
    pub first: usize,
    /// Number of columns.
    pub len: usize,
    /// Largest sum of the columns one person may contribute to one group.
    pub total: i64,
}

impl Share {
    /// Keeps `total` of the rows counted in `values` (non-negative counts), drawn uniformly
    /// without replacement from `rng`, when they are more.
    pub fn apply(&self, values: &mut [i64], rng: &mut dyn RandomSource) -> Result<(), QueryError> {
        if values.iter().any(|v| *v < 0) {
            return Err(internal("a histogram count is negative"));
        }
        let mut left: i64 = values
            .iter()
            .try_fold(0i64, |a, v| a.checked_add(*v))
            .ok_or_else(|| internal("a person's rows overflow"))?;
        if left <= self.total {
            return Ok(());
        }
        let mut kept = vec![0i64; values.len()];
        for _ in 0..self.total.max(0) {
            // A uniform one of the rows not drawn yet.
            let mut u = uniform_below(rng, left as u64).map_err(internal)? as i64;
            for (v, k) in values.iter_mut().zip(kept.iter_mut()) {
                if u < *v {
                    *v -= 1;
                    *k += 1;
                    break;
                }
                u -= *v;
            }
            left -= 1;
        }
        values.copy_from_slice(&kept);
        Ok(())
    }
}

/// The statistic columns of a mean (AVG, VARIANCE, STDDEV: a row count and the sums over the
/// same rows): when a person has more than `r` rows in a group, the person contributes the
/// *mean* of those rows, `r` times — the count set to `r` and each sum scaled by `r/count`
/// with unbiased random rounding — rather than clamped sums, which would push a person with
/// many rows towards the ends of the measure's range. Within the same bounds as the clamps
/// (|sum| ≤ count·h before, so ≤ r·h after), so the sensitivity is unchanged. Applied before
/// the per-column [`Cap`]s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mean {
    /// Index of the row-count column (among the statistics).
    pub count: usize,
    /// Indexes of the sums over the same rows.
    pub sums: Vec<usize>,
    /// Rows one person may contribute to one group (R).
    pub r: i64,
}

impl Mean {
    /// Scales `values` (one person's statistics in one group) to `r` rows when the person has
    /// more.
    pub fn apply(&self, values: &mut [i64], rng: &mut dyn RandomSource) -> Result<(), QueryError> {
        let n = values.get(self.count).copied().unwrap_or(0);
        if n <= self.r || self.r <= 0 {
            return Ok(());
        }
        for &j in &self.sums {
            let Some(v) = values.get_mut(j) else {
                return Err(internal("a mean's sum column is missing"));
            };
            *v = scale_round(*v, self.r, n, rng)?;
        }
        values[self.count] = self.r;
        Ok(())
    }
}

/// `v·r/n` rounded to a neighbouring integer at random, up with probability equal to the
/// fraction, so that its expectation is exactly `v·r/n` (`n` > 0).
fn scale_round(v: i64, r: i64, n: i64, rng: &mut dyn RandomSource) -> Result<i64, QueryError> {
    let num = i128::from(v) * i128::from(r);
    let den = i128::from(n);
    let floor = num.div_euclid(den);
    let rem = num.rem_euclid(den);
    let up = rem > 0 && i128::from(uniform_below(rng, n as u64).map_err(internal)?) < rem;
    i64::try_from(floor + i128::from(up)).map_err(|_| internal("a scaled sum overflows"))
}

/// What the bounding pass needs to know about the row stream and its output.
#[derive(Debug, Clone)]
pub struct BoundingSpec {
    /// Number of leading group-key columns in the row stream.
    pub groups: usize,
    /// Per statistic column (after the keys and the person column), its per-person cap.
    pub caps: Vec<Cap>,
    /// Groups of statistic columns capped jointly, before `caps`.
    pub shares: Vec<Share>,
    /// Means whose rows are scaled to R per person, before `caps`.
    pub means: Vec<Mean>,
    /// Groups one person may contribute to (G).
    pub max_groups: u64,
    /// The output schema: group keys, one column per statistic, then the person count.
    pub output: SchemaRef,
}

const NONE: u32 = u32::MAX;

/// One (person, group) pair and the next pair of the same person.
#[derive(Debug, Clone, Copy)]
struct Slot {
    group: u32,
    next: u32,
}

/// The bounding pass: feed it row batches with [`Bounder::push`], then [`Bounder::finish`].
///
/// Group keys and people are numbered by DataFusion's own hash-aggregation tables
/// ([`GroupValues`]: exact, specialised per type, text hashed in place from its Arrow buffers),
/// one vectorised call per batch, so that each row then costs a slot lookup and a few adds.
pub struct Bounder {
    spec: Arc<BoundingSpec>,
    keys: Option<Box<dyn GroupValues>>,
    persons: Option<Box<dyn GroupValues>>,
    /// Group ids of the current batch's rows (reused between batches).
    group_ids: Vec<usize>,
    /// Person ids of the current batch's rows (reused between batches).
    person_ids: Vec<usize>,
    heads: Vec<u32>,
    slots: Vec<Slot>,
    values: Vec<i64>,
    /// Bytes held by the two tables after the last batch.
    tables: usize,
}

impl std::fmt::Debug for Bounder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never prints people or values.
        f.debug_struct("Bounder")
            .field("groups", &self.keys.as_ref().map_or(0, |k| k.len()))
            .field("persons", &self.heads.len())
            .field("slots", &self.slots.len())
            .finish()
    }
}

fn internal(e: impl std::fmt::Display) -> QueryError {
    QueryError::Internal(format!("contribution bounding: {e}"))
}

/// A DataFusion group table for rows of `columns`' types.
fn table(columns: &[ArrayRef]) -> Result<Box<dyn GroupValues>, QueryError> {
    let fields: Vec<Field> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| Field::new(format!("c{i}"), c.data_type().clone(), true))
        .collect();
    new_group_values(Arc::new(Schema::new(fields)), &GroupOrdering::None).map_err(internal)
}

impl Bounder {
    /// A bounding pass for `spec`.
    pub fn new(spec: Arc<BoundingSpec>) -> Self {
        Bounder {
            spec,
            keys: None,
            persons: None,
            group_ids: Vec::new(),
            person_ids: Vec::new(),
            heads: Vec::new(),
            slots: Vec::new(),
            values: Vec::new(),
            tables: 0,
        }
    }

    /// Bytes of state held so far (an estimate that counts every allocation it makes).
    pub fn allocated(&self) -> usize {
        self.tables
            + (self.group_ids.capacity() + self.person_ids.capacity())
                * std::mem::size_of::<usize>()
            + self.heads.capacity() * 4
            + self.slots.capacity() * std::mem::size_of::<Slot>()
            + self.values.capacity() * 8
    }

    /// Adds one batch of rows: group keys, person, then one Int64 column per statistic.
    pub fn push(&mut self, batch: &RecordBatch) -> Result<(), QueryError> {
        let ng = self.spec.groups;
        let ns = self.spec.caps.len();
        if batch.num_columns() != ng + 1 + ns {
            return Err(internal(format!(
                "expected {} columns, got {}",
                ng + 1 + ns,
                batch.num_columns()
            )));
        }
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let stats: Vec<&Int64Array> = batch.columns()[ng + 1..]
            .iter()
            .map(|c| {
                c.as_any()
                    .downcast_ref::<Int64Array>()
                    .ok_or_else(|| internal(format!("a statistic is {}", c.data_type())))
            })
            .collect::<Result<_, _>>()?;
        self.group_ids.clear();
        if ng > 0 {
            let key_cols = &batch.columns()[..ng];
            let keys = match &mut self.keys {
                Some(k) => k,
                slot @ None => slot.insert(table(key_cols)?),
            };
            keys.intern(key_cols, &mut self.group_ids)
                .map_err(internal)?;
        } else {
            self.group_ids.resize(batch.num_rows(), 0);
        }
        let person_col = &batch.columns()[ng..=ng];
        let persons = match &mut self.persons {
            Some(p) => p,
            slot @ None => slot.insert(table(person_col)?),
        };
        self.person_ids.clear();
        persons
            .intern(person_col, &mut self.person_ids)
            .map_err(internal)?;
        let n_persons = persons.len();
        let n_groups = self.keys.as_ref().map_or(1, |k| k.len());
        if n_persons >= NONE as usize || n_groups >= NONE as usize {
            return Err(internal("too many people or groups"));
        }
        self.tables = persons.size() + self.keys.as_ref().map_or(0, |k| k.size());
        self.heads.resize(n_persons, NONE);
        for r in 0..batch.num_rows() {
            // Both below NONE (checked above).
            let group = self.group_ids[r] as u32;
            let person = self.person_ids[r];
            // A person's slots are few (≤ their groups): a list walk beats a second map.
            let mut s = self.heads[person];
            while s != NONE && self.slots[s as usize].group != group {
                s = self.slots[s as usize].next;
            }
            if s == NONE {
                s = u32::try_from(self.slots.len())
                    .ok()
                    .filter(|&s| s != NONE)
                    .ok_or_else(|| internal("too many slots"))?;
                self.slots.push(Slot {
                    group,
                    next: self.heads[person],
                });
                self.heads[person] = s;
                self.values.extend(std::iter::repeat_n(0, ns));
            }
            let base = s as usize * ns;
            for (j, col) in stats.iter().enumerate() {
                if col.is_valid(r) {
                    let v = &mut self.values[base + j];
                    *v = v
                        .checked_add(col.value(r))
                        .ok_or_else(|| internal("a person's sum overflows"))?;
                }
            }
        }
        Ok(())
    }

    /// Chooses at most G groups per person (uniformly, from `rng`), clamps each kept
    /// (person, group) to its caps, and sums per group. Groups no kept person reached are
    /// absent, except the single group of a query without GROUP BY, which is always present.
    pub fn finish(mut self, rng: &mut dyn RandomSource) -> Result<RecordBatch, QueryError> {
        let ns = self.spec.caps.len();
        let width = ns + 1;
        // The people's table is not needed any more.
        self.persons = None;
        let key_columns = match self.keys.as_mut() {
            Some(k) => Some(k.emit(EmitTo::All).map_err(internal)?),
            None => None,
        };
        let n_groups = match (&key_columns, self.spec.groups) {
            (_, 0) => 1,
            (Some(cols), _) => cols.first().map_or(0, |c| c.len()),
            (None, _) => 0,
        };
        let mut acc = vec![0i64; n_groups * width];
        let g = usize::try_from(self.spec.max_groups.max(1)).unwrap_or(usize::MAX);
        let mut mine: Vec<u32> = Vec::new();
        let mut scratch: Vec<i64> = Vec::with_capacity(ns);
        for &head in &self.heads {
            mine.clear();
            let mut s = head;
            while s != NONE {
                mine.push(s);
                s = self.slots[s as usize].next;
            }
            if mine.len() > g {
                // The groups where the person adds to some statistic first (a group where all
                // their rows are NULL for every aggregate would waste their one slot), then a
                // uniform G-subset within each part: the first G of a partial Fisher–Yates
                // shuffle.
                let values = &self.values;
                let adds = |s: u32| {
                    values[s as usize * ns..(s as usize + 1) * ns]
                        .iter()
                        .any(|v| *v != 0)
                };
                let split = partition_in_place(&mut mine, adds);
                let (front, back) = mine.split_at_mut(split);
                let taken = sample_prefix(front, g, rng)?;
                if taken < g {
                    sample_prefix(back, g - taken, rng)?;
                }
                mine.truncate(g);
            }
            for &s in &mine {
                let slot = self.slots[s as usize];
                let out = slot.group as usize * width;
                scratch.clear();
                scratch.extend_from_slice(&self.values[s as usize * ns..(s as usize + 1) * ns]);
                for share in &self.spec.shares {
                    if let Some(v) = scratch.get_mut(share.first..share.first + share.len) {
                        share.apply(v, rng)?;
                    }
                }
                for mean in &self.spec.means {
                    mean.apply(&mut scratch, rng)?;
                }
                for (j, (v, cap)) in scratch.iter().zip(&self.spec.caps).enumerate() {
                    let capped = (*v).clamp(cap.lo, cap.hi);
                    acc[out + j] = acc[out + j]
                        .checked_add(capped)
                        .ok_or_else(|| internal("a group's sum overflows"))?;
                }
                acc[out + ns] += 1;
            }
        }
        // Group ids are below NONE (checked as they were made).
        let keep: Vec<u32> = (0..n_groups)
            .filter(|&i| self.spec.groups == 0 || acc[i * width + ns] > 0)
            .map(|i| i as u32)
            .collect();
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(self.spec.groups + width);
        if self.spec.groups > 0 {
            let Some(keys) = key_columns else {
                // No row at all: the key columns are empty arrays of the output's types.
                let types = self.spec.output.fields()[..self.spec.groups]
                    .iter()
                    .map(|f| f.data_type().clone());
                return finish_empty(&self.spec, types);
            };
            let indices = UInt32Array::from(keep.clone());
            for (k, field) in keys.iter().zip(self.spec.output.fields()) {
                let taken = arrow::compute::take(k, &indices, None).map_err(internal)?;
                // The table may hand a key back in another layout than the output's.
                columns.push(if taken.data_type() == field.data_type() {
                    taken
                } else {
                    arrow::compute::cast(&taken, field.data_type()).map_err(internal)?
                });
            }
        }
        for j in 0..width {
            columns.push(Arc::new(Int64Array::from_iter_values(
                keep.iter().map(|&i| acc[i as usize * width + j]),
            )));
        }
        RecordBatch::try_new(Arc::clone(&self.spec.output), columns).map_err(internal)
    }
}

/// Moves the items for which `keep` holds to the front, returning how many there are.
fn partition_in_place(items: &mut [u32], keep: impl Fn(u32) -> bool) -> usize {
    let mut front = 0;
    for i in 0..items.len() {
        if keep(items[i]) {
            items.swap(front, i);
            front += 1;
        }
    }
    front
}

/// Shuffles a uniform `k`-subset of `items` into its first `min(k, len)` places (partial
/// Fisher–Yates), returning how many that is.
fn sample_prefix(
    items: &mut [u32],
    k: usize,
    rng: &mut dyn RandomSource,
) -> Result<usize, QueryError> {
    let k = k.min(items.len());
    for i in 0..k {
        let rest = (items.len() - i) as u64;
        let j = i + uniform_below(rng, rest).map_err(internal)? as usize;
        items.swap(i, j);
    }
    Ok(k)
}

fn finish_empty(
    spec: &BoundingSpec,
    types: impl Iterator<Item = DataType>,
) -> Result<RecordBatch, QueryError> {
    let mut columns: Vec<ArrayRef> = types.map(|t| arrow::array::new_empty_array(&t)).collect();
    for _ in 0..=spec.caps.len() {
        columns.push(Arc::new(Int64Array::from(Vec::<i64>::new())));
    }
    RecordBatch::try_new(Arc::clone(&spec.output), columns).map_err(internal)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::privacy::DpParams;
    use crate::schema::Table;
    use crate::testdata::{all, batch, context};
    use crate::validate::approve;
    use arrow::array::AsArray;
    use arrow::datatypes::Int64Type;
    use futures::StreamExt;

    /// A seeded source, for tests only.
    struct Seeded(u64);
    impl RandomSource for Seeded {
        fn next_u64(&mut self) -> Result<u64, crate::dp::RandomFailure> {
            // SplitMix64.
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            Ok(z ^ (z >> 31))
        }
    }

    fn params(g: u64, r: u64) -> DpParams {
        DpParams {
            epsilon: 1.0,
            delta: 1e-6,
            max_groups_per_person: g,
            max_rows_per_person: r,
            k: 10,
        }
    }

    /// Rows: (person, channel, trust).
    fn experience(rows: &[(String, &str, &str)]) -> RecordBatch {
        let persons: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
        let channels: Vec<&str> = rows.iter().map(|r| r.1).collect();
        let trust: Vec<&str> = rows.iter().map(|r| r.2).collect();
        batch(
            Table::Experience,
            &[
                ("person_id", all(&persons)),
                ("channel", all(&channels)),
                ("trust", all(&trust)),
            ],
        )
    }

    async fn both(sql: &str, rows: RecordBatch, p: DpParams) -> (Vec<RecordBatch>, RecordBatch) {
        let ctx = context(vec![rows], vec![]);
        let q = approve(&ctx.state(), sql).await.expect("approve");
        let dp = q.dp_partial(&p).expect("dp partial");
        let reference = ctx
            .execute_logical_plan(dp.plan.clone())
            .await
            .expect("plan")
            .collect()
            .await
            .expect("run");
        let mut stream = ctx
            .execute_logical_plan(dp.rows.clone())
            .await
            .expect("rows")
            .execute_stream()
            .await
            .expect("stream");
        let mut b = Bounder::new(Arc::clone(&dp.bounding));
        while let Some(batch) = stream.next().await {
            b.push(&batch.expect("batch")).expect("push");
        }
        (reference, b.finish(&mut Seeded(7)).expect("finish"))
    }

    /// The rows of `batches` as text, sorted, so two results compare whatever their order.
    fn sorted(batches: &[RecordBatch]) -> Vec<String> {
        let mut out = Vec::new();
        for b in batches {
            for r in 0..b.num_rows() {
                let cells: Vec<String> = b
                    .columns()
                    .iter()
                    .map(|c| arrow::util::display::array_value_to_string(c, r).expect("cell"))
                    .collect();
                out.push(cells.join("|"));
            }
        }
        out.sort();
        out
    }

    #[tokio::test]
    async fn equals_the_partial_plan_when_nobody_exceeds_the_group_cap() {
        // Person p0 has three rows in two groups; R = 2 caps its phone count at 2, and its
        // phone sums (centred: 2, −1, −1; squares 4, 1, 1) scale by 2/3 to whole numbers, so
        // the plan's truncation and the nodes' random rounding agree.
        let mut rows = vec![
            ("p0".to_string(), "phone", "5"),
            ("p0".to_string(), "phone", "2"),
            ("p0".to_string(), "phone", "2"),
            ("p0".to_string(), "website", "2"),
        ];
        for i in 1..40 {
            let ch = ["phone", "website", "email"][i % 3];
            rows.push((format!("p{i}"), ch, ["1", "2", "3", "4", "5"][i % 5]));
        }
        for sql in [
            "SELECT channel, COUNT(*), AVG(trust), STDDEV(trust), COUNT(DISTINCT person_id) FROM experience GROUP BY channel",
            "SELECT COUNT(*), SUM(trust) FROM experience",
            "SELECT channel, COUNT(*) FILTER (WHERE trust >= 4) FROM experience WHERE channel <> 'email' GROUP BY channel",
        ] {
            let (reference, fast) = both(sql, experience(&rows), params(2, 2)).await;
            assert_eq!(sorted(&reference), sorted(&[fast]), "{sql}");
        }
    }

    #[test]
    fn a_heavy_persons_mean_is_added_r_times_with_unbiased_rounding() {
        // Count 3 rows, sum 1, sum of squares 7; R = 2: the count becomes 2 and the sums 2/3
        // and 14/3, rounded to a neighbour with the fraction as the chance of rounding up.
        let mean = Mean {
            count: 0,
            sums: vec![1, 2],
            r: 2,
        };
        let mut rng = Seeded(11);
        let (mut s, mut q) = (0i64, 0i64);
        let draws = 30_000;
        for _ in 0..draws {
            let mut v = [3, 1, 7];
            mean.apply(&mut v, &mut rng).expect("apply");
            assert_eq!(v[0], 2);
            assert!(v[1] == 0 || v[1] == 1, "{v:?}");
            assert!(v[2] == 4 || v[2] == 5, "{v:?}");
            s += v[1];
            q += v[2];
        }
        let (s, q) = (s as f64 / draws as f64, q as f64 / draws as f64);
        assert!((s - 2.0 / 3.0).abs() < 0.02, "mean of the scaled sum {s}");
        assert!(
            (q - 14.0 / 3.0).abs() < 0.02,
            "mean of the scaled squares {q}"
        );
        // Negative sums round the same way (down is towards −∞); at most R rows, nothing moves.
        let mut v = [4, -3, 9];
        Mean {
            r: 4,
            ..mean.clone()
        }
        .apply(&mut v, &mut rng)
        .expect("apply");
        assert_eq!(v, [4, -3, 9]);
        let mut v = [3, -3, 9];
        mean.apply(&mut v, &mut rng).expect("apply");
        assert_eq!(v, [2, -2, 6]);
    }

    #[tokio::test]
    async fn a_query_without_rows_gives_one_zero_row_without_group_by_and_none_with() {
        let rows = vec![("p0".to_string(), "phone", "5")];
        let (_, fast) = both(
            "SELECT COUNT(*) FROM experience WHERE channel = 'paper'",
            experience(&rows),
            params(1, 1),
        )
        .await;
        assert_eq!(fast.num_rows(), 1);
        let (_, fast) = both(
            "SELECT channel, COUNT(*) FROM experience WHERE channel = 'paper' GROUP BY channel",
            experience(&rows),
            params(1, 1),
        )
        .await;
        assert_eq!(fast.num_rows(), 0);
    }

    #[tokio::test]
    async fn caps_hold_for_one_person_with_ten_thousand_rows_across_many_groups() {
        // "heavy" holds 10,000 rows spread over all nine channels; 500 people hold one row.
        let channels = [
            "website",
            "mobile_app",
            "email",
            "live_chat",
            "phone",
            "automated_phone",
            "in_person",
            "postal_mail",
            "paper",
        ];
        let mut rows: Vec<(String, &str, &str)> = (0..10_000)
            .map(|i| ("heavy".to_string(), channels[i % 9], "5"))
            .collect();
        rows.extend((0..500).map(|i| (format!("p{i}"), channels[i % 9], "1")));
        let sql = "SELECT channel, COUNT(*) AS n, SUM(trust) AS s, COUNT(DISTINCT person_id) AS p FROM experience GROUP BY channel";
        for (g, r) in [(1u64, 1u64), (2, 3), (9, 5)] {
            let (_, fast) = both(sql, experience(&rows), params(g, r)).await;
            let col = |name: &str| {
                fast.column_by_name(name)
                    .expect("column")
                    .as_primitive::<Int64Type>()
                    .values()
                    .to_vec()
            };
            let (n, persons, distinct) =
                (col("__a0_n"), col(crate::partial::PERSONS), col("__a2_n"));
            let light: Vec<i64> = (0..9)
                .map(|c| (0..500).filter(|i| i % 9 == c).count() as i64)
                .collect();
            let total_light: i64 = light.iter().sum();
            // The heavy person adds at most R rows to at most G groups, and 1 person to each.
            let extra_rows: i64 = n.iter().sum::<i64>() - total_light;
            let extra_people: i64 = persons.iter().sum::<i64>() - total_light;
            assert_eq!(extra_people, g as i64, "G = {g}");
            assert_eq!(extra_rows, (g * r) as i64, "G = {g}, R = {r}");
            assert_eq!(
                distinct, persons,
                "COUNT(DISTINCT person) counts kept people"
            );
            // The centred sum (trust 1..5 → centre 3, h = 2): light rows add −2 each, the heavy
            // person +2 per kept row, capped at R·h per group.
            let s = col("__a1_s");
            assert_eq!(s.iter().sum::<i64>(), -2 * total_light + 2 * (g * r) as i64);
        }
    }

    #[test]
    fn caps_hold_for_a_heavy_person_keyed_by_number_or_text() {
        // Group key, person, one count statistic: "heavy" holds 10,000 rows over 50 groups.
        for text in [false, true] {
            let person_type = if text {
                DataType::Utf8View
            } else {
                DataType::Int64
            };
            let output = Arc::new(Schema::new(vec![
                Field::new("__g0", DataType::Int64, false),
                Field::new("__a0_n", DataType::Int64, false),
                Field::new(crate::partial::PERSONS, DataType::Int64, false),
            ]));
            let spec = Arc::new(BoundingSpec {
                groups: 1,
                caps: vec![Cap {
                    lo: i64::MIN,
                    hi: 3,
                }],
                shares: vec![],
                means: vec![],
                max_groups: 2,
                output,
            });
            let mut b = Bounder::new(spec);
            let n = 10_000 + 200;
            let groups: Vec<i64> = (0..n).map(|i| (i % 50) as i64).collect();
            // Person 0 is the heavy one; 200 others hold one row each.
            let ids: Vec<i64> = (0..n)
                .map(|i| if i < 10_000 { 0 } else { i as i64 })
                .collect();
            let person: ArrayRef = if text {
                Arc::new(arrow::array::StringViewArray::from_iter_values(
                    ids.iter().map(|i| format!("p{i}")),
                ))
            } else {
                Arc::new(Int64Array::from(ids))
            };
            let schema = Arc::new(Schema::new(vec![
                Field::new("g", DataType::Int64, false),
                Field::new("p", person_type, false),
                Field::new("n", DataType::Int64, false),
            ]));
            // In two batches, so state carries over between pushes.
            let all = RecordBatch::try_new(
                schema,
                vec![
                    Arc::new(Int64Array::from(groups)),
                    person,
                    Arc::new(Int64Array::from(vec![1i64; n])),
                ],
            )
            .expect("batch");
            b.push(&all.slice(0, 6_000)).expect("push");
            b.push(&all.slice(6_000, n - 6_000)).expect("push");
            let out = b.finish(&mut Seeded(3)).expect("finish");
            let sum = |j: usize| -> i64 {
                out.column(j)
                    .as_primitive::<Int64Type>()
                    .values()
                    .iter()
                    .sum()
            };
            // The heavy person: ≤ 2 groups, ≤ 3 rows each; the others: 1 row, 1 group each.
            assert_eq!(sum(2), 200 + 2, "people (text = {text})");
            assert_eq!(sum(1), 200 + 2 * 3, "rows (text = {text})");
        }
    }

    #[tokio::test]
    async fn which_groups_a_person_keeps_is_uniform() {
        // One person in three groups, G = 1: each group kept about a third of the time.
        let rows = vec![
            ("a".to_string(), "phone", "5"),
            ("a".to_string(), "email", "5"),
            ("a".to_string(), "paper", "5"),
        ];
        let ctx = context(vec![experience(&rows)], vec![]);
        let q = approve(
            &ctx.state(),
            "SELECT channel, COUNT(*) FROM experience GROUP BY channel",
        )
        .await
        .expect("approve");
        let dp = q.dp_partial(&params(1, 1)).expect("dp");
        let rows = ctx
            .execute_logical_plan(dp.rows.clone())
            .await
            .expect("rows")
            .collect()
            .await
            .expect("run");
        let mut seen = std::collections::BTreeMap::new();
        let mut rng = Seeded(1);
        for _ in 0..3000 {
            let mut b = Bounder::new(Arc::clone(&dp.bounding));
            for r in &rows {
                b.push(r).expect("push");
            }
            let out = b.finish(&mut rng).expect("finish");
            assert_eq!(out.num_rows(), 1);
            let ch = arrow::util::display::array_value_to_string(out.column(0), 0).expect("ch");
            *seen.entry(ch).or_insert(0u32) += 1;
        }
        assert_eq!(seen.len(), 3);
        for (ch, n) in seen {
            assert!((900..=1100).contains(&n), "{ch} kept {n} of 3000 times");
        }
    }

    #[tokio::test]
    async fn a_person_keeps_a_group_they_add_to_before_one_they_do_not() {
        // One person, G = 1: trust in phone and email, none in paper. AVG(trust) reads nothing
        // from paper, so the one group kept is phone or email, about half the time each.
        let rows = vec![
            ("a".to_string(), "phone", "5"),
            ("a".to_string(), "email", "4"),
            ("a".to_string(), "paper", ""),
        ];
        let ctx = context(vec![experience(&rows)], vec![]);
        let q = approve(
            &ctx.state(),
            "SELECT channel, AVG(trust) FROM experience GROUP BY channel",
        )
        .await
        .expect("approve");
        let dp = q.dp_partial(&params(1, 1)).expect("dp");
        let rows = ctx
            .execute_logical_plan(dp.rows.clone())
            .await
            .expect("rows")
            .collect()
            .await
            .expect("run");
        let mut seen = std::collections::BTreeMap::new();
        let mut rng = Seeded(5);
        for _ in 0..2000 {
            let mut b = Bounder::new(Arc::clone(&dp.bounding));
            for r in &rows {
                b.push(r).expect("push");
            }
            let out = b.finish(&mut rng).expect("finish");
            assert_eq!(out.num_rows(), 1);
            let ch = arrow::util::display::array_value_to_string(out.column(0), 0).expect("ch");
            *seen.entry(ch).or_insert(0u32) += 1;
        }
        assert_eq!(
            seen.keys().map(String::as_str).collect::<Vec<_>>(),
            ["email", "phone"]
        );
        for (ch, n) in seen {
            assert!((900..=1100).contains(&n), "{ch} kept {n} of 2000 times");
        }
    }
}
