//! `cxfed import touchpoints`: GSA Touchpoints "CX Data Collection" response exports (the
//! FY2024+ A-11 form) into the `experience` table.
//!
//! Read from the export: `external_id`, `question_1` (thumbs: `0`/`1`; or a 1–5 trust score with
//! `--question-1 five-point`), the fourteen `positive_*` / `negative_*` driver flags (`0`, `1`,
//! `null` or empty) and `created_at` (ISO 8601; or `--response-date`). Every other column is
//! ignored, and `question_4` — free text — is **never stored**: only counted.
//!
//! `external_id` is pseudonymized with HMAC-SHA256 under a per-node secret key
//! (`<data_dir>/pseudonym.key`, mode 0600, made by the first import that adds rows): the same
//! respondent gets the same `person_id` in every import on this node, and nobody without the
//! key can link it back. A response's id is the keyed hash of its `external_id` and
//! `created_at` (or `--response-date`), so re-importing a cumulative export skips the responses
//! this node already holds (and a response repeated within the file is added once).
//!
//! The rows are validated (FILE:LINE:COLUMN errors against the export) and then added through
//! [`crate::ingest`], atomically: a file with any bad row writes nothing — no rows, no key, no
//! migration of an older data directory.

use std::collections::HashSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use cxfed_queries::schema::{DRIVERS, Domain, Table};
use ring::hmac;

use crate::ingest::{IngestError, IngestReport, LineReader, RecordLines, RowError, next_record};

/// The per-node pseudonymization key, inside the data directory.
pub const KEY_FILE: &str = "pseudonym.key";

/// How `question_1` was asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Question1 {
    /// Thumbs up (`1`) or down (`0`): stored as `trust_thumbs_up`.
    Thumbs,
    /// A 1–5 agreement score: stored as `trust`.
    FivePoint,
}

/// What every imported row shares.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// The agency (its code).
    pub agency: String,
    /// The service the survey was about.
    pub service: String,
    /// Channel code.
    pub channel: String,
    /// Priority Life Experience code.
    pub life_experience: String,
    /// Journey stage code.
    pub journey_stage: String,
    /// How `question_1` was asked.
    pub question_1: Question1,
    /// The response date when the export has no `created_at`.
    pub response_date: Option<String>,
}

/// What an import did.
#[derive(Debug, Clone)]
pub struct ImportReport {
    /// The rows added; `None` when every response in the file was skipped.
    pub ingest: Option<IngestReport>,
    /// Free-text answers (`question_4`) present in the file and not stored.
    pub comments_dropped: u64,
    /// Responses skipped because this node already holds them (an earlier import of the same,
    /// or of a cumulative, export).
    pub already_stored: u64,
    /// Responses skipped because an earlier line of the same file is the same response (same
    /// `external_id` and `created_at`).
    pub repeated: u64,
}

impl ImportReport {
    /// Rows added.
    pub fn rows_added(&self) -> u64 {
        self.ingest.as_ref().map_or(0, |i| i.rows)
    }
}

