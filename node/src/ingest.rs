//! `cxfed ingest`: validate a CSV or Parquet file against the CX schema and add it to the data
//! directory as one new Parquet file, atomically.
//!
//! # What is checked
//! Every value of every row, against [`cxfed_queries::schema`]: the header (exactly the schema's
//! column names, in order), types, vocabularies, ranges, ISO dates (`YYYY-MM-DD`, real calendar
//! dates), booleans (`true` / `false`), required values, agency codes, free text (non-empty, at
//! most 120 characters, no control characters) and `closed_date >= opened_date`. An empty CSV
//! field is a null. Every problem is reported as `FILE:LINE:COLUMN: reason`, where LINE is the
//! 1-based line of the CSV file an editor shows (the header is line 1; `\n`, `\r\n` and a lone
//! `\r` each end a line, empty lines count, and a value is on the line its field starts on, after
//! any quoted multi-line field before it: see `LineReader`) and COLUMN the 1-based column
//! number. For Parquet input LINE is the 1-based row number (the reason says so), and problems
//! with the file's schema are reported on line 0.
//!
//! # How it is written
//! The input is read once, in chunks of [`CHUNK_ROWS`] rows that are validated, converted to
//! Arrow arrays in the exact [`Table::arrow_schema`] and streamed into a hidden temporary file
//! (`.<name>.<random>.tmp`) in the table directory. When the whole input is valid the temporary
//! file is flushed, fsynced and renamed to `<data_dir>/<table>/<unix_nanos>-<random hex>.parquet`,
//! then the directory is fsynced. On any error the temporary file (and any directory this call
//! created) is removed: the data directory is left as it was. A crash midway can leave at most a
//! hidden `.tmp` file, which readers (they list `*.parquet`, see [`crate::storage`]) never see.
//!
//! [`migrate`] (module `ingest::migrate`) brings an older data directory to the current schema
//! version with the same validation, file by file.

use std::fmt::{self, Write as _};
use std::fs::File;
use std::io::{self, IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, BooleanBuilder, Date32Array, Date32Builder,
    Float64Array, Int8Builder, Int32Builder, Int64Array, RecordBatch, StringArray, StringBuilder,
};
use arrow::datatypes::{DataType, Date32Type, Float64Type, Int64Type, SchemaRef};
use arrow::error::ArrowError;
use cxfed_queries::schema::{Column, ColumnType, Domain, Table};
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use datafusion::parquet::basic::{Compression, ZstdLevel};
use datafusion::parquet::errors::ParquetError;
use datafusion::parquet::file::properties::WriterProperties;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::storage;

mod migrate;
pub use migrate::{Migration, migrate};

/// Rows validated and converted per Arrow batch.
pub const CHUNK_ROWS: usize = 64 * 1024;
/// Rows per Parquet row group of an ingested file.
pub const ROW_GROUP_ROWS: usize = 1024 * 1024;
/// How many errors [`IngestError::Invalid`] keeps and lists (the rest are only counted).
pub const MAX_LISTED_ERRORS: usize = 100;
/// Longest [`Domain::FreeText`] value, in characters.
pub const MAX_FREE_TEXT_CHARS: usize = 120;

/// Date pairs that must be ordered: (later, earlier), by column name.
const ORDERED_DATES: &[(&str, &str)] = &[("closed_date", "opened_date")];

/// What a successful ingest did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestReport {
    /// The table the rows were added to.
    pub table: Table,
    /// Number of rows ingested.
    pub rows: u64,
    /// The new Parquet file.
    pub path: PathBuf,
}

/// One problem in an input file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowError {
    /// 1-based CSV line (header = 1), or 1-based Parquet row (0: the Parquet schema).
    pub line: u64,
    /// 1-based column number in the input file.
    pub column: usize,
    /// What is wrong; starts with the column name.
    pub reason: String,
}

/// Why an ingest (or a validation) failed. Nothing was written in any case.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The file does not match the schema. Lists the first [`MAX_LISTED_ERRORS`] problems.
    #[error("{}", format_invalid(file, errors, *total))]
    Invalid {
        /// The input file.
        file: PathBuf,
        /// The first problems, in file order.
        errors: Vec<RowError>,
        /// How many problems there are in all.
        total: u64,
    },
    /// Reading the input or writing the data directory failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The Parquet library failed (unreadable input, or while writing the new file).
    #[error("{}: {source}", path.display())]
    Parquet {
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        source: ParquetError,
    },
    /// An Arrow conversion failed.
    #[error("{}: {source}", path.display())]
    Arrow {
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        source: ArrowError,
    },
}

fn format_invalid(file: &Path, errors: &[RowError], total: u64) -> String {
    let mut s = String::new();
    let f = file.display();
    for e in errors {
        let _ = writeln!(s, "{f}:{}:{}: {}", e.line, e.column, e.reason);
    }
    let listed = errors.len() as u64;
    if total > listed {
        let more = total - listed;
        let _ = writeln!(s, "... and {more} more error{}", plural(more));
    }
    let _ = write!(
        s,
        "{f}: {total} error{}; nothing was ingested",
        plural(total)
    );
    s
}

fn plural(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> IngestError + '_ {
    move |source| IngestError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn pq_err(path: &Path) -> impl FnOnce(ParquetError) -> IngestError + '_ {
    move |source| IngestError::Parquet {
        path: path.to_path_buf(),
        source,
    }
}

fn arrow_err(path: &Path) -> impl FnOnce(ArrowError) -> IngestError + '_ {
    move |source| IngestError::Arrow {
        path: path.to_path_buf(),
        source,
    }
}

/// Validates `file` (CSV, or Parquet if its name ends in `.parquet`) as rows of `table` and adds
/// it to `data_dir` as one new Parquet file, atomically. `data_dir` and the table directory are
/// created if missing. Shows a progress bar on stderr when `progress` is true, stderr is a
/// terminal and `CI` is not set.
///
/// On any error nothing is left behind: see the [module documentation](self).
pub fn ingest(
    data_dir: &Path,
    table: Table,
    file: &Path,
    progress: bool,
) -> Result<IngestReport, IngestError> {
    stage(data_dir, table, file, progress)?.commit()
}

/// Validates `file` as [`ingest`] does and writes its rows to a hidden temporary file in the
/// table directory, without adding them yet: [`Staged::commit`] does (dropping the [`Staged`]
/// leaves the data directory as it was). A data directory of an older schema version is only
/// migrated at commit, after the whole input was found valid.
pub fn stage(
    data_dir: &Path,
    table: Table,
    file: &Path,
    progress: bool,
) -> Result<Staged, IngestError> {
    crate::storage::refuse_newer(data_dir).map_err(io_err(data_dir))?;
    let (rows, out) = run(table, file, Target::DataDir(data_dir), progress)?;
    let out = out.ok_or_else(|| IngestError::Io {
        path: file.to_path_buf(),
        source: io::Error::other("no output file was written"),
    })?;
    Ok(Staged {
        data_dir: data_dir.to_path_buf(),
        table,
        rows,
        out,
    })
}

/// Validated rows written to a hidden temporary file, not yet part of the table (see
/// [`stage`]).
pub struct Staged {
    data_dir: PathBuf,
    table: Table,
    rows: u64,
    out: Output,
}

impl fmt::Debug for Staged {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Staged")
            .field("data_dir", &self.data_dir)
            .field("table", &self.table)
            .field("rows", &self.rows)
            .field("final_path", &self.out.final_path)
            .finish()
    }
}

impl Staged {
    /// The number of rows staged.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Brings the data directory to the current schema version (see
    /// [`migrate`]) and adds the staged file to the table by a rename.
    pub fn commit(self) -> Result<IngestReport, IngestError> {
        let Staged {
            data_dir,
            table,
            rows,
            out,
        } = self;
        migrate(&data_dir)?;
        let path = out.commit()?;
        crate::storage::mark_version(&data_dir).map_err(io_err(&data_dir))?;
        tracing::info!(table = table.name(), rows, path = %path.display(), "ingested");
        Ok(IngestReport { table, rows, path })
    }
}

/// Checks `file` exactly as [`ingest`] would, without writing anything. Returns the row count.
pub fn validate(table: Table, file: &Path) -> Result<u64, IngestError> {
    run(table, file, Target::Check, false).map(|(rows, _)| rows)
}

/// Rewrites a data file of an older schema version in the current one, in place and atomically
/// (temp file + rename over it): every row validated again, new columns derived or set to their
/// value for older rows. Returns the row count.
pub fn upgrade_file(table: Table, file: &Path) -> Result<u64, IngestError> {
    let (rows, out) = run(table, file, Target::Replace(file), false)?;
    if let Some(out) = out {
        out.commit()?;
    }
    Ok(rows)
}

/// Where validated rows go.
#[derive(Debug, Clone, Copy)]
enum Target<'a> {
    /// Nowhere: only check.
    Check,
    /// A new file in this data directory.
    DataDir(&'a Path),
    /// Over this file.
    Replace(&'a Path),
}

/// Whether `file` is read as Parquet (its extension is `parquet`, any case); otherwise CSV.
pub fn is_parquet_input(file: &Path) -> bool {
    file.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("parquet"))
}

fn run(
    table: Table,
    file: &Path,
    data_dir: Target<'_>,
    progress: bool,
) -> Result<(u64, Option<Output>), IngestError> {
    let input = File::open(file).map_err(io_err(file))?;
    let len = input.metadata().map(|m| m.len()).unwrap_or(0);
    let parquet = is_parquet_input(file);
    let bar = progress_bar(progress, parquet, len);
    let result = if parquet {
        ingest_parquet(table, file, input, data_dir, bar.as_ref())
    } else {
        ingest_csv(table, file, input, data_dir, bar.as_ref())
    };
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    result
}

fn progress_bar(enabled: bool, parquet: bool, len: u64) -> Option<ProgressBar> {
    if !enabled || !io::stderr().is_terminal() || std::env::var_os("CI").is_some() {
        return None;
    }
    let template = if parquet {
        "{spinner} ingest [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} rows ({per_sec}, {eta})"
    } else {
        "{spinner} ingest [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}, {eta})"
    };
    let style = ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    // For Parquet the length is set to the row count once the footer is read.
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    bar.set_style(style);
    Some(bar)
}

// ---------------------------------------------------------------------------------------------
// Values and problems

/// One input value, before validation.
#[derive(Debug, Clone, Copy)]
enum Value<'a> {
    /// Missing (empty CSV field, Parquet null, empty Parquet string).
    Null,
    /// Raw text (every CSV field; Parquet string columns).
    Text(&'a [u8]),
    /// A Parquet integer.
    Int(i64),
    /// A Parquet floating-point number (integral values are accepted for integer columns).
    Float(f64),
    /// A Parquet date (days since 1970-01-01).
    Date(i32),
    /// A Parquet boolean.
    Bool(bool),
    /// A Parquet value that could not be converted (overflow).
    Unrepresentable,
}

