//! The standard CX schema: the two tables, their columns, what each column may be used for,
//! and the controlled vocabularies. Everything that validates data or queries reads this.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

/// Version of the schema below. Bump it when a column or vocabulary changes.
///
/// - 1: the legacy A-11 items, dimensions, operational facts.
/// - 2: adds federal fiscal year and quarter (derived from the table's date), the survey format,
///   the FY2024+ thumbs-up trust answer and its "what went well / what didn't" driver flags.
///   Columns are only ever appended, so a version-1 file is a prefix of version 2.
pub const SCHEMA_VERSION: u32 = 2;

/// The two tables every node holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Table {
    /// One row per survey response (A-11 Section 280 items).
    Experience,
    /// One row per transaction or case.
    Operational,
}

impl Table {
    /// Both tables, in a fixed order.
    pub const ALL: [Table; 2] = [Table::Experience, Table::Operational];

    /// The SQL name of the table.
    pub fn name(self) -> &'static str {
        match self {
            Table::Experience => "experience",
            Table::Operational => "operational",
        }
    }

    /// Parses a table name (exact, lowercase).
    pub fn from_name(name: &str) -> Option<Table> {
        Table::ALL.into_iter().find(|t| t.name() == name)
    }

    /// The columns of the table, in file order.
    pub fn columns(self) -> &'static [Column] {
        match self {
            Table::Experience => EXPERIENCE,
            Table::Operational => OPERATIONAL,
        }
    }

    /// Looks a column up by name.
    pub fn column(self, name: &str) -> Option<&'static Column> {
        self.columns().iter().find(|c| c.name == name)
    }

    /// The columns a file or CSV of schema `version` has (a prefix of [`Table::columns`]).
    pub fn columns_of_version(self, version: u32) -> &'static [Column] {
        let cols = self.columns();
        let n = cols.iter().take_while(|c| c.since <= version).count();
        &cols[..n]
    }

    /// Completes a batch of version-1 columns (in order) with the columns added since: derived
    /// ones computed, the rest set to their value for older rows or null. For building rows in
    /// memory (tests, tools); files on disk are upgraded, with validation, by the node.
    pub fn complete_v1_batch(
        self,
        batch: &arrow::array::RecordBatch,
    ) -> Result<arrow::array::RecordBatch, arrow::error::ArrowError> {
        use arrow::array::{
            Array, ArrayRef, Date32Array, Int8Array, Int32Array, StringArray, new_null_array,
        };
        let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
        for c in &self.columns()[columns.len().min(self.columns().len())..] {
            let rows = batch.num_rows();
            let array: ArrayRef = match (c.derived, c.absent) {
                (Some(d), _) => {
                    let src = batch
                        .column_by_name(d.source())
                        .and_then(|a| a.as_any().downcast_ref::<Date32Array>().cloned())
                        .ok_or_else(|| {
                            arrow::error::ArrowError::SchemaError(format!("{} missing", d.source()))
                        })?;
                    let values = (0..rows).map(|r| src.is_valid(r).then(|| d.value(src.value(r))));
                    match c.ty {
                        ColumnType::Int8 => {
                            Arc::new(Int8Array::from_iter(values.map(|v| v.map(|x| x as i8))))
                        }
                        _ => Arc::new(Int32Array::from_iter(values.map(|v| v.map(|x| x as i32)))),
                    }
                }
                (None, Some(text)) => Arc::new(StringArray::from(vec![Some(text); rows])),
                (None, None) => new_null_array(&c.ty.data_type(), rows),
            };
            columns.push(array);
        }
        arrow::array::RecordBatch::try_new(self.arrow_schema(), columns)
    }

    /// The Arrow schema every node stores and every query is planned against.
    pub fn arrow_schema(self) -> SchemaRef {
        self.arrow_schema_of_version(SCHEMA_VERSION)
    }

    /// The Arrow schema of files written in schema `version`.
    pub fn arrow_schema_of_version(self, version: u32) -> SchemaRef {
        let fields: Vec<Field> = self
            .columns_of_version(version)
            .iter()
            .map(|c| Field::new(c.name, c.ty.data_type(), !c.required))
            .collect();
        Arc::new(Schema::new(fields))
    }
}