/// Imports `file` into `data_dir`. On any error nothing is written.
pub fn import(
    data_dir: &Path,
    file: &Path,
    opts: &ImportOptions,
) -> Result<ImportReport, IngestError> {
    check_options(opts, file)?;
    let invalid = |errors: Vec<RowError>| IngestError::Invalid {
        file: file.to_path_buf(),
        total: errors.len() as u64,
        errors,
    };
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| IngestError::Io { path, source }
    };
    let input = std::fs::File::open(file).map_err(io(file))?;
    // Lines as an editor shows them, whatever the line ends (see `ingest::LineReader`).
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(LineReader::new(input));
    let mut raw = csv::ByteRecord::new();
    let mut lines = RecordLines::default();
    // An empty file has an empty header: every column is reported missing on line 1.
    let header: Vec<String> = if next_record(&mut reader, &mut raw, &mut lines, file)? {
        raw.iter()
            .map(|h| {
                String::from_utf8_lossy(h)
                    .trim_start_matches('\u{feff}')
                    .to_string()
            })
            .collect()
    } else {
        Vec::new()
    };
    let header_line = lines.first().max(1);
    let col = |name: &str| header.iter().position(|h| h == name);
    let mut errors = Vec::new();
    let mut need = |name: &str| {
        let c = col(name);
        if c.is_none() {
            errors.push(RowError {
                line: header_line,
                column: header.len() + 1,
                reason: format!("missing column `{name}` of the Touchpoints CX response export"),
            });
        }
        c
    };
    let external = need("external_id");
    let q1 = need("question_1");
    let flags: Vec<Option<usize>> = ["positive", "negative"]
        .iter()
        .flat_map(|side| DRIVERS.iter().map(move |d| format!("{side}_{d}")))
        .map(|name| need(&name))
        .collect();
    let created = col("created_at");
    if created.is_none() && opts.response_date.is_none() {
        errors.push(RowError {
            line: header_line,
            column: header.len() + 1,
            reason: "no `created_at` column: pass --response-date YYYY-MM-DD".into(),
        });
    }
    let comments = col("question_4");
    if !errors.is_empty() {
        return Err(invalid(errors));
    }
    // The key stays in memory until rows are written: a rejected file leaves no key behind.
    let key = load_key(data_dir).map_err(io(data_dir))?;
    let hmac_key = hmac::Key::new(hmac::HMAC_SHA256, key.bytes());

    // Rows, as an experience CSV in the current layout, keyed by response id.
    let columns: Vec<&str> = Table::Experience.columns().iter().map(|c| c.name).collect();
    let mut new_rows: Vec<(String, String)> = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut repeated = 0u64;
    let mut comments_dropped = 0;
    let mut rows = 0u64;
    while next_record(&mut reader, &mut raw, &mut lines, file)? {
        rows += 1;
        if raw.len() != header.len() {
            let (found, want) = (raw.len(), header.len());
            // Where the missing field would start, or where the first extra one does.
            let at = if found < want {
                found.saturating_sub(1)
            } else {
                want
            };
            errors.push(RowError {
                line: lines.field(at),
                column: found.min(want) + 1,
                reason: format!(
                    "the row has {found} field{} but the header has {want}",
                    if found == 1 { "" } else { "s" }
                ),
            });
            continue;
        }
        let record = match csv::StringRecord::from_byte_record(std::mem::take(&mut raw)) {
            Ok(record) => record,
            Err(e) => {
                let c = e.utf8_error().field();
                let name = header.get(c).map_or("?", |h| h.as_str());
                errors.push(RowError {
                    line: lines.field(c),
                    column: c + 1,
                    reason: format!("{name}: value is not valid UTF-8"),
                });
                raw = e.into_byte_record();
                continue;
            }
        };
        let field = |c: Option<usize>| c.and_then(|c| record.get(c)).unwrap_or("").trim();
        let mut bad = |c: Option<usize>, reason: String| {
            errors.push(RowError {
                line: c.map_or(lines.first(), |c| lines.field(c)),
                column: c.map_or(0, |c| c + 1),
                reason,
            })
        };
        if comments.is_some_and(|c| record.get(c).is_some_and(|t| !t.trim().is_empty())) {
            comments_dropped += 1;
        }
        let id = field(external);
        if id.is_empty() {
            bad(external, "external_id: required value is empty".into());
        }
        // The response's moment as the export gives it (its identity, with the respondent).
        let mut when = opts.response_date.clone().unwrap_or_default();
        let date = match created {
            Some(c) => {
                let v = field(Some(c));
                when = v.to_string();
                match v
                    .get(..10)
                    .filter(|d| crate::ingest::parse_date(d.as_bytes()).is_ok())
                {
                    Some(d) => d.to_string(),
                    None => {
                        bad(
                            Some(c),
                            format!("created_at: {v:?} is not an ISO 8601 date or time"),
                        );
                        continue;
                    }
                }
            }
            None => opts.response_date.clone().unwrap_or_default(),
        };
        let answer = field(q1);
        let (trust, thumbs) = match (opts.question_1, answer) {
            (Question1::Thumbs, "0" | "1") => ("", answer),
            (Question1::FivePoint, "1" | "2" | "3" | "4" | "5") => (answer, ""),
            (Question1::Thumbs, _) => {
                bad(
                    q1,
                    format!("question_1: {answer:?} is not a thumbs answer (0 or 1)"),
                );
                continue;
            }
            (Question1::FivePoint, _) => {
                bad(
                    q1,
                    format!("question_1: {answer:?} is not a score from 1 to 5"),
                );
                continue;
            }
        };
        let mut flag_values = Vec::with_capacity(flags.len());
        for &f in &flags {
            match field(f) {
                v @ ("0" | "1") => flag_values.push(v),
                "" | "null" => flag_values.push(""),
                v => {
                    let name = f.and_then(|c| header.get(c)).map_or("flag", |h| h.as_str());
                    bad(f, format!("{name}: {v:?} is not 0, 1 or null"));
                }
            }
        }
        if id.is_empty() || flag_values.len() != flags.len() {
            continue;
        }
        let person = pseudonym(&hmac_key, "person", &[id]);
        let case = pseudonym(&hmac_key, "case", &[id, &date]);
        let a = &opts.agency;
        let response = format!(
            "{a}-R-{}",
            pseudonym(&hmac_key, "response", &[id, when.as_str()])
        );
        if !seen.insert(response.clone()) {
            repeated += 1;
            continue;
        }
        let mut row: Vec<String> = vec![
            response.clone(),
            format!("{a}-P-{person}"),
            format!("{a}-TP-{case}"),
            a.clone(),
            csv_field(&opts.service),
            opts.life_experience.clone(),
            opts.journey_stage.clone(),
            opts.channel.clone(),
            String::new(), // state
            String::new(), // age band
            date,
            trust.to_string(),
        ];
        row.extend(std::iter::repeat_n(String::new(), 6)); // the other legacy items
        row.extend([String::new(), String::new()]); // fiscal year and quarter: derived
        row.push("a11_2024".into());
        row.push(thumbs.to_string());
        row.extend(flag_values.iter().map(|v| v.to_string()));
        debug_assert_eq!(row.len(), columns.len());
        new_rows.push((response, row.join(",")));
    }
    if !errors.is_empty() {
        return Err(invalid(errors));
    }
    if rows == 0 {
        return Err(invalid(vec![RowError {
            line: 2,
            column: 1,
            reason: "the export has no responses".into(),
        }]));
    }
    // Responses this node already holds (with a new key there can be none).
    let stored = if key.is_new() {
        HashSet::new()
    } else {
        stored_response_ids(data_dir, &seen)?
    };
    let already_stored = stored.len() as u64;
    let mut report = ImportReport {
        ingest: None,
        comments_dropped,
        already_stored,
        repeated,
    };
    new_rows.retain(|(id, _)| !stored.contains(id));
    if new_rows.is_empty() {
        return Ok(report);
    }
    let mut out = Vec::new();
    out.extend_from_slice(columns.join(",").as_bytes());
    out.push(b'\n');
    for (_, row) in &new_rows {
        out.extend_from_slice(row.as_bytes());
        out.push(b'\n');
    }
    let mut temp = tempfile::Builder::new()
        .prefix(".cxfed-touchpoints-")
        .suffix(".csv")
        .tempfile()
        .map_err(io(file))?;
    temp.write_all(&out).map_err(io(temp.path()))?;
    temp.flush().map_err(io(temp.path()))?;
    // Validated and written aside; the key is saved, then the rows are added by a rename.
    let staged = crate::ingest::stage(data_dir, Table::Experience, temp.path(), false)
        .map_err(|e| rename_file(e, file))?;
    key.persist(data_dir)
        .map_err(io(&data_dir.join(KEY_FILE)))?;
    report.ingest = Some(staged.commit().map_err(|e| rename_file(e, file))?);
    Ok(report)
}

