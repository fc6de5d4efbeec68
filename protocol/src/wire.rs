//! JSON bodies of the `/v1/*` endpoints and the conventions of the Arrow IPC partials.
//!
//! Version 2 of the protocol (version 1 lacked the coordinator in analysts' signatures). A node
//! refuses a request whose `protocol` it does not speak.

use serde::{Deserialize, Serialize};

use crate::signing::{RequestSignature, SignatureError, Signer};

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 2;

/// Media type of `/v1/partial` responses.
pub const ARROW_STREAM: &str = "application/vnd.apache.arrow.stream";

/// Arrow schema metadata key: groups the node withheld because they were below its own k.
pub const META_SUPPRESSED: &str = "cxfed.suppressed_groups";
/// Arrow schema metadata key: cells a node withheld within the groups it released.
pub const META_SUPPRESSED_CELLS: &str = "cxfed.suppressed_cells";
/// Arrow schema metadata key: the partial's encoding and noise scales (JSON).
pub const META_PARTIAL: &str = "cxfed.partial";
/// Arrow schema metadata key: the agency of the node that produced the partial.
pub const META_AGENCY: &str = "cxfed.agency";

/// HTTP header carrying the query id on every response.
pub const HEADER_QUERY_ID: &str = "x-cxfed-query-id";

fn default_true() -> bool {
    true
}

fn default_protocol() -> u32 {
    PROTOCOL_VERSION
}

/// `POST /v1/query` (role analyst).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[non_exhaustive]
#[serde(deny_unknown_fields)]
pub struct QueryRequest {
    /// The analyst's SQL.
    pub sql: String,
    /// Fail unless every node answered (default). `false` accepts a partial federation answer.
    #[serde(default = "default_true")]
    pub require_all: bool,
    /// ε to spend on each node (at most each node's `epsilon_per_query`; default: that).
    /// Non-finite values travel as strings ([`crate::epsilon_json`]) so that nodes refuse them.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::epsilon_json"
    )]
    pub epsilon: Option<f64>,
    /// The analyst's signature over this request (see [`crate::signing`]). Nodes refuse
    /// unsigned queries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<RequestSignature>,
}

/// What one node did with a federated query.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct NodeStatus {
    /// The node's agency.
    pub agency: String,
    /// `ok`, `refused`, `error` or `unreachable`.
    pub status: NodeState,
    /// Why, when not ok.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Groups this node withheld (below its own k).
    #[serde(default)]
    pub suppressed_groups: u64,
    /// Cells this node withheld within the groups it returned (`k-only`).
    #[serde(default)]
    pub suppressed_cells: u64,
    /// Partial groups this node returned.
    #[serde(default)]
    pub groups: u64,
    /// ε this node spent (differential-privacy mode only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epsilon: Option<f64>,
}

/// Outcome of one node's part of a query.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Answered.
    #[default]
    Ok,
    /// Refused the query (its own validation or policy).
    Refused,
    /// Failed while answering.
    Error,
    /// Could not be reached or timed out.
    Unreachable,
}

/// How a person reads one output column of a [`QueryResponse`]: what the query itself says
/// about it (its `ROUND`, its calendar unit) and the whole range its values can take.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ColumnFormat {
    /// Digits after the decimal point the query rounded this column to (`ROUND(x, d)`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decimals: Option<u32>,
    /// The calendar unit the column names, when it is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calendar: Option<Calendar>,
    /// Width of the whole range the column's values can take (e.g. 4 for `AVG` of a 1–5
    /// score): a noise interval wider than this says nothing about the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<f64>,
}

/// Calendar units of an output column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Calendar {
    /// A day (a date, or a time truncated to a day, week, month or year): shown without a
    /// time of day.
    Date,
    /// `date_trunc('quarter', …)`: the first day of a calendar quarter, which is also a
    /// federal fiscal quarter (shown as the date and its label, e.g. `FY2025 Q1`).
    Quarter,
    /// The federal fiscal year (FY N runs Oct 1 N−1 .. Sep 30 N): shown as `FY2025`.
    FiscalYear,
    /// The federal fiscal quarter (1–4, Q1 = Oct–Dec): shown as `Q1`.
    FiscalQuarter,
}