/// What a column may be used for in a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Node-local pseudonym: never selectable, groupable or filterable.
    Identifier,
    /// Categorical: groupable, filterable.
    Dimension,
    /// A date: groupable only truncated to month, quarter or year; filterable.
    Date,
    /// A number that may only be aggregated or filtered on; never grouped.
    Measure,
}

/// The storage type of a column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    /// UTF-8 text.
    Text,
    /// ISO-8601 calendar date (`YYYY-MM-DD`).
    Date,
    /// Small integer (survey scores).
    Int8,
    /// 32-bit integer (minutes, days).
    Int32,
    /// `true` / `false`.
    Bool,
}

impl ColumnType {
    /// The Arrow type for this column type.
    pub fn data_type(self) -> DataType {
        match self {
            ColumnType::Text => DataType::Utf8,
            ColumnType::Date => DataType::Date32,
            ColumnType::Int8 => DataType::Int8,
            ColumnType::Int32 => DataType::Int32,
            ColumnType::Bool => DataType::Boolean,
        }
    }
}

/// Allowed values of a text column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Domain {
    /// Any non-empty text up to 120 characters without control characters.
    FreeText,
    /// Agency abbreviation: 2–12 uppercase ASCII letters or digits.
    Agency,
    /// One of the listed lowercase codes.
    Vocabulary(&'static [&'static str]),
    /// Inclusive integer range (also the declared contribution bound of a measure).
    Range(i64, i64),
    /// No further restriction beyond the type.
    Any,
}

/// One column of the CX schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Column {
    /// Column name (the CSV header and the SQL name).
    pub name: &'static str,
    /// Storage type.
    pub ty: ColumnType,
    /// How queries may use it.
    pub kind: Kind,
    /// Whether every row must have a value.
    pub required: bool,
    /// Allowed values.
    pub domain: Domain,
    /// The schema version that added the column.
    pub since: u32,
    /// How the value follows from other columns, if it does.
    pub derived: Option<Derived>,
    /// The value of a column added after version 1 in rows written without it (`None`: null).
    pub absent: Option<&'static str>,
}

/// A column computed from another one; input that has it must agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Derived {
    /// Federal fiscal year of the named date column (FY N runs Oct 1 N−1 .. Sep 30 N).
    FiscalYear(&'static str),
    /// Federal fiscal quarter (1–4; Q1 = Oct–Dec) of the named date column.
    FiscalQuarter(&'static str),
}

impl Derived {
    /// The value for a date given as days since 1970-01-01.
    pub fn value(self, days: i32) -> i64 {
        let (y, m) = year_month(days);
        match self {
            Derived::FiscalYear(_) => {
                if m >= 10 {
                    y + 1
                } else {
                    y
                }
            }
            Derived::FiscalQuarter(_) => i64::from((m + 2) % 12 / 3 + 1),
        }
    }

    /// The date column it is computed from.
    pub fn source(self) -> &'static str {
        match self {
            Derived::FiscalYear(c) | Derived::FiscalQuarter(c) => c,
        }
    }
}

/// Civil year and month (1–12) of a day count since 1970-01-01 (proleptic Gregorian).
fn year_month(days: i32) -> (i64, u32) {
    // Howard Hinnant's civil_from_days.
    let z = i64::from(days) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m)
}

const fn col(
    name: &'static str,
    ty: ColumnType,
    kind: Kind,
    required: bool,
    domain: Domain,
) -> Column {
    Column {
        name,
        ty,
        kind,
        required,
        domain,
        since: 1,
        derived: None,
        absent: None,
    }
}

/// A column added in version 2.
const fn v2(mut c: Column) -> Column {
    c.since = 2;
    c
}

const fn derived(mut c: Column, d: Derived) -> Column {
    c.derived = Some(d);
    c
}