/// Of `wanted`, the response ids already in this node's `experience` files.
fn stored_response_ids(
    data_dir: &Path,
    wanted: &HashSet<String>,
) -> Result<HashSet<String>, IngestError> {
    use arrow::array::{Array, AsArray};
    use datafusion::parquet::arrow::ProjectionMask;
    use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let mut found = HashSet::new();
    let files = crate::storage::data_files(data_dir, Table::Experience).map_err(|source| {
        IngestError::Io {
            path: data_dir.to_path_buf(),
            source,
        }
    })?;
    for path in files {
        let pq = |source| IngestError::Parquet {
            path: path.clone(),
            source,
        };
        let f = std::fs::File::open(&path).map_err(|source| IngestError::Io {
            path: path.clone(),
            source,
        })?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(f).map_err(pq)?;
        let mask = ProjectionMask::columns(builder.parquet_schema(), ["response_id"]);
        for batch in builder.with_projection(mask).build().map_err(pq)? {
            let batch = batch.map_err(|source| IngestError::Arrow {
                path: path.clone(),
                source,
            })?;
            let Some(ids) = batch.column(0).as_string_opt::<i32>() else {
                continue;
            };
            for i in 0..ids.len() {
                if ids.is_valid(i) && wanted.contains(ids.value(i)) {
                    found.insert(ids.value(i).to_string());
                }
            }
        }
    }
    Ok(found)
}