/// `POST /v1/query` response.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct QueryResponse {
    /// Id of this query in every node's audit log.
    pub query_id: String,
    /// Output column names.
    pub columns: Vec<String>,
    /// Output rows: numbers, strings (dates as ISO-8601) or null.
    pub rows: Vec<Vec<serde_json::Value>>,
    /// Groups withheld by the coordinator plus groups nodes reported withholding.
    pub suppressed_groups: u64,
    /// Cells (one aggregate of a released group) withheld because a region of rows it reads
    /// holds 1 to k − 1 people (`k-only`; NULL in `rows`): by the coordinator plus by nodes.
    #[serde(default)]
    pub suppressed_cells: u64,
    /// Cells released as NULL (in `rows`) because a node that returned their group withheld
    /// its part of them (fewer than its k people there): the other nodes' parts alone are not
    /// the federation's number, so no number is released.
    #[serde(default)]
    pub incomplete_cells: u64,
    /// Rows released without some answering node's part: that node returned nothing for the
    /// group (it holds none of its rows, or fewer than its k — below its DP threshold in `dp`
    /// mode; nobody but that node knows which). They are named per row in `missing_parts`.
    #[serde(default)]
    pub incomplete_groups: u64,
    /// Per row, the agencies of the answering nodes that returned nothing for its group
    /// (empty list: every answering node contributed). Empty when no row lacks a part.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing_parts: Vec<Vec<String>>,
    /// Per output column, how a person reads it (rounding, calendar unit, whole range); empty
    /// from an older node (then every column is shown as it comes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub formats: Vec<ColumnFormat>,
    /// Per row, the columns whose noise interval is wider than the measure's whole range
    /// ([`ColumnFormat::range`]): released, but not informative. Empty when no cell is.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_informative: Vec<Vec<String>>,
    /// One entry per node of the federation, this node included.
    pub nodes: Vec<NodeStatus>,
    /// False when some node did not contribute (only with `require_all = false`).
    pub complete: bool,
    /// `dp` when any node added noise, else `k-only`.
    #[serde(default = "default_mode")]
    pub privacy: String,
    /// Per row and column, the half-width of the 95% noise interval of the value (null when
    /// the value is exact or no interval is derived). Empty when no node added noise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ci95: Vec<Vec<Option<f64>>>,
    /// Per row and column, the standard deviation of the noise in the value (`ci95` / 1.96);
    /// same shape and nulls as `ci95`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub noise_sd: Vec<Vec<Option<f64>>>,
    /// For a journey query (the same people at two agencies), what its columns are, so that a
    /// client can draw it as a flow from one agency to the other; absent for other queries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub journey: Option<JourneyShape>,
}

/// The shape of a journey answer: which agency the people start from, which one they may
/// reach, and what each output column is.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct JourneyShape {
    /// The value side's agency (`SSA`): the journey's people are its people.
    pub from: String,
    /// Its table (`experience`).
    pub from_table: String,
    /// The membership side's agency (`CMS`): where some of them are too.
    pub to: String,
    /// Its table (`operational`).
    pub to_table: String,
    /// `LEFT JOIN`: the rows whose `to-group` column is NULL are the people *not* at `to`
    /// (`INNER JOIN`: every row is people at both).
    pub left: bool,
    /// Whether `to`'s group column may itself be NULL: then, under `LEFT JOIN`, a NULL
    /// `to-group` also holds people at `to` without a value there.
    #[serde(default)]
    pub to_group_optional: bool,
    /// Per output column: `from-group`, `to-group`, `count`, `sum` or `avg`.
    pub roles: Vec<String>,
    /// The `from` table's column that `SUM` and `AVG` read, if any does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measure: Option<String>,
}