/// What is wrong with one value. Borrows the value; formatted only if it is listed.
#[derive(Debug, Clone, Copy)]
enum Problem<'a> {
    Required,
    NotUtf8,
    TooLong(usize),
    Control(char),
    BadAgency(&'a [u8]),
    NotInVocab(&'a [u8], &'static [&'static str]),
    NotInteger(&'a [u8]),
    NotIntegral(f64),
    OutOfRange(i64, i64, i64),
    BadDateForm(&'a [u8]),
    NotCalendarDate(&'a [u8]),
    DateOutOfRange(i32),
    BadBool(&'a [u8]),
    Unrepresentable(ColumnType),
    Before {
        value: i32,
        other: &'static str,
        other_value: i32,
    },
    Derived {
        value: i64,
        expected: i64,
        source: &'static str,
    },
}

impl Problem<'_> {
    fn describe(&self, name: &str, out: &mut String) {
        let _ = match *self {
            Problem::Required => write!(out, "{name}: required value is empty"),
            Problem::Derived {
                value,
                expected,
                source,
            } => write!(
                out,
                "{name}: {value} does not match {source} (which gives {expected})"
            ),
            Problem::NotUtf8 => write!(out, "{name}: value is not valid UTF-8"),
            Problem::TooLong(n) => write!(
                out,
                "{name}: value has {n} characters, more than the {MAX_FREE_TEXT_CHARS} allowed"
            ),
            Problem::Control(c) if c == '\n' || c == '\r' => write!(
                out,
                "{name}: value contains a line break (an unterminated quoted field?)"
            ),
            Problem::Control(c) => {
                write!(
                    out,
                    "{name}: value contains control character U+{:04X}",
                    c as u32
                )
            }
            Problem::BadAgency(v) => write!(
                out,
                "{name}: {} is not an agency code (2-12 uppercase ASCII letters or digits, \
                 e.g. SSA)",
                show(v)
            ),
            Problem::NotInVocab(v, list) => {
                let _ = write!(out, "{name}: {} is not allowed; expected one of ", show(v));
                describe_vocabulary(v, list, out);
                Ok(())
            }
            Problem::NotInteger(v) => write!(out, "{name}: {} is not an integer", show(v)),
            Problem::NotIntegral(f) => write!(out, "{name}: {f} is not an integer"),
            Problem::OutOfRange(v, lo, hi) => write!(out, "{name}: {v} is outside {lo}..={hi}"),
            Problem::BadDateForm(v) => {
                write!(out, "{name}: {} is not a date in YYYY-MM-DD form", show(v))
            }
            Problem::NotCalendarDate(v) => {
                write!(out, "{name}: {} is not a calendar date", show(v))
            }
            Problem::DateOutOfRange(d) => {
                write!(
                    out,
                    "{name}: date {d} (days since 1970-01-01) is outside years 0000-9999"
                )
            }
            Problem::BadBool(v) => {
                write!(
                    out,
                    "{name}: {} is not a boolean (expected true or false)",
                    show(v)
                )
            }
            Problem::Unrepresentable(ty) => {
                write!(
                    out,
                    "{name}: value does not fit the column type {}",
                    ty.data_type()
                )
            }
            Problem::Before {
                value,
                other,
                other_value,
            } => write!(
                out,
                "{name}: {} is before {other} {}",
                DateDisplay(value),
                DateDisplay(other_value)
            ),
        };
    }
}

/// Shows a raw value quoted and escaped, shortened to 40 characters.
fn show(v: &[u8]) -> String {
    let text = String::from_utf8_lossy(v);
    let mut short: String = text.chars().take(40).collect();
    if text.chars().nth(40).is_some() {
        short.push('…');
    }
    format!("{short:?}")
}

/// "a, b, c" (at most 9 codes, then how many there are), plus a hint on case mistakes.
fn describe_vocabulary(v: &[u8], list: &[&str], out: &mut String) {
    const SHOWN: usize = 9;
    for (i, code) in list.iter().take(SHOWN).enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        out.push_str(code);
    }
    if list.len() > SHOWN {
        let _ = write!(out, ", ... ({} codes)", list.len());
    }
    if let Some(code) = list
        .iter()
        .find(|c| c.as_bytes().eq_ignore_ascii_case(v.trim_ascii()))
    {
        let _ = write!(
            out,
            " (codes are exact and case-sensitive: did you mean {code}?)"
        );
    }
}

struct DateDisplay(i32);

impl fmt::Display for DateDisplay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = Vec::with_capacity(10);
        push_date(self.0, &mut buf);
        f.write_str(&String::from_utf8_lossy(&buf))
    }
}

// ---------------------------------------------------------------------------------------------
// Field parsing (bytes, no allocation)

/// Days since 1970-01-01 of a proleptic Gregorian date (month 1-12, day 1-31).
pub(crate) fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = i64::from((month + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// (year, month, day) of a day count since 1970-01-01.
pub(crate) fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Appends `YYYY-MM-DD` for a day count since 1970-01-01 (years 0000-9999).
pub(crate) fn push_date(days: i32, out: &mut Vec<u8>) {
    let (y, m, d) = civil_from_days(i64::from(days));
    let y = y.clamp(0, 9999) as u32;
    out.extend_from_slice(&[
        b'0' + (y / 1000) as u8,
        b'0' + (y / 100 % 10) as u8,
        b'0' + (y / 10 % 10) as u8,
        b'0' + (y % 10) as u8,
        b'-',
        b'0' + (m / 10) as u8,
        b'0' + (m % 10) as u8,
        b'-',
        b'0' + (d / 10) as u8,
        b'0' + (d % 10) as u8,
    ]);
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if is_leap(y) => 29,
        _ => 28,
    }
}

const MIN_DAY: i32 = -719_528; // 0000-01-01
const MAX_DAY: i32 = 2_932_896; // 9999-12-31

/// Parses `YYYY-MM-DD`. `Err(false)`: not in that form; `Err(true)`: not a calendar date.
pub(crate) fn parse_date(b: &[u8]) -> Result<i32, bool> {
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return Err(false);
    }
    let mut digits = [0u32; 8];
    for (slot, &c) in digits
        .iter_mut()
        .zip(b[..4].iter().chain(&b[5..7]).chain(&b[8..10]))
    {
        let d = c.wrapping_sub(b'0');
        if d > 9 {
            return Err(false);
        }
        *slot = u32::from(d);
    }
    let y = i64::from(digits[0] * 1000 + digits[1] * 100 + digits[2] * 10 + digits[3]);
    let m = digits[4] * 10 + digits[5];
    let d = digits[6] * 10 + digits[7];
    if !(1..=12).contains(&m) || d == 0 || d > days_in_month(y, m) {
        return Err(true);
    }
    Ok(days_from_civil(y, m, d) as i32)
}

/// Parses a decimal integer (optional sign, at most 18 digits).
fn parse_int(b: &[u8]) -> Option<i64> {
    let (neg, digits) = match b.split_first() {
        Some((b'-', rest)) => (true, rest),
        Some((b'+', rest)) => (false, rest),
        _ => (false, b),
    };
    if digits.is_empty() || digits.len() > 18 {
        return None;
    }
    let mut v: i64 = 0;
    for &c in digits {
        let d = c.wrapping_sub(b'0');
        if d > 9 {
            return None;
        }
        v = v * 10 + i64::from(d);
    }
    Some(if neg { -v } else { v })
}

/// Whether `b` is an agency code: 2-12 uppercase ASCII letters or digits.
pub(crate) fn is_agency_code(b: &[u8]) -> bool {
    (2..=12).contains(&b.len())
        && b.iter()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
}

/// What is wrong with `b` as free text in column `name` (the same reason `cxfed ingest` gives),
/// or `None` when it is fine. Empty text is a missing required value.
pub(crate) fn free_text_problem(name: &str, b: &[u8]) -> Option<String> {
    let problem = if b.is_empty() {
        Problem::Required
    } else {
        check_free_text(b).err()?
    };
    let mut reason = String::new();
    problem.describe(name, &mut reason);
    Some(reason)
}

/// Checks free text: UTF-8, at most [`MAX_FREE_TEXT_CHARS`] characters, no control characters.
fn check_free_text(b: &[u8]) -> Result<&str, Problem<'_>> {
    let s = std::str::from_utf8(b).map_err(|_| Problem::NotUtf8)?;
    if s.is_ascii() {
        if let Some(&c) = b.iter().find(|&&c| c < 0x20 || c == 0x7f) {
            return Err(Problem::Control(char::from(c)));
        }
        if b.len() > MAX_FREE_TEXT_CHARS {
            return Err(Problem::TooLong(b.len()));
        }
    } else {
        if let Some(c) = s.chars().find(|c| c.is_control()) {
            return Err(Problem::Control(c));
        }
        let n = s.chars().count();
        if n > MAX_FREE_TEXT_CHARS {
            return Err(Problem::TooLong(n));
        }
    }
    Ok(s)
}

// ---------------------------------------------------------------------------------------------
// Column builders

/// A vocabulary as an open-addressed table keyed by a value's length and first eight bytes,
/// so that checking a field costs one probe and one comparison (a binary search over the sorted
/// words was a sixth of ingest time).
struct Vocab {
    slots: Vec<Option<&'static str>>,
}

impl Vocab {
    fn new(words: &[&'static str]) -> Vocab {
        let size = (words.len() * 4).next_power_of_two().max(8);
        let mut slots = vec![None; size];
        for w in words {
            let mut i = Self::start(w.as_bytes(), size);
            while slots[i].is_some() {
                i = (i + 1) & (size - 1);
            }
            slots[i] = Some(*w);
        }
        Vocab { slots }
    }

    fn start(bytes: &[u8], size: usize) -> usize {
        let mut head = [0u8; 8];
        let n = bytes.len().min(8);
        head[..n].copy_from_slice(&bytes[..n]);
        let key = u64::from_le_bytes(head) ^ (bytes.len() as u64).rotate_left(56);
        // Fibonacci hashing: the high bits of key·φ.
        (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize & (size - 1)
    }

    fn get(&self, bytes: &[u8]) -> Option<&'static str> {
        let size = self.slots.len();
        let mut i = Self::start(bytes, size);
        while let Some(w) = self.slots[i] {
            if w.as_bytes() == bytes {
                return Some(w);
            }
            i = (i + 1) & (size - 1);
        }
        None
    }
}

/// A column prepared for validation.
struct Spec {
    col: &'static Column,
    /// Vocabulary, for lookup.
    vocab: Vocab,
    /// Inclusive integer bounds (domain and type).
    bounds: (i64, i64),
}

impl Spec {
    fn new(col: &'static Column) -> Spec {
        let vocab = match col.domain {
            Domain::Vocabulary(list) => Vocab::new(list),
            _ => Vocab::new(&[]),
        };
        let type_bounds = match col.ty {
            ColumnType::Int8 => (i64::from(i8::MIN), i64::from(i8::MAX)),
            ColumnType::Int32 => (i64::from(i32::MIN), i64::from(i32::MAX)),
            _ => (i64::MIN, i64::MAX),
        };
        let bounds = match col.domain {
            Domain::Range(lo, hi) => (lo.max(type_bounds.0), hi.min(type_bounds.1)),
            _ => type_bounds,
        };
        Spec { col, vocab, bounds }
    }
}

enum ColBuilder {
    Text(StringBuilder),
    Int8(Int8Builder),
    Int32(Int32Builder),
    Date(Date32Builder),
    Bool(BooleanBuilder),
}

impl ColBuilder {
    fn new(ty: ColumnType) -> ColBuilder {
        match ty {
            ColumnType::Text => {
                ColBuilder::Text(StringBuilder::with_capacity(CHUNK_ROWS, CHUNK_ROWS * 16))
            }
            ColumnType::Int8 => ColBuilder::Int8(Int8Builder::with_capacity(CHUNK_ROWS)),
            ColumnType::Int32 => ColBuilder::Int32(Int32Builder::with_capacity(CHUNK_ROWS)),
            ColumnType::Date => ColBuilder::Date(Date32Builder::with_capacity(CHUNK_ROWS)),
            ColumnType::Bool => ColBuilder::Bool(BooleanBuilder::with_capacity(CHUNK_ROWS)),
        }
    }

    fn append_null(&mut self) {
        match self {
            ColBuilder::Text(b) => b.append_null(),
            ColBuilder::Int8(b) => b.append_null(),
            ColBuilder::Int32(b) => b.append_null(),
            ColBuilder::Date(b) => b.append_null(),
            ColBuilder::Bool(b) => b.append_null(),
        }
    }

    fn finish(&mut self) -> ArrayRef {
        match self {
            ColBuilder::Text(b) => Arc::new(b.finish()),
            ColBuilder::Int8(b) => Arc::new(b.finish()),
            ColBuilder::Int32(b) => Arc::new(b.finish()),
            ColBuilder::Date(b) => Arc::new(b.finish()),
            ColBuilder::Bool(b) => Arc::new(b.finish()),
        }
    }

    /// Validates `v` and appends it. Returns the date (for date columns) for cross-checks. On
    /// error nothing is appended.
    fn push<'a>(&mut self, spec: &Spec, v: Value<'a>) -> Result<Option<i32>, Problem<'a>> {
        if matches!(v, Value::Null) {
            if spec.col.required {
                return Err(Problem::Required);
            }
            self.append_null();
            return Ok(None);
        }
        if matches!(v, Value::Unrepresentable) {
            return Err(Problem::Unrepresentable(spec.col.ty));
        }
        match self {
            ColBuilder::Text(b) => {
                let Value::Text(bytes) = v else {
                    return Err(Problem::Unrepresentable(spec.col.ty));
                };
                let s = match spec.col.domain {
                    Domain::Vocabulary(list) => match spec.vocab.get(bytes) {
                        Some(word) => word,
                        None => return Err(Problem::NotInVocab(bytes, list)),
                    },
                    Domain::Agency => {
                        if !is_agency_code(bytes) {
                            return Err(Problem::BadAgency(bytes));
                        }
                        std::str::from_utf8(bytes).map_err(|_| Problem::NotUtf8)?
                    }
                    Domain::FreeText => check_free_text(bytes)?,
                    Domain::Range(..) | Domain::Any => {
                        std::str::from_utf8(bytes).map_err(|_| Problem::NotUtf8)?
                    }
                };
                b.append_value(s);
                Ok(None)
            }
            ColBuilder::Int8(b) => {
                let i = int_value(spec, v)?;
                // `int_value` checked the Int8 bounds.
                b.append_value(i as i8);
                Ok(None)
            }
            ColBuilder::Int32(b) => {
                let i = int_value(spec, v)?;
                b.append_value(i as i32);
                Ok(None)
            }
            ColBuilder::Date(b) => {
                let d = match v {
                    Value::Text(bytes) => parse_date(bytes).map_err(|calendar| {
                        if calendar {
                            Problem::NotCalendarDate(bytes)
                        } else {
                            Problem::BadDateForm(bytes)
                        }
                    })?,
                    Value::Date(d) if (MIN_DAY..=MAX_DAY).contains(&d) => d,
                    Value::Date(d) => return Err(Problem::DateOutOfRange(d)),
                    _ => return Err(Problem::Unrepresentable(spec.col.ty)),
                };
                b.append_value(d);
                Ok(Some(d))
            }
            ColBuilder::Bool(b) => {
                let x = match v {
                    Value::Text(b"true") => true,
                    Value::Text(b"false") => false,
                    Value::Text(bytes) => return Err(Problem::BadBool(bytes)),
                    Value::Bool(x) => x,
                    _ => return Err(Problem::Unrepresentable(spec.col.ty)),
                };
                b.append_value(x);
                Ok(None)
            }
        }
    }
}