/// Checks the command-line values every row gets against the schema, before reading the file.
fn check_options(opts: &ImportOptions, file: &Path) -> Result<(), IngestError> {
    let mut errors = Vec::new();
    let mut check = |column: &str, value: &str| {
        let Some(c) = Table::Experience.column(column) else {
            return;
        };
        let ok = match c.domain {
            Domain::Vocabulary(list) => list.contains(&value),
            Domain::Agency => crate::ingest::is_agency_code(value.as_bytes()),
            Domain::FreeText => {
                !value.trim().is_empty()
                    && value.chars().count() <= 120
                    && !value.chars().any(char::is_control)
            }
            _ => true,
        };
        if !ok {
            let allowed = match c.domain {
                Domain::Vocabulary(list) => format!(" (one of: {})", list.join(", ")),
                _ => String::new(),
            };
            errors.push(RowError {
                line: 0,
                column: 0,
                reason: format!(
                    "--{}: {value:?} is not allowed{allowed}",
                    column.replace('_', "-")
                ),
            });
        }
    };
    check("agency", &opts.agency);
    check("service", &opts.service);
    check("channel", &opts.channel);
    check("life_experience", &opts.life_experience);
    check("journey_stage", &opts.journey_stage);
    if let Some(d) = &opts.response_date
        && crate::ingest::parse_date(d.as_bytes()).is_err()
    {
        errors.push(RowError {
            line: 0,
            column: 0,
            reason: format!("--response-date: {d:?} is not a date (YYYY-MM-DD)"),
        });
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(IngestError::Invalid {
            file: file.to_path_buf(),
            total: errors.len() as u64,
            errors,
        })
    }
}

/// A field for the generated CSV: quoted when it holds a comma or quote.
fn csv_field(v: &str) -> String {
    if v.contains([',', '"']) {
        format!("\"{}\"", v.replace('"', "\"\""))
    } else {
        v.to_string()
    }
}

/// Errors from ingesting the generated rows name the export, not the temporary file.
fn rename_file(e: IngestError, file: &Path) -> IngestError {
    match e {
        IngestError::Invalid { errors, total, .. } => IngestError::Invalid {
            file: file.to_path_buf(),
            errors,
            total,
        },
        other => other,
    }
}

