//! The standard CX schema: the two tables, their columns, what each column may be used for,
//! and the controlled vocabularies. Everything that validates data or queries reads this.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

/// Version of the schema below. Bump it when a column or vocabulary changes.
pub const SCHEMA_VERSION: u32 = 1;

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

    /// The Arrow schema every node stores and every query is planned against.
    pub fn arrow_schema(self) -> SchemaRef {
        let fields: Vec<Field> = self
            .columns()
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
    }
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
];

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
];

/// The column that identifies a person (the privacy unit).
pub const PERSON_ID: &str = "person_id";
/// The only column two tables may be joined on.
pub const JOIN_KEY: &str = "case_id";

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