impl QueryRequest {
    /// A request for `sql` requiring every node, at each node's default ε.
    pub fn new(sql: impl Into<String>) -> Self {
        QueryRequest {
            sql: sql.into(),
            require_all: true,
            epsilon: None,
            signature: None,
        }
    }

    /// Accept (`false`) or refuse (`true`) a partial federation answer.
    pub fn require_all(mut self, require_all: bool) -> Self {
        self.require_all = require_all;
        self
    }

    /// Ask to spend `epsilon` per node.
    pub fn epsilon(mut self, epsilon: Option<f64>) -> Self {
        self.epsilon = epsilon;
        self
    }

    /// Signs the request as `signer` (fresh nonce, now) for the node of agency `coordinator`,
    /// the node it will be sent to.
    pub fn sign(mut self, signer: &Signer, coordinator: &str) -> Result<Self, SignatureError> {
        self.signature =
            Some(signer.sign(coordinator, &self.sql, self.epsilon, self.require_all)?);
        Ok(self)
    }
}

fn default_mode() -> String {
    "k-only".into()
}

/// `POST /v1/partial` (role node): the analyst's SQL as the coordinator received it. The node
/// plans and validates it itself and derives its own partial plan; it never runs SQL written
/// by the coordinator.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct PartialRequest {
    /// Protocol version of the coordinator.
    #[serde(default = "default_protocol")]
    pub protocol: u32,
    /// The query id the coordinator assigned.
    pub query_id: String,
    /// The analyst's SQL.
    pub sql: String,
    /// The analyst identity the coordinator names (must be the signature's).
    pub analyst: String,
    /// ε the analyst asked to spend (each node spends at most its own maximum), as signed
    /// ([`crate::epsilon_json`]).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::epsilon_json"
    )]
    pub epsilon: Option<f64>,
    /// The analyst's `require_all`, as signed.
    #[serde(default = "default_true")]
    pub require_all: bool,
    /// The analyst's signature, forwarded unchanged. Nodes refuse partials without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<RequestSignature>,
    /// Secure aggregation: the roster of nodes whose masked partials the coordinator will add
    /// (every node checks it, then masks its partial so only the sum is readable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secagg: Option<SecAggRound>,
}

/// `POST /v1/journey` (role node): one step of a journey query (the same people at two
/// agencies), run by the coordinator between the membership node B and the value node A
/// ([`crate::psi_sum`]): `members` to B, `values` to A, `sums` to B. Every step carries the
/// analyst's signed request; A and B check it (B once, at `members`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JourneyRequest {
    /// Protocol version of the coordinator.
    #[serde(default = "default_protocol")]
    pub protocol: u32,
    /// The query id the coordinator assigned.
    pub query_id: String,
    /// The analyst's SQL (a journey query).
    pub sql: String,
    /// The analyst identity the coordinator names (must be the signature's).
    pub analyst: String,
    /// ε the analyst asked to spend, as signed.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::epsilon_json"
    )]
    pub epsilon: Option<f64>,
    /// The analyst's `require_all`, as signed.
    #[serde(default = "default_true")]
    pub require_all: bool,
    /// The analyst's signature, forwarded unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<RequestSignature>,
    /// Which step.
    pub step: JourneyStep,
}

/// A step of [`JourneyRequest`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "step", rename_all = "snake_case", deny_unknown_fields)]
pub enum JourneyStep {
    /// To B: its blinded, group-labelled members (answer: [`crate::psi_sum::MembersMessage`]).
    Members {
        /// The coordinator's fresh result key.
        result_key: crate::psi_sum::PublicKey,
    },
    /// To A: its blinded values encrypted to the result key, against B's members (answer:
    /// [`JourneyValues`]).
    Values {
        /// The coordinator's result key (the same as B's).
        result_key: crate::psi_sum::PublicKey,
        /// B's answer to `members`.
        members: crate::psi_sum::MembersMessage,
    },
    /// To B: A's values, to sum over the people at both and at A only (answer:
    /// [`JourneySums`]).
    Sums {
        /// A's answer to `values`.
        values: crate::psi_sum::ValuesMessage,
    },
}