/// 16 hex digits of HMAC-SHA256(key, purpose ‖ 0 ‖ parts joined by 0).
fn pseudonym(key: &hmac::Key, purpose: &str, parts: &[&str]) -> String {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(purpose.as_bytes());
    for p in parts {
        ctx.update(&[0]);
        ctx.update(p.as_bytes());
    }
    cxfed_protocol::signing::hex(&ctx.sign().as_ref()[..8])
}

/// The node's pseudonymization key: read from the data directory, or made in memory (32 random
/// bytes) and saved only by [`PseudonymKey::persist`].
struct PseudonymKey {
    bytes: Vec<u8>,
    new: bool,
}

impl std::fmt::Debug for PseudonymKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PseudonymKey(<redacted>)")
    }
}

impl PseudonymKey {
    fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Whether the key was made by this import (no earlier import wrote rows with it).
    fn is_new(&self) -> bool {
        self.new
    }

    /// Saves a new key atomically, mode 0600 (never readable by others, even briefly).
    fn persist(&self, data_dir: &Path) -> std::io::Result<()> {
        if !self.new {
            return Ok(());
        }
        std::fs::create_dir_all(data_dir)?;
        crate::storage::write_atomic(
            &data_dir.join(KEY_FILE),
            format!("{}\n", cxfed_protocol::signing::hex(&self.bytes)).as_bytes(),
            true,
        )
    }
}