fn int_value<'a>(spec: &Spec, v: Value<'a>) -> Result<i64, Problem<'a>> {
    let i = match v {
        Value::Text(bytes) => parse_int(bytes).ok_or(Problem::NotInteger(bytes))?,
        Value::Int(i) => i,
        Value::Float(f) if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e15 => f as i64,
        Value::Float(f) => return Err(Problem::NotIntegral(f)),
        _ => return Err(Problem::Unrepresentable(spec.col.ty)),
    };
    let (lo, hi) = spec.bounds;
    if i < lo || i > hi {
        return Err(Problem::OutOfRange(i, lo, hi));
    }
    Ok(i)
}

// ---------------------------------------------------------------------------------------------
// Errors

struct Errors {
    list: Vec<RowError>,
    total: u64,
    /// Parquet: LINE is a row number; say so.
    rows: bool,
}

impl Errors {
    fn new(rows: bool) -> Errors {
        Errors {
            list: Vec::new(),
            total: 0,
            rows,
        }
    }

    fn add(&mut self, line: u64, column: usize, name: &str, problem: Problem<'_>) {
        self.total += 1;
        if self.list.len() < MAX_LISTED_ERRORS {
            let mut reason = self.prefix(line);
            problem.describe(name, &mut reason);
            self.list.push(RowError {
                line,
                column,
                reason,
            });
        }
    }

    fn add_message(&mut self, line: u64, column: usize, message: impl FnOnce() -> String) {
        self.total += 1;
        if self.list.len() < MAX_LISTED_ERRORS {
            let mut reason = self.prefix(line);
            reason.push_str(&message());
            self.list.push(RowError {
                line,
                column,
                reason,
            });
        }
    }

    fn prefix(&self, line: u64) -> String {
        if self.rows && line > 0 {
            format!("row {line}: ")
        } else {
            String::new()
        }
    }