/// A's answer to [`JourneyStep::Values`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JourneyValues {
    /// The message for B.
    pub values: crate::psi_sum::ValuesMessage,
    /// A's k (the coordinator applies the larger of A's, B's and its own in `k-only` mode).
    pub k: u64,
    /// ε A charged (None in `k-only` mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epsilon: Option<f64>,
}

/// B's answer to [`JourneyStep::Sums`]: the sums encrypted to the result key, with the noise
/// B added to each released count and sum (discrete Laplace scales; 0 in `k-only` mode).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JourneySums {
    /// The sums for the coordinator.
    pub sums: crate::psi_sum::SumsMessage,
    /// Noise scale of each released count.
    pub count_scale: f64,
    /// Noise scale of each released sum (of the values shifted to start at the measure's
    /// lower bound).
    pub sum_scale: f64,
    /// B's k.
    pub k: u64,
    /// ε B charged (None in `k-only` mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epsilon: Option<f64>,
}

/// `POST /v1/secagg/key` (role node), round 1 of secure aggregation: the coordinator asks a
/// node for its one-time key for a query. The node validates the query and computes its noise
/// calibration first, so the key it returns commits to both.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct SecAggKeyRequest {
    /// Protocol version of the coordinator.
    #[serde(default = "default_protocol")]
    pub protocol: u32,
    /// The query id the coordinator assigned (a node issues one key per query id, ever).
    pub query_id: String,
    /// The analyst's SQL.
    pub sql: String,
    /// ε the analyst asked to spend ([`crate::epsilon_json`]).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::epsilon_json"
    )]
    pub epsilon: Option<f64>,
}

/// A node's one-time X25519 key for one query, with the digest of the noise calibration it
/// will use (scales, encodings and public key set), signed with its node certificate's key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SecAggKey {
    /// The node's agency.
    pub agency: String,
    /// Its X25519 public key for this query (hex, 32 bytes).
    pub public_key: String,
    /// SHA-256 of its calibration (hex): every member must have the same.
    pub calibration: String,
    /// Its node certificate (DER, hex).
    pub certificate: String,
    /// Its signature over [`SecAggKey::message`] (hex).
    pub signature: String,
}

impl SecAggKey {
    /// What a node signs: the federation, query id, agency, key and calibration.
    pub fn message(&self, federation: &str, query_id: &str) -> Vec<u8> {
        let mut m = b"cxfed-secagg-key-v1\n".to_vec();
        for field in [
            federation,
            query_id,
            &self.agency,
            &self.public_key,
            &self.calibration,
        ] {
            m.extend_from_slice(&(field.len() as u64).to_be_bytes());
            m.extend_from_slice(field.as_bytes());
        }
        m
    }
}

/// Round 2 of secure aggregation, carried by [`PartialRequest::secagg`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct SecAggRound {
    /// Every member's signed key (the coordinator's own included).
    pub roster: Vec<SecAggKey>,
}

/// Error body of every non-2xx response.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorBody {
    /// Stable code: a rule code (`CXF-Q012`) or an API code (`CXF-A403`).
    pub code: String,
    /// Rule slug or error kind, e.g. `identifier-not-allowed`.
    pub kind: String,
    /// One line for a person.
    pub message: String,
    /// 1-based SQL line, when the error has a position.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
    /// 1-based SQL column, when the error has a position.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub column: Option<u64>,
    /// The query id, when a query was being answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_id: Option<String>,
    /// Per-node status, when the failure happened during fan-out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeStatus>,
}

/// `GET /v1/health`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Health {
    /// Always `ok` when the node answers.
    pub status: String,
    /// This node's agency.
    pub agency: String,
    /// The federation.
    pub federation: String,
    /// Protocol version.
    pub protocol: u32,
    /// Software version.
    pub version: String,
}

/// One analyst's privacy-budget use on a node, in `GET /v1/budget`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BudgetUse {
    /// The analyst's identity.
    pub analyst: String,
    /// ε spent in the current period.
    pub used: f64,
    /// ε left in the current period.
    pub remaining: f64,
    /// Queries charged in the period.
    pub queries: u64,
}