fn load_key(data_dir: &Path) -> std::io::Result<PseudonymKey> {
    let path: PathBuf = data_dir.join(KEY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let bytes = cxfed_protocol::signing::unhex(text.trim())
                .filter(|b| b.len() == 32)
                .ok_or_else(|| {
                    std::io::Error::other(format!("{}: not a 32-byte hex key", path.display()))
                })?;
            Ok(PseudonymKey { bytes, new: false })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut b = [0u8; 32];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
                .map_err(|_| std::io::Error::other("random number generator failed"))?;
            Ok(PseudonymKey {
                bytes: b.to_vec(),
                new: true,
            })
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Touchpoints export header with the comment (`question_4`, column 3) before
    /// `question_1` (column 4), so a multi-line comment moves the answer to a later line.
    fn header() -> String {
        let mut cols = vec!["id", "external_id", "question_4", "question_1"];
        let flags: Vec<String> = ["positive", "negative"]
            .iter()
            .flat_map(|side| DRIVERS.iter().map(move |d| format!("{side}_{d}")))
            .collect();
        cols.extend(flags.iter().map(String::as_str));
        cols.push("created_at");
        cols.join(",")
    }

    fn row(i: usize, comment: &str, q1: &str) -> String {
        let flags = vec!["0"; 2 * DRIVERS.len()].join(",");
        format!("{i},TP-{i},\"{comment}\",{q1},{flags},2025-10-07T14:47:14Z")
    }

    fn opts() -> ImportOptions {
        ImportOptions {
            agency: "SSA".into(),
            service: "Retirement benefits".into(),
            channel: "website".into(),
            life_experience: "approaching_retirement".into(),
            journey_stage: "apply".into(),
            question_1: Question1::FivePoint,
            response_date: None,
        }
    }

    /// (line, column, reason) of importing `text`; checks that nothing was written.
    fn located(dir: &Path, name: &str, text: &[u8]) -> Vec<(u64, usize, String)> {
        let file = dir.join(name);
        std::fs::write(&file, text).expect("write");
        let data = dir.join("data");
        let err = import(&data, &file, &opts()).expect_err("invalid");
        assert!(!data.exists(), "a rejected import wrote {}", data.display());
        match err {
            IngestError::Invalid { errors, .. } => errors
                .into_iter()
                .map(|e| (e.line, e.column, e.reason))
                .collect(),
            other => panic!("expected Invalid, got {other}"),
        }
    }

    /// 60 responses, `question_1` 9 on lines 3 and 57; a multi-line comment (`inside` its
    /// line end) on the rows of responses 5 and 20 when `inside` is given.
    fn export(bom: bool, end: impl Fn(usize) -> &'static str, inside: Option<&str>) -> String {
        let mut text = String::from(if bom { "\u{feff}" } else { "" });
        text.push_str(&header());
        text.push_str(end(1));
        for i in 0..60 {
            let q1 = if matches!(i, 1 | 20 | 55) { "9" } else { "4" };
            let comment = match (i, inside) {
                (5 | 20, Some(nl)) => format!("slow,{nl}but fine"),
                _ => "ok".to_string(),
            };
            text.push_str(&row(i, &comment, q1));
            text.push_str(end(i + 2));
        }
        text
    }

    /// The line end of each line, by its number.
    type LineEnds<'a> = &'a dyn Fn(usize) -> &'static str;

    #[test]
    fn errors_name_the_editor_line_for_lf_crlf_cr_mixed_and_bom() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let variants: [(&str, bool, LineEnds); 7] = [
            ("lf", false, &|_| "\n"),
            ("crlf", false, &|_| "\r\n"),
            ("cr", false, &|_| "\r"),
            ("mixed", false, &|l| ["\n", "\r\n", "\r"][l % 3]),
            ("bom-lf", true, &|_| "\n"),
            ("bom-crlf", true, &|_| "\r\n"),
            ("crlf-unterminated", false, &|l| {
                if l == 61 { "" } else { "\r\n" }
            }),
        ];
        let reason = "question_1: \"9\" is not a score from 1 to 5".to_string();
        for (name, bom, end) in variants {
            let text = export(bom, end, None);
            let errors = located(tmp.path(), &format!("{name}.csv"), text.as_bytes());
            assert_eq!(
                errors,
                vec![
                    (3, 4, reason.clone()),
                    (22, 4, reason.clone()),
                    (57, 4, reason.clone())
                ],
                "{name}"
            );
        }
    }

    #[test]
    fn errors_name_the_editor_line_after_and_inside_multi_line_comments() {
        let tmp = tempfile::tempdir().expect("tempdir");
        for (name, end) in [("lf", "\n"), ("crlf", "\r\n"), ("cr", "\r")] {
            for (inside, e) in [(end, 1), ("\n\n", 2), ("\r\n", 1), ("\r", 1)] {
                let text = export(false, |_| end, Some(inside));
                let lines: Vec<(u64, usize)> = located(tmp.path(), "multi.csv", text.as_bytes())
                    .into_iter()
                    .map(|(l, c, _)| (l, c))
                    .collect();
                // Response 20 starts on line 22 + e; its answer follows its comment's lines.
                assert_eq!(
                    lines,
                    vec![(3, 4), (22 + 2 * e, 4), (57 + 2 * e, 4)],
                    "{name}, {inside:?} inside the comment"
                );
            }
        }
    }

    #[test]
    fn short_rows_and_bad_utf8_are_located_on_their_line() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ncols = header().split(',').count();
        let mut text = format!("{}\r\n", header()).into_bytes();
        text.extend_from_slice(format!("{}\r\n", row(0, "a\r\nb", "4")).as_bytes()); // lines 2-3
        text.extend_from_slice(b"1,TP-1,\"x\"\r\n"); // line 4: three fields
        let mut bad = row(2, "fine", "4").into_bytes(); // line 5: invalid UTF-8 in external_id
        bad.insert(4, 0xff);
        text.extend_from_slice(&bad);
        text.extend_from_slice(b"\r\n");
        let errors = located(tmp.path(), "short.csv", &text);
        assert_eq!(
            errors,
            vec![
                (
                    4,
                    4,
                    format!("the row has 3 fields but the header has {ncols}")
                ),
                (5, 2, "external_id: value is not valid UTF-8".to_string()),
            ]
        );
    }
}