    fn into_result(self, file: &Path) -> Result<(), IngestError> {
        if self.total == 0 {
            Ok(())
        } else {
            Err(IngestError::Invalid {
                file: file.to_path_buf(),
                errors: self.list,
                total: self.total,
            })
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Output: hidden temp file, committed by rename

/// An [`ArrowWriter`] on its own thread: parsing and checking rows (this thread) and encoding
/// and compressing Parquet (that one) each take about half of an ingest, so they overlap.
struct BackgroundWriter {
    batches: Option<std::sync::mpsc::SyncSender<RecordBatch>>,
    thread: Option<std::thread::JoinHandle<Result<ArrowWriter<File>, ParquetError>>>,
}

impl BackgroundWriter {
    fn spawn(writer: ArrowWriter<File>) -> io::Result<BackgroundWriter> {
        // Two batches in flight: enough to keep both threads busy, little memory.
        let (tx, rx) = std::sync::mpsc::sync_channel::<RecordBatch>(2);
        let thread = std::thread::Builder::new()
            .name("cxfed-parquet".into())
            .spawn(move || {
                let mut writer = writer;
                for batch in rx {
                    writer.write(&batch)?;
                }
                Ok(writer)
            })?;
        Ok(BackgroundWriter {
            batches: Some(tx),
            thread: Some(thread),
        })
    }

    fn write(&mut self, batch: RecordBatch) -> Result<(), ParquetError> {
        let sent = self
            .batches
            .as_ref()
            .is_some_and(|tx| tx.send(batch).is_ok());
        if sent {
            return Ok(());
        }
        // The writer thread stopped: its error says why.
        match self.finish() {
            Err(e) => Err(e),
            Ok(_) => Err(ParquetError::General("the Parquet writer stopped".into())),
        }
    }

    /// Waits for every batch to be encoded and returns the writer.
    fn finish(&mut self) -> Result<ArrowWriter<File>, ParquetError> {
        drop(self.batches.take());
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(ParquetError::General("the Parquet writer panicked".into())),
            None => Err(ParquetError::General("the Parquet writer is closed".into())),
        }
    }
}

impl Drop for BackgroundWriter {
    fn drop(&mut self) {
        drop(self.batches.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Output {
    writer: Option<BackgroundWriter>,
    temp: Option<tempfile::NamedTempFile>,
    final_path: PathBuf,
    table_dir: PathBuf,
    /// Directories this ingest created, outermost first; removed again unless committed.
    created: Vec<PathBuf>,
    committed: bool,
}

impl Output {
    fn create(data_dir: &Path, table: Table, schema: SchemaRef) -> Result<Output, IngestError> {
        let table_dir = storage::table_dir(data_dir, table);
        let mut missing = Vec::new();
        let mut dir = Some(table_dir.as_path());
        while let Some(d) = dir {
            if d.as_os_str().is_empty() || d.exists() {
                break;
            }
            missing.push(d.to_path_buf());
            dir = d.parent();
        }
        missing.reverse();
        let mut out = Output {
            writer: None,
            temp: None,
            final_path: PathBuf::new(),
            table_dir: table_dir.clone(),
            created: Vec::new(),
            committed: false,
        };
        for d in missing {
            match std::fs::create_dir(&d) {
                Ok(()) => out.created.push(d),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err(&d)(e)),
            }
        }
        let name = unique_name();
        out.final_path = table_dir.join(format!("{name}.{}", storage::DATA_FILE_EXTENSION));
        out.open_temp(&name, schema)?;
        Ok(out)
    }

    fn open_temp(&mut self, name: &str, schema: SchemaRef) -> Result<(), IngestError> {
        let table_dir = self.table_dir.clone();
        let prefix = format!(".{name}.");
        let temp = tempfile::Builder::new()
            .prefix(&prefix)
            .suffix(".tmp")
            .tempfile_in(&table_dir)
            .map_err(io_err(&table_dir))?;
        let temp_path = temp.path().to_path_buf();
        let file = temp.as_file().try_clone().map_err(io_err(&temp_path))?;
        self.temp = Some(temp);
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(
                ZstdLevel::try_new(1).map_err(pq_err(&temp_path))?,
            ))
            .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
            .set_created_by(format!("cxfed {}", env!("CARGO_PKG_VERSION")))
            .build();
        let writer = ArrowWriter::try_new(file, schema, Some(props)).map_err(pq_err(&temp_path))?;
        self.writer = Some(BackgroundWriter::spawn(writer).map_err(io_err(&temp_path))?);
        Ok(())
    }

    /// An output whose temp file is in `table_dir` (which exists); the caller sets `final_path`.
    fn create_in(table_dir: &Path, schema: SchemaRef) -> Result<Output, IngestError> {
        let mut out = Output {
            writer: None,
            temp: None,
            final_path: PathBuf::new(),
            table_dir: table_dir.to_path_buf(),
            created: Vec::new(),
            committed: false,
        };
        out.open_temp(&unique_name(), schema)?;
        Ok(out)
    }

    fn write(&mut self, batch: RecordBatch) -> Result<(), IngestError> {
        if let Some(w) = self.writer.as_mut() {
            w.write(batch).map_err(pq_err(&self.final_path))?;
        }
        Ok(())
    }

    fn commit(mut self) -> Result<PathBuf, IngestError> {
        let (Some(mut writer), Some(temp)) = (self.writer.take(), self.temp.take()) else {
            return Err(io_err(&self.final_path)(io::Error::other(
                "output already closed",
            )));
        };
        let temp_path = temp.path().to_path_buf();
        let file = writer
            .finish()
            .and_then(ArrowWriter::into_inner)
            .map_err(pq_err(&temp_path))?;
        file.sync_all().map_err(io_err(&temp_path))?;
        drop(file);
        // On failure the returned handle is dropped, which deletes the temp file.
        temp.persist(&self.final_path)
            .map_err(|e| io_err(&self.final_path)(e.error))?;
        self.committed = true;
        // Make the rename (and any directory we created) durable.
        let mut dirs = vec![self.table_dir.clone()];
        dirs.extend(self.created.iter().rev().skip(1).cloned());
        if let Some(first) = self.created.first() {
            dirs.push(crate::storage::parent_dir(first).to_path_buf());
        }
        for dir in dirs {
            if let Err(e) = sync_dir(&dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "could not fsync directory");
            }
        }
        Ok(self.final_path.clone())
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        drop(self.writer.take());
        // Deletes the temp file.
        drop(self.temp.take());
        for d in self.created.iter().rev() {
            // Only removes empty directories: never anything someone else put there meanwhile.
            let _ = std::fs::remove_dir(d);
        }
    }
}

#[cfg(unix)]
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> io::Result<()> {
    Ok(())
}

/// `<unix_nanos>-<16 random hex digits>`.
fn unique_name() -> String {
    use std::hash::{BuildHasher, Hasher};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut h = std::hash::RandomState::new().build_hasher();
    h.write_u128(nanos);
    h.write_u32(std::process::id());
    format!("{nanos}-{:016x}", h.finish())
}

// ---------------------------------------------------------------------------------------------
// Sink: validated rows -> Arrow batches -> output

struct Sink {
    specs: Vec<Spec>,
    /// Whether the input has each schema column (older files lack the newer ones).
    present: Vec<bool>,
    /// For derived columns, the index of their source date column.
    derive_src: Vec<Option<usize>>,
    schema: SchemaRef,
    builders: Vec<ColBuilder>,
    /// Dates of the current row, for cross-column checks.
    dates: Vec<Option<i32>>,
    /// (later, earlier) column indexes.
    ordered: Vec<(usize, usize)>,
    pending: usize,
    rows: u64,
    errors: Errors,
    out: Option<Output>,
    file: PathBuf,
}

impl Sink {
    fn new(table: Table, file: &Path, rows_are_lines: bool) -> Sink {
        let cols = table.columns();
        let index = |name: &str| cols.iter().position(|c| c.name == name);
        let ordered = ORDERED_DATES
            .iter()
            .filter_map(|(later, earlier)| Some((index(later)?, index(earlier)?)))
            .collect();
        Sink {
            specs: cols.iter().map(Spec::new).collect(),
            present: vec![true; cols.len()],
            derive_src: cols
                .iter()
                .map(|c| c.derived.and_then(|d| index(d.source())))
                .collect(),
            schema: table.arrow_schema(),
            builders: cols.iter().map(|c| ColBuilder::new(c.ty)).collect(),
            dates: vec![None; cols.len()],
            ordered,
            pending: 0,
            rows: 0,
            errors: Errors::new(!rows_are_lines),
            out: None,
            file: file.to_path_buf(),
        }
    }

    fn open_output(&mut self, target: Target<'_>, table: Table) -> Result<(), IngestError> {
        match target {
            Target::Check => {}
            Target::DataDir(dir) => {
                self.out = Some(Output::create(dir, table, self.schema.clone())?);
            }
            Target::Replace(file) => {
                let table_dir = crate::storage::parent_dir(file);
                let mut out = Output::create_in(table_dir, self.schema.clone())?;
                out.final_path = file.to_path_buf();
                self.out = Some(out);
            }
        }
        Ok(())
    }

    /// Validates and appends one row. `value(i)` is the input value of schema column `i`;
    /// `columns[i]` is its 1-based column number in the input, and `line(columns[i])` the line
    /// (or row) its errors are reported on.
    fn push_row<'a>(
        &mut self,
        line: impl Fn(usize) -> u64,
        columns: &[usize],
        mut value: impl FnMut(usize) -> Value<'a>,
    ) -> Result<(), IngestError> {
        for (i, spec) in self.specs.iter().enumerate() {
            let mut v = value(i);
            if !self.present[i]
                && let Some(a) = spec.col.absent
            {
                v = Value::Text(a.as_bytes());
            }
            if let (Some(d), Some(src)) = (spec.col.derived, self.derive_src[i]) {
                let expected = self.dates[src].map(|day| d.value(day));
                // Absent or left empty: derived.
                if !self.present[i] || matches!(v, Value::Null) {
                    match expected {
                        Some(x) => v = Value::Int(x),
                        // The date was bad and is reported already.
                        None => {
                            self.builders[i].append_null();
                            self.dates[i] = None;
                            continue;
                        }
                    }
                } else if let Some(x) = expected
                    && let Ok(given) = int_value(spec, v)
                    && given != x
                {
                    self.builders[i].append_null();
                    self.dates[i] = None;
                    let p = Problem::Derived {
                        value: given,
                        expected: x,
                        source: d.source(),
                    };
                    self.errors
                        .add(line(columns[i]), columns[i], spec.col.name, p);
                    continue;
                }
            }
            match self.builders[i].push(spec, v) {
                Ok(d) => self.dates[i] = d,
                Err(p) => {
                    self.builders[i].append_null();
                    self.dates[i] = None;
                    self.errors
                        .add(line(columns[i]), columns[i], spec.col.name, p);
                }
            }
            // Cross-column checks, reported at the later column (so errors stay in order).
            for &(later, earlier) in &self.ordered {
                if later == i
                    && let (Some(l), Some(e)) = (self.dates[later], self.dates[earlier])
                    && l < e
                {
                    let p = Problem::Before {
                        value: l,
                        other: self.specs[earlier].col.name,
                        other_value: e,
                    };
                    self.errors
                        .add(line(columns[later]), columns[later], spec.col.name, p);
                }
            }
        }
        self.rows += 1;
        self.pending += 1;
        if self.pending >= CHUNK_ROWS {
            self.flush()?;
        }
        Ok(())
    }

    /// Turns the pending rows into a batch and writes it (unless there were errors: then the
    /// rows are only dropped, nothing more will be written).
    fn flush(&mut self) -> Result<(), IngestError> {
        if self.pending == 0 {
            return Ok(());
        }
        self.pending = 0;
        let arrays: Vec<ArrayRef> = self.builders.iter_mut().map(ColBuilder::finish).collect();
        if self.errors.total > 0 {
            return Ok(());
        }
        if let Some(out) = self.out.as_mut() {
            let batch =
                RecordBatch::try_new(self.schema.clone(), arrays).map_err(arrow_err(&self.file))?;
            out.write(batch)?;
        }
        Ok(())
    }

    /// The output, written but not committed, if every row was valid; otherwise discards it.
    fn finish(mut self) -> Result<(u64, Option<Output>), IngestError> {
        self.flush()?;
        let rows = self.rows;
        let out = self.out.take();
        let errors = std::mem::replace(&mut self.errors, Errors::new(false));
        // Dropping `out` (on error) deletes the temp file and the directories we created.
        errors.into_result(&self.file)?;
        Ok((rows, out))
    }
}

// ---------------------------------------------------------------------------------------------
// CSV

/// The input of a CSV reader, watched for where its lines end (and for `"` bytes, to detect a
/// quoted field left open at the end of the file), so that errors name the line an editor shows.
///
/// The csv crate's own line count is not that line: it counts `\n` bytes up to where it
/// started reading a record, which is before the `\n` of a CRLF line end and before skipped
/// empty lines — every row of a Windows file came out one line early — and it knows nothing of
/// a lone `\r`. Here a line ends at `\n`, at `\r\n` (one line end) and at a `\r` not followed
/// by `\n` (classic Mac OS files, which the csv crate also reads as record ends), wherever it
/// is: between records, in skipped empty lines or inside a quoted field. A UTF-8 byte order
/// mark is only bytes of line 1.
///
/// Memory stays small however long the file: line ends are kept only between what the csv
/// reader has parsed (see [`LineReader::record`]) and what it has buffered ahead.
pub(crate) struct LineReader<R> {
    inner: R,
    /// `"` bytes read.
    quotes: u64,
    /// Bytes read.
    read: u64,
    /// Offsets of the line ends read but not yet passed by [`LineReader::record`] (of the
    /// `\n` of a `\r\n`).
    ends: std::collections::VecDeque<u64>,
    /// Line ends before those in `ends`.
    passed: u64,
    /// The input has ended.
    eof: bool,
    /// The offset of a `\r` that was the last byte read: whether it ends a line alone depends
    /// on the next byte.
    cr: Option<u64>,
}

impl<R: Read> LineReader<R> {
    pub(crate) fn new(inner: R) -> LineReader<R> {
        LineReader {
            inner,
            quotes: 0,
            read: 0,
            ends: std::collections::VecDeque::new(),
            passed: 0,
            eof: false,
            cr: None,
        }
    }

    /// Whether an odd number of `"` bytes was read.
    pub(crate) fn quotes_unbalanced(&self) -> bool {
        self.quotes % 2 == 1
    }

    /// The 1-based line of the byte at `offset` (the line ends before it, plus one). Offsets
    /// must not decrease from call to call.
    pub(crate) fn line_at(&mut self, offset: u64) -> u64 {
        while self.ends.front().is_some_and(|&e| e < offset) {
            self.ends.pop_front();
            self.passed += 1;
        }
        self.passed + 1
    }