const fn absent_as(mut c: Column, value: &'static str) -> Column {
    c.absent = Some(value);
    c
}

/// Priority Life Experiences.
pub const LIFE_EXPERIENCES: &[&str] = &[
    "approaching_retirement",
    "recovering_from_disaster",
    "transition_to_civilian_life",
    "having_a_child",
    "financial_shock",
];
/// Journey stages.
pub const JOURNEY_STAGES: &[&str] = &[
    "awareness",
    "eligibility",
    "apply",
    "wait",
    "decision",
    "receive",
    "renew_or_appeal",
];
/// GSA Touchpoints channel codes.
pub const CHANNELS: &[&str] = &[
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
/// USPS codes: 50 states, DC and the territories.
pub const STATES: &[&str] = &[
    "AL", "AK", "AZ", "AR", "CA", "CO", "CT", "DE", "FL", "GA", "HI", "ID", "IL", "IN", "IA", "KS",
    "KY", "LA", "ME", "MD", "MA", "MI", "MN", "MS", "MO", "MT", "NE", "NV", "NH", "NJ", "NM", "NY",
    "NC", "ND", "OH", "OK", "OR", "PA", "RI", "SC", "SD", "TN", "TX", "UT", "VT", "VA", "WA", "WV",
    "WI", "WY", "DC", "PR", "GU", "VI", "AS", "MP",
];
/// Age bands.
pub const AGE_BANDS: &[&str] = &["under_25", "25_44", "45_61", "62_64", "65_74", "75_plus"];
/// Case outcomes.
pub const OUTCOMES: &[&str] = &["approved", "denied", "pending", "withdrawn"];

/// Survey formats: the legacy seven-item A-11 form, and the FY2024+ form (one trust item, then
/// "what went well / what didn't" driver checklists).
pub const SURVEY_FORMATS: &[&str] = &["a11_legacy", "a11_2024"];

/// The drivers of the FY2024+ form's checklists, in schema order.
pub const DRIVERS: &[&str] = &[
    "effectiveness",
    "ease",
    "efficiency",
    "transparency",
    "humanity",
    "employee",
    "other",
];

/// The seven legacy A-11 Section 280 items, in schema order.
pub const SCORES: &[&str] = &[
    "trust",
    "satisfaction",
    "effectiveness",
    "ease",
    "efficiency",
    "transparency",
    "employee_helpfulness",
];

use ColumnType as T;
use Domain as D;
use Kind as K;

const SCORE: Domain = D::Range(1, 5);

static EXPERIENCE: &[Column] = &[
    col("response_id", T::Text, K::Identifier, true, D::FreeText),
    col("person_id", T::Text, K::Identifier, true, D::FreeText),
    col("case_id", T::Text, K::Identifier, true, D::FreeText),
    col("agency", T::Text, K::Dimension, true, D::Agency),
    col("service", T::Text, K::Dimension, true, D::FreeText),
    col(
        "life_experience",
        T::Text,
        K::Dimension,
        true,
        D::Vocabulary(LIFE_EXPERIENCES),
    ),
    col(
        "journey_stage",
        T::Text,
        K::Dimension,
        true,
        D::Vocabulary(JOURNEY_STAGES),
    ),
    col(
        "channel",
        T::Text,
        K::Dimension,
        true,
        D::Vocabulary(CHANNELS),
    ),
    col("state", T::Text, K::Dimension, false, D::Vocabulary(STATES)),
    col(
        "age_band",
        T::Text,
        K::Dimension,
        false,
        D::Vocabulary(AGE_BANDS),
    ),
    col("response_date", T::Date, K::Date, true, D::Any),
    col("trust", T::Int8, K::Measure, false, SCORE),
    col("satisfaction", T::Int8, K::Measure, false, SCORE),
    col("effectiveness", T::Int8, K::Measure, false, SCORE),
    col("ease", T::Int8, K::Measure, false, SCORE),
    col("efficiency", T::Int8, K::Measure, false, SCORE),
    col("transparency", T::Int8, K::Measure, false, SCORE),
    col("employee_helpfulness", T::Int8, K::Measure, false, SCORE),
    v2(derived(
        col("fiscal_year", T::Int32, K::Dimension, true, FISCAL_YEAR),
        Derived::FiscalYear("response_date"),
    )),
    v2(derived(
        col(
            "fiscal_quarter",
            T::Int8,
            K::Dimension,
            true,
            D::Range(1, 4),
        ),
        Derived::FiscalQuarter("response_date"),
    )),
    v2(absent_as(
        col(
            "survey_format",
            T::Text,
            K::Dimension,
            true,
            D::Vocabulary(SURVEY_FORMATS),
        ),
        "a11_legacy",
    )),
    v2(col("trust_thumbs_up", T::Int8, K::Measure, false, FLAG)),
    v2(col(
        "positive_effectiveness",
        T::Int8,
        K::Measure,
        false,
        FLAG,
    )),
    v2(col("positive_ease", T::Int8, K::Measure, false, FLAG)),
    v2(col("positive_efficiency", T::Int8, K::Measure, false, FLAG)),
    v2(col(
        "positive_transparency",
        T::Int8,
        K::Measure,
        false,
        FLAG,
    )),
    v2(col("positive_humanity", T::Int8, K::Measure, false, FLAG)),
    v2(col("positive_employee", T::Int8, K::Measure, false, FLAG)),
    v2(col("positive_other", T::Int8, K::Measure, false, FLAG)),
    v2(col(
        "negative_effectiveness",
        T::Int8,
        K::Measure,
        false,
        FLAG,
    )),
    v2(col("negative_ease", T::Int8, K::Measure, false, FLAG)),
    v2(col("negative_efficiency", T::Int8, K::Measure, false, FLAG)),
    v2(col(
        "negative_transparency",
        T::Int8,
        K::Measure,
        false,
        FLAG,
    )),
    v2(col("negative_humanity", T::Int8, K::Measure, false, FLAG)),
    v2(col("negative_employee", T::Int8, K::Measure, false, FLAG)),
    v2(col("negative_other", T::Int8, K::Measure, false, FLAG)),
];

/// A checklist flag or thumbs answer: 1 = yes/up, 0 = no/down.
const FLAG: Domain = D::Range(0, 1);
/// Fiscal years a row may fall in.
const FISCAL_YEAR: Domain = D::Range(1901, 2200);

static OPERATIONAL: &[Column] = &[
    col("case_id", T::Text, K::Identifier, true, D::FreeText),
    col("person_id", T::Text, K::Identifier, true, D::FreeText),
    col("agency", T::Text, K::Dimension, true, D::Agency),
    col("service", T::Text, K::Dimension, true, D::FreeText),
    col(
        "life_experience",
        T::Text,
        K::Dimension,
        true,
        D::Vocabulary(LIFE_EXPERIENCES),
    ),
    col(
        "journey_stage",
        T::Text,
        K::Dimension,
        true,
        D::Vocabulary(JOURNEY_STAGES),
    ),
    col(
        "channel",
        T::Text,
        K::Dimension,
        true,
        D::Vocabulary(CHANNELS),
    ),
    col("state", T::Text, K::Dimension, false, D::Vocabulary(STATES)),
    col(
        "age_band",
        T::Text,
        K::Dimension,
        false,
        D::Vocabulary(AGE_BANDS),
    ),
    col("opened_date", T::Date, K::Date, true, D::Any),
    col("closed_date", T::Date, K::Date, false, D::Any),
    col(
        "wait_minutes",
        T::Int32,
        K::Measure,
        false,
        D::Range(0, 10_080),
    ),
    col(
        "processing_days",
        T::Int32,
        K::Measure,
        false,
        D::Range(0, 3_650),
    ),
    col(
        "first_contact_resolved",
        T::Bool,
        K::Dimension,
        false,
        D::Any,
    ),
    col("abandoned", T::Bool, K::Dimension, false, D::Any),
    col(
        "outcome",
        T::Text,
        K::Dimension,
        true,
        D::Vocabulary(OUTCOMES),
    ),
    v2(derived(
        col("fiscal_year", T::Int32, K::Dimension, true, FISCAL_YEAR),
        Derived::FiscalYear("opened_date"),
    )),
    v2(derived(
        col(
            "fiscal_quarter",
            T::Int8,
            K::Dimension,
            true,
            D::Range(1, 4),
        ),
        Derived::FiscalQuarter("opened_date"),
    )),
];

/// The column that identifies a person (the privacy unit).
pub const PERSON_ID: &str = "person_id";
/// The only column two tables may be joined on.
pub const JOIN_KEY: &str = "case_id";

/// Names under which the linkage key (the identifier agencies share, the SSN in practice) could
/// be asked for. It is never a column of any table nor a table of its own (a node keeps it
/// keyed, outside the query engine's catalog): a query naming any of these, as a column or as
/// a table, in any case, is refused as an identifier (`CXF-Q012`) before it is planned.
pub const LINKAGE_NAMES: &[&str] = &["ssn", "social_security_number", "linkage_key", "linkage"];

/// Whether `name` (an SQL identifier, any case) names the linkage key.
pub fn is_linkage_name(name: &str) -> bool {
    LINKAGE_NAMES.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// Declared contribution bounds of a measure for differential privacy: values are clamped to
/// these before noise is calibrated. Tighter than the validation ranges where the long tail
/// carries little signal (a wait over 4 hours counts as 4 hours; processing over a year as a
/// year).
pub fn dp_bounds(name: &str) -> Option<(f64, f64)> {
    match name {
        "wait_minutes" => Some((0.0, 240.0)),
        "processing_days" => Some((0.0, 365.0)),
        _ => match column_anywhere(name)?.domain {
            Domain::Range(lo, hi) if column_anywhere(name)?.kind == Kind::Measure => {
                Some((lo as f64, hi as f64))
            }
            _ => None,
        },
    }
}

/// Bucket edges of wait_minutes' public percentile grid (see [`percentile_grid`]). Waits are
/// whole minutes, so edges sit halfway between them and a bucket holds the minutes 0, 1, 2, 3,
/// 4, 5, 6–7, 8–9, 10–11, 12–14, 15–19, 20–24, 25–29, 30–39, 40–49, 50–59, 60–74, 75–89,
/// 90–119, 120–149, 150–179, 180–209, 210–239, and 240 (every longer wait, clamped to the DP
/// bound): one minute wide where waits are common, widening with the tail.
pub const WAIT_MINUTES_GRID: &[f64] = &[
    -0.5, 0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 7.5, 9.5, 11.5, 14.5, 19.5, 24.5, 29.5, 39.5, 49.5, 59.5,
    74.5, 89.5, 119.5, 149.5, 179.5, 209.5, 239.5, 240.5,
];

/// Bucket edges of processing_days' public percentile grid: the days 0, 1, 2, 3–4, 5–6, 7–9,
/// 10–13, 14–20, 21–29, 30–44, 45–59, 60–89, 90–119, 120–149, 150–179, 180–239, 240–299,
/// 300–364, and 365 (a year or more, clamped to the DP bound).
pub const PROCESSING_DAYS_GRID: &[f64] = &[
    -0.5, 0.5, 1.5, 2.5, 4.5, 6.5, 9.5, 13.5, 20.5, 29.5, 44.5, 59.5, 89.5, 119.5, 149.5, 179.5,
    239.5, 299.5, 364.5, 365.5,
];

/// The public bucket grid a percentile of a measure is read from in differential-privacy mode:
/// ascending bucket edges e₀ < e₁ < … < e_B, bucket b holding values in [e_b, e_{b+1}) (the
/// last one closed), covering the measure's [`dp_bounds`]; an answer spreads a bucket's values
/// evenly over it. Declared, never derived from data: nodes release one noisy count per
/// bucket. wait_minutes and processing_days have the grids above (fine where values are
/// common, coarse in the tail, the clamped tail a bucket of its own); an integer-valued
/// measure with at most 20 values (the 1–5 scores) has one bucket per integer v,
/// [v − ½, v + ½). `None`: the measure has no grid, and no percentile of it is answered.
pub fn percentile_grid(name: &str) -> Option<Vec<f64>> {
    match name {
        "wait_minutes" => Some(WAIT_MINUTES_GRID.to_vec()),
        "processing_days" => Some(PROCESSING_DAYS_GRID.to_vec()),
        _ => match column_anywhere(name)? {
            Column {
                kind: Kind::Measure,
                domain: Domain::Range(lo, hi),
                ..
            } if hi > lo && hi - lo <= 20 => {
                Some((*lo..=*hi + 1).map(|v| v as f64 - 0.5).collect())
            }
            _ => None,
        },
    }
}

/// Looks a column up in either table (the kind of a name is the same in both).
pub fn column_anywhere(name: &str) -> Option<&'static Column> {
    Table::ALL.into_iter().find_map(|t| t.column(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_the_same_in_both_tables() {
        for t in Table::ALL {
            for c in t.columns() {
                if let Some(other) = column_anywhere(c.name) {
                    assert_eq!(other.kind, c.kind, "{} differs between tables", c.name);
                }
            }
        }
        assert_eq!(
            Table::Experience.column("person_id").map(|c| c.kind),
            Some(Kind::Identifier)
        );
    }

    #[test]
    fn fiscal_year_and_quarter_start_in_october() {
        let day = |y: i64, m: u32, d: u32| {
            // days since 1970-01-01, by counting (test-only, small range)
            let mut n = 0i64;
            for yy in 1970..y {
                n += if (yy % 4 == 0 && yy % 100 != 0) || yy % 400 == 0 {
                    366
                } else {
                    365
                };
            }
            let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
            let months = [
                31,
                if leap { 29 } else { 28 },
                31,
                30,
                31,
                30,
                31,
                31,
                30,
                31,
                30,
                31,
            ];
            n += months[..(m - 1) as usize].iter().sum::<i64>() + i64::from(d) - 1;
            n as i32
        };
        let fy = Derived::FiscalYear("d");
        let fq = Derived::FiscalQuarter("d");
        for (y, m, d, want_fy, want_q) in [
            (2025, 9, 30, 2025, 4),
            (2025, 10, 1, 2026, 1),
            (2025, 12, 31, 2026, 1),
            (2026, 1, 1, 2026, 2),
            (2026, 3, 31, 2026, 2),
            (2026, 4, 1, 2026, 3),
            (2026, 7, 1, 2026, 4),
            (2024, 2, 29, 2024, 2),
        ] {
            let days = day(y, m, d);
            assert_eq!(
                (fy.value(days), fq.value(days)),
                (want_fy, want_q),
                "{y}-{m}-{d}"
            );
        }
    }

    #[test]
    fn the_linkage_key_is_in_no_table() {
        for t in Table::ALL {
            for c in t.columns() {
                assert!(!is_linkage_name(c.name), "{} in {}", c.name, t.name());
            }
            assert!(!is_linkage_name(t.name()));
        }
        assert!(is_linkage_name("SSN") && is_linkage_name("Linkage_Key"));
        assert!(!is_linkage_name("person_id"));
    }

    #[test]
    fn version_one_is_a_prefix() {
        assert_eq!(Table::Experience.columns_of_version(1).len(), 18);
        assert_eq!(Table::Operational.columns_of_version(1).len(), 16);
        for t in Table::ALL {
            assert_eq!(t.columns_of_version(SCHEMA_VERSION), t.columns());
        }
    }

    #[test]
    fn arrow_schema_matches_columns() {
        let s = Table::Operational.arrow_schema();
        assert_eq!(s.fields().len(), Table::Operational.columns().len());
        assert_eq!(
            s.field_with_name("wait_minutes")
                .map(|f| f.data_type().clone())
                .ok(),
            Some(DataType::Int32)
        );
        assert_eq!(STATES.len(), 56);
    }
}