/// `GET /v1/budget` (steward): this node's privacy settings and every analyst's use.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BudgetResponse {
    /// The node's agency.
    pub agency: String,
    /// `dp` or `k-only`.
    pub mode: String,
    /// ε a query may spend here (dp).
    pub epsilon_per_query: Option<f64>,
    /// ε per analyst per period (dp).
    pub budget_epsilon: Option<f64>,
    /// Period length in days (dp).
    pub period_days: Option<u64>,
    /// Use per analyst.
    pub analysts: Vec<BudgetUse>,
}

/// One column in `GET /v1/schema`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SchemaColumn {
    /// Column name.
    pub name: String,
    /// SQL type.
    #[serde(rename = "type")]
    pub ty: String,
    /// `identifier`, `dimension`, `date` or `measure`.
    pub kind: String,
    /// Whether every row has a value.
    pub required: bool,
    /// Allowed values or range, when restricted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// For a measure, the bounds `[low, high]` each value is clamped to before it is aggregated
    /// under differential privacy (narrower than `domain` for some measures).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dp_bounds: Option<[f64; 2]>,
}

/// One table in `GET /v1/schema`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SchemaTable {
    /// Table name.
    pub name: String,
    /// Rows this node holds: exact, so only for the node's steward (absent for every other
    /// role — an exact count is not differentially private).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<u64>,
    /// When data was last added (RFC 3339, UTC), if ever; only for the node's steward.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_ingest: Option<String>,
    /// Columns.
    pub columns: Vec<SchemaColumn>,
}

/// `GET /v1/schema`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SchemaResponse {
    /// Schema version.
    pub version: u32,
    /// Tables.
    pub tables: Vec<SchemaTable>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_request_defaults_to_require_all() {
        let r: QueryRequest = serde_json::from_str(r#"{"sql":"SELECT 1"}"#).expect("parse");
        assert!(r.require_all);
    }

    #[test]
    fn refuses_unknown_fields_in_partial_request() {
        let r = serde_json::from_str::<PartialRequest>(
            r#"{"query_id":"q","sql":"s","analyst":"a","k":1}"#,
        );
        assert!(r.is_err());
    }

    #[test]
    fn a_non_finite_epsilon_is_not_sent_as_no_epsilon() {
        for (eps, json) in [
            (f64::NAN, r#""NaN""#),
            (f64::INFINITY, r#""inf""#),
            (f64::NEG_INFINITY, r#""-inf""#),
            (0.5, "0.5"),
            (-1.0, "-1.0"),
        ] {
            let req = QueryRequest::new("SELECT 1").epsilon(Some(eps));
            let text = serde_json::to_string(&req).expect("json");
            assert!(text.contains(&format!(r#""epsilon":{json}"#)), "{text}");
            let back: QueryRequest = serde_json::from_str(&text).expect("parse");
            let got = back.epsilon.expect("an epsilon, not the default");
            assert!(
                got == eps || (got.is_nan() && eps.is_nan()),
                "{got} vs {eps}"
            );
        }
        let none = serde_json::to_string(&QueryRequest::new("SELECT 1")).expect("json");
        assert!(!none.contains("epsilon"), "{none}");
        let r: PartialRequest =
            serde_json::from_str(r#"{"query_id":"q","sql":"s","analyst":"a","epsilon":null}"#)
                .expect("parse");
        assert_eq!(r.epsilon, None);
        let bad = serde_json::from_str::<QueryRequest>(r#"{"sql":"s","epsilon":"lots"}"#)
            .expect_err("refused");
        assert!(
            bad.to_string()
                .contains(r#"epsilon "lots" is not a number"#),
            "{bad}"
        );
    }

    #[test]
    fn node_state_is_snake_case() {
        assert_eq!(
            serde_json::to_string(&NodeState::Unreachable).expect("json"),
            "\"unreachable\""
        );
    }
}