    /// The lines of the record the csv reader has just parsed: `end` is the reader's byte
    /// position after it (`csv::Reader::position`), `fields` its fields as parsed. The record
    /// ends on the line of its last byte (its terminator, or the end of the file); it starts
    /// as many line ends earlier as its fields hold — a line end can only be inside a quoted
    /// field, and parsing keeps it there as it was.
    pub(crate) fn record<'a>(
        &mut self,
        end: u64,
        fields: impl Iterator<Item = &'a [u8]>,
        lines: &mut RecordLines,
    ) {
        lines.starts.clear();
        let mut breaks = 0;
        let mut ends_in_break = false;
        for f in fields {
            lines.starts.push(breaks);
            breaks += line_breaks(f);
            ends_in_break = matches!(f.last(), Some(b'\n' | b'\r'));
        }
        // A quoted field left open runs to the end of the file: then the last byte, when it is
        // a line end, is the field's own, not the record's terminator.
        let open_to_eof = ends_in_break && self.eof && end == self.read && self.quotes_unbalanced();
        lines.last = if open_to_eof {
            self.line_at(end)
        } else {
            self.line_at(end.saturating_sub(1))
        };
        if breaks == 0 {
            lines.starts.clear();
        } else {
            let first = lines.last.saturating_sub(breaks);
            for s in &mut lines.starts {
                *s += first;
            }
        }
    }
}

impl<R: Read> Read for LineReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 {
            if !buf.is_empty() {
                // End of input: a `\r` as the very last byte ends its line alone.
                self.eof = true;
                if let Some(cr) = self.cr.take() {
                    self.ends.push_back(cr);
                }
            }
            return Ok(0);
        }
        for (i, &b) in buf[..n].iter().enumerate() {
            let at = self.read + i as u64;
            match b {
                b'\n' => {
                    self.cr = None;
                    self.ends.push_back(at);
                }
                b'\r' => {
                    if let Some(cr) = self.cr.replace(at) {
                        self.ends.push_back(cr);
                    }
                }
                _ => {
                    if let Some(cr) = self.cr.take() {
                        self.ends.push_back(cr);
                    }
                    self.quotes += u64::from(b == b'"');
                }
            }
        }
        self.read += n as u64;
        Ok(n)
    }
}

/// Line ends in `b`, as [`LineReader`] counts them (`\n`, `\r\n`, a lone `\r`).
pub(crate) fn line_breaks(b: &[u8]) -> u64 {
    let mut n = 0;
    let mut cr = false;
    for &c in b {
        n += u64::from(c == b'\n' || cr);
        cr = c == b'\r';
    }
    n + u64::from(cr)
}

/// The lines of one CSV record: where each field starts, and the record's last line (see
/// [`LineReader::record`]).
#[derive(Debug, Default)]
pub(crate) struct RecordLines {
    last: u64,
    /// The line each field starts on; empty when the record is on one line.
    starts: Vec<u64>,
}

impl RecordLines {
    /// The line field `i` (0-based) starts on; for a field past the record's end, its last line.
    pub(crate) fn field(&self, i: usize) -> u64 {
        self.starts.get(i).copied().unwrap_or(self.last)
    }

    /// The line the record starts on.
    pub(crate) fn first(&self) -> u64 {
        self.field(0)
    }
}

/// A read error of the csv reader; `line` is where reading stopped.
fn csv_read_error(file: &Path, line: u64, e: csv::Error) -> IngestError {
    match e.into_kind() {
        csv::ErrorKind::Io(source) => IngestError::Io {
            path: file.to_path_buf(),
            source,
        },
        other => IngestError::Invalid {
            file: file.to_path_buf(),
            errors: vec![RowError {
                line,
                column: 1,
                reason: format!("malformed CSV: {other:?}"),
            }],
            total: 1,
        },
    }
}

/// Reads the next record of `csv` into `record` and its lines into `lines`.
pub(crate) fn next_record<R: Read>(
    csv: &mut csv::Reader<LineReader<R>>,
    record: &mut csv::ByteRecord,
    lines: &mut RecordLines,
    file: &Path,
) -> Result<bool, IngestError> {
    match csv.read_byte_record(record) {
        Ok(true) => {
            let end = csv.position().byte();
            csv.get_mut().record(end, record.iter(), lines);
            Ok(true)
        }
        Ok(false) => Ok(false),
        Err(e) => {
            let at = csv.position().byte();
            Err(csv_read_error(file, csv.get_mut().line_at(at), e))
        }
    }
}

fn ingest_csv(
    table: Table,
    file: &Path,
    input: File,
    data_dir: Target<'_>,
    bar: Option<&ProgressBar>,
) -> Result<(u64, Option<Output>), IngestError> {
    let reader: Box<dyn Read> = match bar {
        Some(bar) => Box::new(bar.wrap_read(input)),
        None => Box::new(input),
    };
    let mut csv = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .buffer_capacity(1 << 20)
        .from_reader(LineReader::new(reader));

    // Header.
    let mut record = csv::ByteRecord::new();
    let mut lines = RecordLines::default();
    let has_header = next_record(&mut csv, &mut record, &mut lines, file)?;
    let mut errors = Errors::new(false);
    if !has_header {
        errors.add_message(1, 1, || {
            let names: Vec<&str> = table.columns().iter().map(|c| c.name).collect();
            format!(
                "the file is empty; expected the header line {}",
                names.join(",")
            )
        });
        return errors.into_result(file).map(|()| (0, None));
    }
    let header_line = lines.first();
    let header: Vec<String> = record
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let f = if i == 0 {
                f.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(f)
            } else {
                f
            };
            String::from_utf8_lossy(f).into_owned()
        })
        .collect();
    let cols = check_header(table, &header, header_line, &mut errors);
    errors.into_result(file)?;
    let ncols = cols.len();

    // Rows.
    let mut sink = Sink::new(table, file, true);
    for p in &mut sink.present[ncols..] {
        *p = false;
    }
    sink.open_output(data_dir, table)?;
    let columns: Vec<usize> = (1..=table.columns().len()).collect();
    let mut last: Option<(u64, usize, bool)> = None; // (line, fields, had errors)
    while next_record(&mut csv, &mut record, &mut lines, file)? {
        let before = sink.errors.total;
        if record.len() != ncols {
            let found = record.len();
            if found < ncols {
                let missing = cols[found].name;
                // On the line the row's last field starts on (an unclosed quote there swallows
                // the rest of the file).
                sink.errors.add_message(lines.field(found.saturating_sub(1)), found + 1, || {
                    format!(
                        "{missing}: missing; the row has {found} field{} but the header has {ncols}",
                        plural(found as u64)
                    )
                });
            } else {
                sink.errors.add_message(lines.field(ncols), ncols + 1, || {
                    format!(
                        "unexpected field: the row has {found} fields but the header has {ncols}"
                    )
                });
            }
        } else {
            let rec = &record;
            let at = &lines;
            sink.push_row(
                |column| at.field(column.saturating_sub(1)),
                &columns,
                |i| match rec.get(i) {
                    Some(f) if !f.is_empty() => Value::Text(f),
                    _ => Value::Null,
                },
            )?;
        }
        let fields = record.len();
        last = Some((
            lines.field(fields.saturating_sub(1)),
            fields,
            sink.errors.total > before,
        ));
    }
    if csv.get_ref().quotes_unbalanced()
        && let Some((line, fields, had_errors)) = last
        && !had_errors
    {
        let name = cols.get(fields.saturating_sub(1)).map_or("?", |c| c.name);
        sink.errors.add_message(line, fields.max(1), || {
            format!(
                "{name}: unbalanced '\"': a quoted field is not closed before the end of the file"
            )
        });
    }
    sink.finish()
}

/// The columns of the schema version whose header this is (the current one, or an older one
/// for files written before columns were added); otherwise reports unexpected, duplicate,
/// missing or out-of-order columns against the current header.
fn check_header(
    table: Table,
    header: &[String],
    line: u64,
    errors: &mut Errors,
) -> &'static [Column] {
    for version in (1..=cxfed_queries::schema::SCHEMA_VERSION).rev() {
        let of = table.columns_of_version(version);
        if header.len() == of.len() && header.iter().zip(of).all(|(h, c)| h == c.name) {
            return of;
        }
    }
    // Report against the version the header looks like: the newest one of its known columns.
    let version = header
        .iter()
        .filter_map(|h| table.column(h).map(|c| c.since))
        .max()
        .unwrap_or(1);
    let cols = table.columns_of_version(version);
    let mut found: Vec<(usize, String)> = Vec::new();
    let mut seen: Vec<&str> = Vec::new();
    for (i, h) in header.iter().enumerate() {
        if table.column(h).is_none() {
            found.push((
                i + 1,
                format!(
                    "unexpected column `{h}` (not in the {} table)",
                    table.name()
                ),
            ));
        } else if seen.contains(&h.as_str()) {
            found.push((i + 1, format!("duplicate column `{h}`")));
        } else {
            seen.push(h.as_str());
        }
    }
    for (j, c) in cols.iter().enumerate() {
        if !header.iter().any(|h| h == c.name) {
            found.push((j + 1, format!("missing column `{}`", c.name)));
        }
    }
    if found.is_empty() {
        // Same names, different order.
        for (i, (h, c)) in header.iter().zip(cols).enumerate() {
            if h != c.name {
                found.push((
                    i + 1,
                    format!(
                        "column `{h}` is out of order: column {} must be `{}`",
                        i + 1,
                        c.name
                    ),
                ));
            }
        }
    }
    found.sort_by_key(|(col, _)| *col);
    let expected: Vec<&str> = cols.iter().map(|c| c.name).collect();
    let n = found.len();
    for (k, (col, reason)) in found.into_iter().enumerate() {
        errors.add_message(line, col, || {
            if k + 1 == n {
                format!(
                    "{reason}; the header must be exactly: {}",
                    expected.join(",")
                )
            } else {
                reason
            }
        });
    }
    cols
}

// ---------------------------------------------------------------------------------------------
// Parquet

/// A source column converted to one of a few array types.
enum Src {
    Str(StringArray),
    Int { cast: Int64Array, orig: ArrayRef },
    Float(Float64Array),
    Date { cast: Date32Array, orig: ArrayRef },
    Bool(BooleanArray),
    Null,
}

impl Src {
    fn value(&self, r: usize) -> Value<'_> {
        match self {
            Src::Str(a) => {
                if a.is_null(r) {
                    return Value::Null;
                }
                let b = a.value(r).as_bytes();
                if b.is_empty() {
                    Value::Null
                } else {
                    Value::Text(b)
                }
            }
            Src::Int { cast, orig } => {
                if cast.is_valid(r) {
                    Value::Int(cast.value(r))
                } else if orig.is_valid(r) {
                    Value::Unrepresentable
                } else {
                    Value::Null
                }
            }
            Src::Float(a) => {
                if a.is_valid(r) {
                    Value::Float(a.value(r))
                } else {
                    Value::Null
                }
            }
            Src::Date { cast, orig } => {
                if cast.is_valid(r) {
                    Value::Date(cast.value(r))
                } else if orig.is_valid(r) {
                    Value::Unrepresentable
                } else {
                    Value::Null
                }
            }
            Src::Bool(a) => {
                if a.is_valid(r) {
                    Value::Bool(a.value(r))
                } else {
                    Value::Null
                }
            }
            Src::Null => Value::Null,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SrcKind {
    Str,
    Int,
    Float,
    Date,
    Bool,
    Null,
}

fn is_stringish(dt: &DataType) -> bool {
    match dt {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => true,
        DataType::Dictionary(_, v) => is_stringish(v),
        _ => false,
    }
}

/// How a source column of type `dt` is read into a column of type `ty`, if it can be.
fn source_kind(ty: ColumnType, dt: &DataType) -> Option<SrcKind> {
    if *dt == DataType::Null {
        return Some(SrcKind::Null);
    }
    if is_stringish(dt) {
        return Some(SrcKind::Str);
    }
    match ty {
        ColumnType::Text => None,
        ColumnType::Int8 | ColumnType::Int32 => {
            if dt.is_integer() {
                Some(SrcKind::Int)
            } else if dt.is_floating() {
                Some(SrcKind::Float)
            } else {
                None
            }
        }
        ColumnType::Date => match dt {
            DataType::Date32 | DataType::Date64 | DataType::Timestamp(..) => Some(SrcKind::Date),
            _ => None,
        },
        ColumnType::Bool => (*dt == DataType::Boolean).then_some(SrcKind::Bool),
    }
}

fn convert(kind: SrcKind, array: &ArrayRef, file: &Path) -> Result<Src, IngestError> {
    let cast = |to: &DataType| arrow::compute::cast(array, to).map_err(arrow_err(file));
    let wrong = || arrow_err(file)(ArrowError::CastError("unexpected array type".into()));
    Ok(match kind {
        SrcKind::Str => Src::Str(
            cast(&DataType::Utf8)?
                .as_string_opt::<i32>()
                .ok_or_else(wrong)?
                .clone(),
        ),
        SrcKind::Int => Src::Int {
            cast: cast(&DataType::Int64)?
                .as_primitive_opt::<Int64Type>()
                .ok_or_else(wrong)?
                .clone(),
            orig: array.clone(),
        },
        SrcKind::Float => Src::Float(
            cast(&DataType::Float64)?
                .as_primitive_opt::<Float64Type>()
                .ok_or_else(wrong)?
                .clone(),
        ),
        SrcKind::Date => Src::Date {
            cast: cast(&DataType::Date32)?
                .as_primitive_opt::<Date32Type>()
                .ok_or_else(wrong)?
                .clone(),
            orig: array.clone(),
        },
        SrcKind::Bool => Src::Bool(array.as_boolean_opt().ok_or_else(wrong)?.clone()),
        SrcKind::Null => Src::Null,
    })
}

fn ingest_parquet(
    table: Table,
    file: &Path,
    input: File,
    data_dir: Target<'_>,
    bar: Option<&ProgressBar>,
) -> Result<(u64, Option<Output>), IngestError> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(input).map_err(pq_err(file))?;
    let source = builder.schema().clone();
    let total_rows = u64::try_from(builder.metadata().file_metadata().num_rows()).unwrap_or(0);
    if let Some(bar) = bar {
        bar.set_length(total_rows);
    }

    // Schema: every column present (any order), no others, types readable.
    let cols = table.columns();
    let mut errors = Errors::new(true);
    let mut mapping: Vec<Option<(usize, SrcKind)>> = Vec::with_capacity(cols.len());
    for (i, f) in source.fields().iter().enumerate() {
        let name = f.name();
        if table.column(name).is_none() {
            errors.add_message(0, i + 1, || {
                format!(
                    "schema: unexpected column `{name}` (not in the {} table)",
                    table.name()
                )
            });
        } else if source.fields().iter().take(i).any(|g| g.name() == name) {
            errors.add_message(0, i + 1, || format!("schema: duplicate column `{name}`"));
        }
    }
    for (j, c) in cols.iter().enumerate() {
        match source.fields().iter().position(|f| f.name() == c.name) {
            // Files written before the column existed.
            None if c.since > 1 => mapping.push(None),
            None => errors.add_message(0, j + 1, || format!("schema: missing column `{}`", c.name)),
            Some(k) => {
                let dt = source.field(k).data_type();
                match source_kind(c.ty, dt) {
                    Some(kind) => mapping.push(Some((k, kind))),
                    None => errors.add_message(0, k + 1, || {
                        format!(
                            "schema: {}: type {dt} cannot be read as {}",
                            c.name,
                            c.ty.data_type()
                        )
                    }),
                }
            }
        }
    }
    errors.list.sort_by_key(|e| e.column);
    errors.into_result(file)?;

    let reader = builder
        .with_batch_size(CHUNK_ROWS)
        .build()
        .map_err(pq_err(file))?;
    let mut sink = Sink::new(table, file, false);
    for (p, m) in sink.present.iter_mut().zip(&mapping) {
        *p = m.is_some();
    }
    sink.open_output(data_dir, table)?;
    let columns: Vec<usize> = mapping
        .iter()
        .map(|m| m.map_or(0, |(k, _)| k + 1))
        .collect();
    let mut row: u64 = 0;
    for batch in reader {
        let batch = batch.map_err(arrow_err(file))?;
        let srcs = mapping
            .iter()
            .map(|m| {
                m.map(|(k, kind)| convert(kind, batch.column(k), file))
                    .transpose()
            })
            .collect::<Result<Vec<Option<Src>>, IngestError>>()?;
        for r in 0..batch.num_rows() {
            row += 1;
            sink.push_row(
                |_| row,
                &columns,
                |i| srcs[i].as_ref().map_or(Value::Null, |s| s.value(r)),
            )?;
        }
        if let Some(bar) = bar {
            bar.inc(batch.num_rows() as u64);
        }
    }
    sink.finish()
}

// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    #[test]
    fn vocabulary_lookup_finds_exactly_its_words() {
        use cxfed_queries::schema::{CHANNELS, JOURNEY_STAGES, STATES};
        for list in [STATES, CHANNELS, JOURNEY_STAGES] {
            let v = Vocab::new(list);
            for w in list {
                assert_eq!(v.get(w.as_bytes()), Some(*w));
            }
            for w in list {
                let mut longer = w.to_string();
                longer.push('x');
                assert_eq!(v.get(longer.as_bytes()), None, "{longer}");
                assert_eq!(v.get(&w.as_bytes()[..w.len() - 1]), None);
                assert_eq!(
                    v.get(w.to_uppercase().as_bytes()).is_some(),
                    list.contains(&w.to_uppercase().as_str())
                );
            }
            assert_eq!(v.get(b""), None);
        }
        assert_eq!(Vocab::new(&[]).get(b"phone"), None);
    }

    use super::*;
    use std::io::Write;

    const OP_HEADER: &str = "case_id,person_id,agency,service,life_experience,journey_stage,\
        channel,state,age_band,opened_date,closed_date,wait_minutes,processing_days,\
        first_contact_resolved,abandoned,outcome";

    fn op_row(i: usize) -> String {
        format!(
            "SSA-C-{i:016x},SSA-P-{i:016x},SSA,Retirement benefits,approaching_retirement,apply,\
             phone,MD,62_64,2025-01-{:02},2025-02-01,35,20,true,false,approved",
            i % 28 + 1
        )
    }

    fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        let mut f = File::create(&path).expect("create");
        f.write_all(text.as_bytes()).expect("write");
        path
    }

    fn op_csv(rows: usize) -> String {
        let mut s = String::from(OP_HEADER);
        s.push('\n');
        for i in 0..rows {
            s.push_str(&op_row(i));
            s.push('\n');
        }
        s
    }

    fn list_all(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                out.push(e.path());
                out.extend(list_all(&e.path()));
            }
        }
        out
    }

    fn read_rows(path: &Path) -> usize {
        let f = File::open(path).expect("open");
        let reader = ParquetRecordBatchReaderBuilder::try_new(f)
            .expect("reader")
            .build()
            .expect("build");
        reader.map(|b| b.expect("batch").num_rows()).sum()
    }

    fn invalid(err: IngestError) -> (Vec<RowError>, u64) {
        match err {
            IngestError::Invalid { errors, total, .. } => (errors, total),
            other => panic!("expected Invalid, got {other}"),
        }
    }

    #[test]
    fn dates() {
        assert_eq!(parse_date(b"1970-01-01"), Ok(0));
        assert_eq!(parse_date(b"2024-02-29"), Ok(19_782));
        assert_eq!(parse_date(b"2025-02-29"), Err(true));
        assert_eq!(parse_date(b"2025-13-01"), Err(true));
        assert_eq!(parse_date(b"2025-1-01"), Err(false));
        assert_eq!(parse_date(b"2025/01/01"), Err(false));
        assert_eq!(parse_date(b"0000-01-01"), Ok(MIN_DAY));
        assert_eq!(parse_date(b"9999-12-31"), Ok(MAX_DAY));
        for d in [-800_000, MIN_DAY, -1, 0, 1, 19_782, 20_000, MAX_DAY] {
            let (y, m, dd) = civil_from_days(i64::from(d));
            assert_eq!(days_from_civil(y, m, dd), i64::from(d));
        }
        let mut buf = Vec::new();
        push_date(19_782, &mut buf);
        assert_eq!(buf, b"2024-02-29");
    }

    #[test]
    fn valid_csv_ingests_and_reads_back() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let input = write_file(tmp.path(), "op.csv", &op_csv(1000));
        let data = tmp.path().join("data");
        let report = ingest(&data, Table::Operational, &input, false).expect("ingest");
        assert_eq!(report.rows, 1000);
        assert!(report.path.starts_with(data.join("operational")));
        assert!(storage::is_data_file(&report.path));
        assert_eq!(read_rows(&report.path), 1000);
        assert_eq!(
            storage::data_files(&data, Table::Operational).expect("list"),
            vec![report.path]
        );
        // No temp file left behind; the directory records its schema version.
        assert_eq!(list_all(&data).len(), 3);
        assert_eq!(storage::schema_version(&data).expect("version"), 2);
    }

    #[test]
    fn bad_rows_are_located_and_nothing_is_written() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut text = String::from(OP_HEADER);
        text.push('\n');
        text.push_str(&op_row(0)); // line 2
        text.push('\n');
        text.push_str(&op_row(1).replace(",phone,", ",fax,")); // line 3, column 7
        text.push('\n');
        text.push_str(&op_row(2)); // line 4
        text.push('\n');
        // line 5: closed before opened (column 11) and abandoned not a boolean (column 15)
        text.push_str(
            &op_row(3)
                .replace(",2025-02-01,", ",2024-12-31,")
                .replace(",false,", ",no,"),
        );
        text.push('\n');
        let input = write_file(tmp.path(), "bad.csv", &text);
        let data = tmp.path().join("data");
        std::fs::create_dir(&data).expect("mkdir");
        let err = ingest(&data, Table::Operational, &input, false).expect_err("must fail");
        let shown = err.to_string();
        let (errors, total) = invalid(err);
        assert_eq!(total, 3, "{shown}");
        let at: Vec<(u64, usize)> = errors.iter().map(|e| (e.line, e.column)).collect();
        assert_eq!(at, vec![(3, 7), (5, 11), (5, 15)], "{shown}");
        let f = input.display().to_string();
        assert!(
            shown.contains(&format!("{f}:3:7: channel: \"fax\" is not allowed")),
            "{shown}"
        );
        assert!(
            shown.contains(&format!(
                "{f}:5:11: closed_date: 2024-12-31 is before opened_date 2025-01-04"
            )),
            "{shown}"
        );
        assert!(
            shown.contains(&format!("{f}:5:15: abandoned: \"no\" is not a boolean")),
            "{shown}"
        );
        assert!(
            list_all(&data).is_empty(),
            "data dir changed: {:?}",
            list_all(&data)
        );
        // A data dir that did not exist is not created either.
        let missing = tmp.path().join("nope");
        assert!(ingest(&missing, Table::Operational, &input, false).is_err());
        assert!(!missing.exists());
    }

    #[test]
    fn value_errors() {
        let tmp = tempfile::tempdir().expect("tempdir");
        // A CSV in the version-1 layout (still accepted; new columns derived or defaulted).
        let header = Table::Experience
            .columns_of_version(1)
            .iter()
            .map(|c| c.name)
            .collect::<Vec<_>>()
            .join(",");
        let good = "SSA-R-1,SSA-P-1,SSA-C-1,SSA,Retirement benefits,approaching_retirement,apply,phone,MD,62_64,2025-03-01,4,5,4,3,2,5,";
        let rows = [
            good.to_string(),
            good.replace(",4,5,4,", ",7,5,4,"), // trust out of range (col 12)
            good.replace(",SSA,", ",ssa,"),     // agency (col 4)
            good.replace(",MD,", ",md,"),       // state (col 9)
            good.replace("2025-03-01", "2025-02-30"), // date (col 11)
            good.replace("SSA-R-1", ""),        // required (col 1)
            good.replace(",4,5,4,", ",4.0,5,4,"), // not integer (col 12)
            good.replace("Retirement benefits", &"x".repeat(121)), // too long (col 5)
            good.replace(",62_64,", ",,"),      // optional: fine
            format!("{good},extra"),            // too many fields
            "SSA-R-1,SSA-P-1".to_string(),      // too few fields
        ];
        let text = format!("{header}\n{}\n", rows.join("\n"));
        let input = write_file(tmp.path(), "exp.csv", &text);
        let (errors, total) = invalid(validate(Table::Experience, &input).expect_err("invalid"));
        let at: Vec<(u64, usize)> = errors.iter().map(|e| (e.line, e.column)).collect();
        assert_eq!(
            at,
            vec![
                (3, 12),
                (4, 4),
                (5, 9),
                (6, 11),
                (7, 1),
                (8, 12),
                (9, 5),
                (11, 19),
                (12, 3)
            ]
        );
        assert_eq!(total, 9);
        let reasons: Vec<&str> = errors.iter().map(|e| e.reason.as_str()).collect();
        assert_eq!(reasons[0], "trust: 7 is outside 1..=5");
        assert!(
            reasons[1].starts_with("agency: \"ssa\" is not an agency code"),
            "{}",
            reasons[1]
        );
        assert!(reasons[2].contains("did you mean MD?"), "{}", reasons[2]);
        assert!(reasons[2].contains("(56 codes)"), "{}", reasons[2]);
        assert_eq!(
            reasons[3],
            "response_date: \"2025-02-30\" is not a calendar date"
        );
        assert_eq!(reasons[4], "response_id: required value is empty");
        assert_eq!(reasons[5], "trust: \"4.0\" is not an integer");
        assert!(
            reasons[6].starts_with("service: value has 121 characters"),
            "{}",
            reasons[6]
        );
        assert!(
            reasons[8].starts_with("case_id: missing; the row has 2 fields"),
            "{}",
            reasons[8]
        );
    }

    #[test]
    fn malformed_csv() {
        let tmp = tempfile::tempdir().expect("tempdir");
        // Invalid UTF-8 in a free-text field.
        let mut bytes = format!("{OP_HEADER}\n{}\n", op_row(0)).into_bytes();
        let row = op_row(1);
        let (a, b) = row.split_at(row.find("Retirement").expect("service"));
        bytes.extend_from_slice(a.as_bytes());
        bytes.push(0xff);
        bytes.extend_from_slice(b.as_bytes());
        bytes.push(b'\n');
        let input = tmp.path().join("utf8.csv");
        std::fs::write(&input, &bytes).expect("write");
        let (errors, _) = invalid(validate(Table::Operational, &input).expect_err("invalid"));
        assert_eq!((errors[0].line, errors[0].column), (3, 4));
        assert_eq!(errors[0].reason, "service: value is not valid UTF-8");

        // Unterminated quote on the last line.
        let text = format!(
            "{OP_HEADER}\n{}\n{}",
            op_row(0),
            op_row(1).replace(",approved", ",\"approved")
        );
        let input = write_file(tmp.path(), "quote.csv", &text);
        let (errors, _) = invalid(validate(Table::Operational, &input).expect_err("invalid"));
        assert_eq!((errors[0].line, errors[0].column), (3, 16), "{errors:?}");
        assert!(errors[0].reason.contains("unbalanced"), "{errors:?}");

        // Unterminated quote mid-file swallows the rest.
        let text = format!(
            "{OP_HEADER}\n{}\n{}\n{}\n",
            op_row(0),
            op_row(1).replace("Retirement benefits", "\"Retirement benefits"),
            op_row(2)
        );
        let input = write_file(tmp.path(), "quote2.csv", &text);
        let (errors, _) = invalid(validate(Table::Operational, &input).expect_err("invalid"));
        assert_eq!(errors[0].line, 3, "{errors:?}");

        // Empty file.
        let input = write_file(tmp.path(), "empty.csv", "");
        let (errors, _) = invalid(validate(Table::Operational, &input).expect_err("invalid"));
        assert_eq!((errors[0].line, errors[0].column), (1, 1));
    }

    #[test]
    fn header_errors() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let check = |header: &str| {
            let input = write_file(tmp.path(), "h.csv", &format!("{header}\n"));
            let data = tmp.path().join("data");
            let (errors, _) =
                invalid(ingest(&data, Table::Operational, &input, false).expect_err("invalid"));
            assert!(!data.exists());
            errors
                .into_iter()
                .map(|e| (e.line, e.column, e.reason))
                .collect::<Vec<_>>()
        };
        // Missing `outcome`.
        let e = check(&OP_HEADER.replace(",outcome", ""));
        assert_eq!(e.len(), 1);
        assert_eq!((e[0].0, e[0].1), (1, 16));
        assert!(
            e[0].2
                .starts_with("missing column `outcome`; the header must be exactly: case_id,")
        );
        // Unexpected column and a misspelling.
        let e = check(
            &OP_HEADER
                .replace("channel,", "chanel,")
                .replace(",outcome", ",outcome,notes"),
        );
        let at: Vec<_> = e
            .iter()
            .map(|x| (x.1, x.2.split(';').next().unwrap_or("").to_string()))
            .collect();
        assert_eq!(
            at,
            vec![
                (
                    7,
                    "unexpected column `chanel` (not in the operational table)".to_string()
                ),
                (7, "missing column `channel`".to_string()),
                (
                    17,
                    "unexpected column `notes` (not in the operational table)".to_string()
                ),
            ]
        );
        // Out of order.
        let e = check(&OP_HEADER.replace("case_id,person_id", "person_id,case_id"));
        assert_eq!(e.len(), 2);
        assert_eq!(
            e[0].2,
            "column `person_id` is out of order: column 1 must be `case_id`"
        );
        // A UTF-8 byte order mark is fine.
        let input = write_file(tmp.path(), "bom.csv", &format!("\u{feff}{}", op_csv(3)));
        assert_eq!(validate(Table::Operational, &input).expect("valid"), 3);
    }

    #[test]
    fn many_errors_are_counted() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut text = format!("{OP_HEADER}\n");
        for i in 0..250 {
            text.push_str(&op_row(i).replace(",35,", ",-1,"));
            text.push('\n');
        }
        let input = write_file(tmp.path(), "many.csv", &text);
        let err = validate(Table::Operational, &input).expect_err("invalid");
        let shown = err.to_string();
        let (errors, total) = invalid(err);
        assert_eq!(errors.len(), MAX_LISTED_ERRORS);
        assert_eq!(total, 250);
        let lines: Vec<&str> = shown.lines().collect();
        assert_eq!(lines.len(), 102);
        assert!(
            lines[0].ends_with(":2:12: wait_minutes: -1 is outside 0..=10080"),
            "{}",
            lines[0]
        );
        assert_eq!(lines[100], "... and 150 more errors");
        assert!(lines[101].ends_with(": 250 errors; nothing was ingested"));
    }

    #[test]
    fn parquet_round_trip() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let input = write_file(tmp.path(), "op.csv", &op_csv(70_000));
        let data = tmp.path().join("data");
        let first = ingest(&data, Table::Operational, &input, false).expect("csv ingest");
        let second = ingest(&data, Table::Operational, &first.path, false).expect("parquet ingest");
        assert_eq!(second.rows, 70_000);
        assert_ne!(first.path, second.path);
        assert_eq!(
            storage::data_files(&data, Table::Operational)
                .expect("list")
                .len(),
            2
        );
        let read_all = |p: &Path| {
            let f = File::open(p).expect("open");
            let r = ParquetRecordBatchReaderBuilder::try_new(f)
                .expect("reader")
                .build()
                .expect("build");
            let batches: Vec<RecordBatch> = r.map(|b| b.expect("batch")).collect();
            arrow::compute::concat_batches(&Table::Operational.arrow_schema(), &batches)
                .expect("concat")
        };
        let (a, b) = (read_all(&first.path), read_all(&second.path));
        assert_eq!(a, b);
        assert_eq!(a.schema(), Table::Operational.arrow_schema());
        // The wrong table: schema errors on "line" 0.
        let (errors, _) =
            invalid(validate(Table::Experience, &first.path).expect_err("wrong table"));
        assert!(
            errors
                .iter()
                .all(|e| e.line == 0 && e.reason.starts_with("schema: "))
        );
        assert!(
            errors
                .iter()
                .any(|e| e.reason == "schema: missing column `trust`")
        );
    }

    #[test]
    fn parquet_values_are_validated() {
        use arrow::datatypes::{Field, Schema};
        let tmp = tempfile::tempdir().expect("tempdir");
        // Pandas-style: scores as float64 with NaN-as-null, an int64 out of range; written
        // before schema version 2 (the newer columns absent: derived or defaulted).
        let cols = Table::Experience.columns_of_version(1);
        let fields: Vec<Field> = cols
            .iter()
            .map(|c| match c.ty {
                ColumnType::Int8 => Field::new(c.name, DataType::Float64, true),
                _ => Field::new(c.name, DataType::Utf8, true),
            })
            .collect();
        let schema = Arc::new(Schema::new(fields));
        let text = |v: [&str; 3]| -> ArrayRef { Arc::new(StringArray::from(v.to_vec())) };
        let mut arrays: Vec<ArrayRef> = Vec::new();
        for c in cols {
            arrays.push(match c.name {
                "response_id" => text(["R1", "R2", "R3"]),
                "person_id" => text(["P1", "P2", "P3"]),
                "case_id" => text(["C1", "C2", "C3"]),
                "agency" => text(["SSA", "SSA", "SSA"]),
                "service" => text(["S", "S", "S"]),
                "life_experience" => text(["having_a_child"; 3]),
                "journey_stage" => text(["apply"; 3]),
                "channel" => text(["website"; 3]),
                "state" => text(["VA"; 3]),
                "age_band" => text(["25_44"; 3]),
                "response_date" => text(["2025-01-02", "2025-01-02", "2025-01-32"]),
                "trust" => Arc::new(Float64Array::from(vec![Some(4.0), None, Some(4.5)])),
                _ => Arc::new(Float64Array::from(vec![Some(5.0), Some(1.0), Some(3.0)])),
            });
        }
        let batch = RecordBatch::try_new(schema.clone(), arrays).expect("batch");
        let path = tmp.path().join("in.parquet");
        let mut w = ArrowWriter::try_new(File::create(&path).expect("create"), schema, None)
            .expect("writer");
        w.write(&batch).expect("write");
        w.close().expect("close");
        let (errors, total) = invalid(validate(Table::Experience, &path).expect_err("invalid"));
        assert_eq!(total, 2);
        assert_eq!((errors[0].line, errors[0].column), (3, 11));
        assert_eq!(
            errors[0].reason,
            "row 3: response_date: \"2025-01-32\" is not a calendar date"
        );
        assert_eq!(errors[1].reason, "row 3: trust: 4.5 is not an integer");
        assert!(
            IngestError::Invalid {
                file: path.clone(),
                errors: errors.clone(),
                total
            }
            .to_string()
            .contains("in.parquet:3:12: row 3: trust: 4.5 is not an integer")
        );
    }

    // -----------------------------------------------------------------------------------------
    // Line numbers: the line an editor shows, whatever the line ends.

    /// A row of an experience CSV in the version-1 layout (trust is column 12), with a unique
    /// response id; `trust` and `service` as given (`service` quoted when it holds a line end).
    fn exp_row(i: usize, trust: u8, service: &str) -> String {
        let service = if service.contains(['\n', '\r']) {
            format!("\"{service}\"")
        } else {
            service.to_string()
        };
        format!(
            "SSA-R-{i},SSA-P-{i},SSA-C-{i},SSA,{service},approaching_retirement,apply,\"phone\",MD,\
             62_64,2025-03-01,{trust},5,4,3,2,5,"
        )
    }

    fn exp_header() -> String {
        let names: Vec<&str> = Table::Experience
            .columns_of_version(1)
            .iter()
            .map(|c| c.name)
            .collect();
        names.join(",")
    }

    /// The errors of validating `text` as an experience CSV: (line, column, reason).
    fn located(dir: &Path, name: &str, text: &str) -> Vec<(u64, usize, String)> {
        let input = write_file(dir, name, text);
        let (errors, _) = invalid(validate(Table::Experience, &input).expect_err("invalid"));
        errors
            .into_iter()
            .map(|e| (e.line, e.column, e.reason))
            .collect()
    }

    /// 60 data rows with `trust` 9 on lines 3 and 57 (the rows of response 1 and 55); each line
    /// ends with `end(line)`.
    fn trust_errors_file(bom: bool, end: impl Fn(usize) -> &'static str) -> String {
        let mut text = String::from(if bom { "\u{feff}" } else { "" });
        text.push_str(&exp_header());
        text.push_str(end(1));
        for i in 0..60 {
            let trust = if i == 1 || i == 55 { 9 } else { 4 };
            text.push_str(&exp_row(i, trust, "Retirement benefits"));
            text.push_str(end(i + 2));
        }
        text
    }

    /// The line end of each line, by its number.
    type LineEnds<'a> = &'a dyn Fn(usize) -> &'static str;

    #[test]
    fn errors_name_the_editor_line_for_lf_crlf_cr_mixed_and_bom() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let variants: [(&str, bool, LineEnds); 8] = [
            ("lf", false, &|_| "\n"),
            ("crlf", false, &|_| "\r\n"),
            ("cr", false, &|_| "\r"),
            ("mixed", false, &|l| ["\n", "\r\n", "\r"][l % 3]),
            ("bom-lf", true, &|_| "\n"),
            ("bom-crlf", true, &|_| "\r\n"),
            ("bom-mixed", true, &|l| ["\r\n", "\r", "\n"][l % 3]),
            // No line end after the last row.
            ("crlf-unterminated", false, &|l| {
                if l == 61 { "" } else { "\r\n" }
            }),
        ];
        for (name, bom, end) in variants {
            let errors = located(
                tmp.path(),
                &format!("{name}.csv"),
                &trust_errors_file(bom, end),
            );
            let want = vec![
                (3, 12, "trust: 9 is outside 1..=5".to_string()),
                (57, 12, "trust: 9 is outside 1..=5".to_string()),
            ];
            assert_eq!(errors, want, "{name}");
        }
        // The whole message, as `cxfed ingest` prints it.
        let input = write_file(tmp.path(), "bad.csv", &trust_errors_file(false, |_| "\r\n"));
        let shown = validate(Table::Experience, &input)
            .expect_err("invalid")
            .to_string();
        assert!(
            shown.contains("bad.csv:57:12: trust: 9 is outside 1..=5"),
            "{shown}"
        );
    }

    #[test]
    fn errors_count_empty_lines_the_csv_reader_skips() {
        let tmp = tempfile::tempdir().expect("tempdir");
        for (name, blank, end) in [
            ("lf", "\n", "\n"),
            ("crlf", "\r\n", "\r\n"),
            ("crlf-two", "\r\n\r\n", "\r\n"),
        ] {
            // The empty line(s) come after line 10: line 57 moves down.
            let mut text = trust_errors_file(false, |_| end);
            let at = text
                .match_indices(end)
                .nth(9)
                .map(|(i, _)| i + end.len())
                .expect("line 10");
            text.insert_str(at, blank);
            let shift = blank.matches('\n').count() as u64;
            let lines: Vec<(u64, usize)> = located(tmp.path(), "blank.csv", &text)
                .into_iter()
                .map(|(l, c, _)| (l, c))
                .collect();
            assert_eq!(lines, vec![(3, 12), (57 + shift, 12)], "{name}");
        }
    }

    #[test]
    fn errors_name_the_editor_line_after_and_inside_quoted_multi_line_fields() {
        let tmp = tempfile::tempdir().expect("tempdir");
        for (name, end) in [("lf", "\n"), ("crlf", "\r\n"), ("cr", "\r")] {
            for (inside, extra) in [(end, 1), ("\n\n", 2), ("\r\n", 1), ("\r", 1)] {
                let mut text = exp_header();
                text.push_str(end);
                for i in 0..60 {
                    let (trust, service) = match i {
                        1 | 55 => (9, "Retirement benefits".to_string()),
                        // Line 7: a service spanning lines (itself an error).
                        5 => (4, format!("Retirement{inside}benefits")),
                        // Line 23 (+ extra): a bad trust after a multi-line field, in the
                        // same row.
                        20 => (9, format!("Survivor{inside}benefits")),
                        _ => (4, "Retirement benefits".to_string()),
                    };
                    text.push_str(&exp_row(i, trust, &service));
                    text.push_str(end);
                }
                let e = extra;
                let lines: Vec<(u64, usize)> = located(tmp.path(), "multi.csv", &text)
                    .into_iter()
                    .map(|(l, c, _)| (l, c))
                    .collect();
                assert_eq!(
                    lines,
                    vec![
                        (3, 12),
                        (7, 5),
                        (22 + e, 5),
                        (22 + 2 * e, 12),
                        (57 + 2 * e, 12)
                    ],
                    "{name}, {inside:?} inside a field"
                );
            }
        }
    }

    /// A reader that hands out one byte per call: every line end straddles a read boundary.
    struct OneByte<'a>(&'a [u8]);

    impl Read for OneByte<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match (self.0.split_first(), buf.first_mut()) {
                (Some((&b, rest)), Some(slot)) => {
                    *slot = b;
                    self.0 = rest;
                    Ok(1)
                }
                _ => Ok(0),
            }
        }
    }

    #[test]
    fn record_lines_do_not_depend_on_how_the_input_is_read() {
        let text = "a,b\r\n\r\nc,\"d\r\ne\"\r\rf,\"g\rh\"\n\ni,j\r";
        // (first line, line of field 2, last line) of each record, counted by hand.
        let want = vec![(1, 1, 1), (3, 3, 4), (6, 6, 7), (9, 9, 9)];
        let parse = |input: Box<dyn Read + '_>, capacity: usize| {
            let mut csv = csv::ReaderBuilder::new()
                .has_headers(false)
                .flexible(true)
                .buffer_capacity(capacity)
                .from_reader(LineReader::new(input));
            let mut record = csv::ByteRecord::new();
            let mut lines = RecordLines::default();
            let mut got = Vec::new();
            while next_record(&mut csv, &mut record, &mut lines, Path::new("t.csv")).expect("read")
            {
                got.push((lines.first(), lines.field(1), lines.last));
            }
            got
        };
        assert_eq!(parse(Box::new(text.as_bytes()), 1 << 20), want);
        assert_eq!(parse(Box::new(OneByte(text.as_bytes())), 1), want);
        assert_eq!(parse(Box::new(OneByte(text.as_bytes())), 3), want);
        // A quote left open runs to the end of the file, line ends and all.
        for text in ["a\n\"b\nc\n", "a\r\n\"b\r\nc\r\n", "a\r\"b\rc\r"] {
            let want = vec![(1, 1, 1), (2, 4, 4)];
            assert_eq!(parse(Box::new(text.as_bytes()), 1 << 20), want, "{text:?}");
            assert_eq!(
                parse(Box::new(OneByte(text.as_bytes())), 1),
                want,
                "{text:?}"
            );
        }
        assert_eq!(line_breaks(b"a\r\nb\nc\rd\r"), 4);
        assert_eq!(line_breaks(b"\r\r\n\n"), 3);
    }
}
