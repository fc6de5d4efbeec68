//! The data steward's policy, enforced by the node on every query it answers — as coordinator
//! and as a data node alike — and reloadable without a restart.
//!
//! ```toml
//! [policy]
//! allowed_agencies = ["SSA", "CMS", "OPM"]  # analysts of these agencies may query this node
//!                                           # (default: this node's agency and its peers')
//! hidden_dimensions = ["state"]            # columns this node never lets a query touch
//! min_k = 20                               # floor for k: max(privacy.k, min_k) is enforced
//! max_groups = 10000                       # a query whose partial has more groups is refused
//! rate_limit_per_minute = 120              # queries per analyst per minute (0 = no limit)
//! max_in_flight_per_analyst = 4            # partials one analyst may run here at once (0 = no limit)
//! query_timeout_secs = 60                  # per-query execution time limit on this node
//! memory_limit_mb = 1024                   # DataFusion memory pool (applies at start)
//! ```

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;

use cxfed_protocol::Identity;
use cxfed_protocol::codes::PolicyCode;
use cxfed_queries::keyset::PublicKeys;
use cxfed_queries::query::ApprovedQuery;
use cxfed_queries::schema::{self, Kind};

/// Groups one partial may hold unless `[policy] max_groups` says otherwise.
pub const DEFAULT_MAX_GROUPS: u64 = 10_000;

/// The `[policy]` table as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Agencies whose analysts may query this node.
    pub allowed_agencies: Option<Vec<String>>,
    /// Dimensions this node never exposes.
    #[serde(default)]
    pub hidden_dimensions: Vec<String>,
    /// Floor for k.
    pub min_k: Option<u64>,
    /// Maximum groups in one partial.
    pub max_groups: Option<u64>,
    /// Queries per analyst per minute (0 = unlimited).
    pub rate_limit_per_minute: Option<u32>,
    /// Partials one analyst may have running on this node at once (0 = unlimited).
    pub max_in_flight_per_analyst: Option<u32>,
    /// Execution time limit per query, seconds.
    pub query_timeout_secs: Option<u64>,
    /// Memory pool, MiB.
    pub memory_limit_mb: Option<u64>,
}

/// A policy refusal: which rule of the steward's (its code, slug and HTTP status come from
/// [`PolicyCode`]) and a one-line reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {reason}")]
pub struct PolicyRefusal {
    /// Which refusal.
    pub kind: PolicyCode,
    /// Why.
    pub reason: String,
}

impl PolicyRefusal {
    fn new(kind: PolicyCode, reason: String) -> Self {
        PolicyRefusal { kind, reason }
    }

    /// The stable code, e.g. `CXF-P002`.
    pub fn code(&self) -> &'static str {
        self.kind.code()
    }
    /// The stable slug, e.g. `dimension-hidden`.
    pub fn slug(&self) -> &'static str {
        self.kind.slug()
    }
    /// The HTTP status to answer with.
    pub fn status(&self) -> u16 {
        self.kind.status()
    }

    /// The analyst's agency may not query this node.
    pub fn agency(reason: String) -> Self {
        Self::new(PolicyCode::AgencyNotAllowed, reason)
    }
    /// The query touches a hidden dimension.
    pub fn hidden(reason: String) -> Self {
        Self::new(PolicyCode::DimensionHidden, reason)
    }
    /// Too many queries from this analyst.
    pub fn rate(reason: String) -> Self {
        Self::new(PolicyCode::RateLimited, reason)
    }
    /// The partial has too many groups.
    pub fn groups(reason: String) -> Self {
        Self::new(PolicyCode::TooManyGroups, reason)
    }
    /// The query ran too long.
    pub fn timeout(reason: String) -> Self {
        Self::new(PolicyCode::QueryTimeout, reason)
    }
    /// The query needed more memory than the pool.
    pub fn memory(reason: String) -> Self {
        Self::new(PolicyCode::MemoryLimit, reason)
    }
    /// The analyst's privacy budget on this node is spent.
    pub fn budget(reason: String) -> Self {
        Self::new(PolicyCode::BudgetExhausted, reason)
    }
    /// A secure-aggregation step was refused (a repeated query id, a roster this node does
    /// not accept, keys that are not public).
    pub fn secure_aggregation(reason: String) -> Self {
        Self::new(PolicyCode::SecureAggregationRefused, reason)
    }
}

/// The policy in force: resolved defaults, checked values.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Agencies whose analysts may query.
    pub allowed_agencies: Vec<String>,
    /// Hidden dimensions.
    pub hidden_dimensions: Vec<String>,
    /// Effective k: max(privacy.k, min_k).
    pub k: u64,
    /// Maximum groups per partial.
    pub max_groups: u64,
    /// Queries per analyst per minute (0 = unlimited).
    pub rate_limit_per_minute: u32,
    /// Partials one analyst may have running here at once (0 = unlimited).
    pub max_in_flight_per_analyst: u32,
    /// Execution time limit.
    pub query_timeout: Duration,
    /// Memory pool in bytes.
    pub memory_limit_bytes: usize,
    /// Differential privacy (`[privacy] mode = "dp"`); `None` in `k-only` mode.
    pub dp: Option<DpSettings>,
}

/// The node's differential-privacy settings (`[privacy]` in node.toml).
#[derive(Debug, Clone, PartialEq)]
pub struct DpSettings {
    /// ε a query spends on this node at most (an analyst may ask for less).
    pub epsilon_per_query: f64,
    /// δ for partition selection.
    pub delta: f64,
    /// ε per analyst per period.
    pub budget_epsilon: f64,
    /// The budget period.
    pub budget_period: Duration,
    /// Groups one person may contribute to in one query.
    pub max_groups_per_person: u64,
    /// Rows one person may contribute to one group.
    pub max_rows_per_person: u64,
    /// Key values the steward declared public (`[privacy.public_keys]`), beside the schema's.
    pub public_keys: PublicKeys,
    /// Honest nodes the steward assumes among a secure-aggregation roster
    /// (`[privacy] assume_honest_nodes`; `None`: all of them).
    pub assume_honest_nodes: Option<u64>,
    /// Whether this node, as coordinator, runs public-key queries under secure aggregation
    /// (`[privacy] secure_aggregation`, default true); off, every node adds its full noise.
    pub secure_aggregation: bool,
}

impl DpSettings {
    /// The parameters of one query at this node: ε is the analyst's request capped at
    /// `epsilon_per_query`.
    pub fn params(
        &self,
        k: u64,
        requested_epsilon: Option<f64>,
    ) -> cxfed_queries::privacy::DpParams {
        cxfed_queries::privacy::DpParams {
            epsilon: requested_epsilon
                .map_or(self.epsilon_per_query, |e| e.min(self.epsilon_per_query)),
            delta: self.delta,
            max_groups_per_person: self.max_groups_per_person,
            max_rows_per_person: self.max_rows_per_person,
            k,
        }
    }

    /// The defaults: ε = 1 per query, δ = 1e-6, ε = 10 per analyst per 30 days, one group and
    /// one row per person.
    pub const DEFAULT: DpSettings = DpSettings {
        epsilon_per_query: 1.0,
        delta: 1e-6,
        budget_epsilon: 10.0,
        budget_period: Duration::from_secs(30 * 86_400),
        max_groups_per_person: 1,
        max_rows_per_person: 1,
        public_keys: PublicKeys::schema_only(),
        assume_honest_nodes: None,
        secure_aggregation: true,
    };
}

impl Policy {
    /// Resolves `raw` for a node of `agency` with `peers` and `[privacy] k`. Errors name the key.
    pub fn resolve(
        raw: &PolicyConfig,
        agency: &str,
        peers: &[&str],
        k: u64,
    ) -> Result<Policy, (String, String)> {
        let allowed_agencies = match &raw.allowed_agencies {
            Some(list) => list.clone(),
            None => std::iter::once(agency)
                .chain(peers.iter().copied())
                .map(String::from)
                .collect(),
        };
        for (i, a) in allowed_agencies.iter().enumerate() {
            if a.is_empty()
                || !a
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                return Err((
                    format!("policy.allowed_agencies[{i}]"),
                    format!("{a:?} is not an agency abbreviation"),
                ));
            }
        }
        for (i, d) in raw.hidden_dimensions.iter().enumerate() {
            match schema::column_anywhere(d).map(|c| c.kind) {
                Some(Kind::Dimension | Kind::Date | Kind::Measure) => {}
                Some(Kind::Identifier) => {
                    return Err((
                        format!("policy.hidden_dimensions[{i}]"),
                        format!("{d} is an identifier; identifiers are never exposed anyway"),
                    ));
                }
                None => {
                    return Err((
                        format!("policy.hidden_dimensions[{i}]"),
                        format!("{d} is not a column of the CX schema"),
                    ));
                }
            }
        }
        let min_k = raw.min_k.unwrap_or(1);
        if min_k == 0 {
            return Err(("policy.min_k".into(), "must be at least 1".into()));
        }
        let max_groups = raw.max_groups.unwrap_or(DEFAULT_MAX_GROUPS);
        if max_groups == 0 {
            return Err(("policy.max_groups".into(), "must be at least 1".into()));
        }
        let timeout = raw.query_timeout_secs.unwrap_or(60);
        if !(1..=3600).contains(&timeout) {
            return Err((
                "policy.query_timeout_secs".into(),
                "must be between 1 and 3600".into(),
            ));
        }
        let memory_mb = raw.memory_limit_mb.unwrap_or(1024);
        if !(16..=1_048_576).contains(&memory_mb) {
            return Err((
                "policy.memory_limit_mb".into(),
                "must be between 16 and 1048576".into(),
            ));
        }
        Ok(Policy {
            allowed_agencies,
            hidden_dimensions: raw.hidden_dimensions.clone(),
            k: k.max(min_k),
            max_groups,
            rate_limit_per_minute: raw.rate_limit_per_minute.unwrap_or(120),
            max_in_flight_per_analyst: raw.max_in_flight_per_analyst.unwrap_or(4),
            query_timeout: Duration::from_secs(timeout),
            memory_limit_bytes: usize::try_from(memory_mb * 1024 * 1024).unwrap_or(usize::MAX),
            dp: None,
        })
    }

    /// Checks who is asking.
    pub fn check_analyst(&self, analyst: &str) -> Result<Identity, PolicyRefusal> {
        let id = Identity::parse_uri(analyst).map_err(|e| {
            PolicyRefusal::agency(format!("the analyst identity is not usable: {e}"))
        })?;
        if id.role() != cxfed_protocol::Role::Analyst {
            return Err(PolicyRefusal::agency(format!("{id} is not an analyst")));
        }
        if !self.allowed_agencies.iter().any(|a| a == id.agency()) {
            return Err(PolicyRefusal::agency(format!(
                "analysts of {} may not query this node (allowed: {})",
                id.agency(),
                self.allowed_agencies.join(", ")
            )));
        }
        Ok(id)
    }

    /// Checks what the query touches. A hidden column hides the columns derived from it and
    /// the one it is derived from (hiding `response_date` hides `fiscal_quarter`, which tells
    /// the quarter of the date, and hiding `fiscal_quarter` hides `response_date`, from which
    /// the quarter can be computed).
    pub fn check_query(&self, q: &ApprovedQuery) -> Result<(), PolicyRefusal> {
        let used = q.referenced_columns();
        for d in &self.hidden_dimensions {
            if let Some(c) = hidden_closure(d).into_iter().find(|c| used.contains(c)) {
                let via = if c == *d {
                    String::new()
                } else {
                    format!(" (the query reads {c}, which is derived from or to it)")
                };
                return Err(PolicyRefusal::hidden(format!(
                    "this node does not expose {d}{via}"
                )));
            }
        }
        Ok(())
    }

    /// Checks the size of a partial result before it leaves.
    pub fn check_groups(&self, groups: u64) -> Result<(), PolicyRefusal> {
        if groups > self.max_groups {
            return Err(PolicyRefusal::groups(format!(
                "the query produces {groups} groups here; this node releases at most {}",
                self.max_groups
            )));
        }
        Ok(())
    }
}

/// `column` and every column derived from it or it from (both tables).
fn hidden_closure(column: &str) -> Vec<String> {
    let mut out = vec![column.to_string()];
    for table in cxfed_queries::schema::Table::ALL {
        for c in table.columns() {
            let Some(derived) = c.derived else { continue };
            if derived.source() == column && !out.iter().any(|o| o == c.name) {
                out.push(c.name.to_string());
            }
            if c.name == column && !out.iter().any(|o| o == derived.source()) {
                out.push(derived.source().to_string());
            }
        }
    }
    out
}

/// How many partials each analyst has running on this node.
#[derive(Debug, Default)]
pub struct InFlight {
    running: Mutex<HashMap<String, u32>>,
}

/// One running partial; dropping it frees the analyst's slot.
#[derive(Debug)]
pub struct InFlightGuard<'a> {
    owner: &'a InFlight,
    analyst: String,
}

impl InFlight {
    /// Takes one of `analyst`'s `limit` slots (0 = unlimited), or refuses (CXF-P003) when all
    /// are taken: one analyst cannot fill the node's memory pool and CPU with parallel queries
    /// while others wait.
    pub fn enter(&self, analyst: &str, limit: u32) -> Result<InFlightGuard<'_>, PolicyRefusal> {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let n = running.entry(analyst.to_string()).or_insert(0);
        if limit > 0 && *n >= limit {
            return Err(PolicyRefusal::rate(format!(
                "at most {limit} queries at a time per analyst on this node; wait for one to finish"
            )));
        }
        *n += 1;
        Ok(InFlightGuard {
            owner: self,
            analyst: analyst.to_string(),
        })
    }
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        let mut running = self.owner.running.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = running.get_mut(&self.analyst) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                running.remove(&self.analyst);
            }
        }
    }
}

/// Per-analyst sliding-window rate limiter.
#[derive(Debug, Default)]
pub struct RateLimiter {
    windows: Mutex<HashMap<String, VecDeque<Instant>>>,
}

/// Most analysts tracked at once; beyond that idle windows are dropped first.
const MAX_TRACKED: usize = 10_000;

impl RateLimiter {
    /// Records a query by `analyst` now, or refuses it if the last minute already holds `limit`.
    pub fn check(&self, analyst: &str, limit: u32) -> Result<(), PolicyRefusal> {
        if limit == 0 {
            return Ok(());
        }
        let now = Instant::now();
        let window = Duration::from_secs(60);
        let mut map = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_TRACKED && !map.contains_key(analyst) {
            map.retain(|_, q| q.back().is_some_and(|t| now.duration_since(*t) < window));
        }
        let q = map.entry(analyst.to_string()).or_default();
        while q.front().is_some_and(|t| now.duration_since(*t) >= window) {
            q.pop_front();
        }
        if q.len() >= limit as usize {
            return Err(PolicyRefusal::rate(format!(
                "at most {limit} queries per minute per analyst; try again shortly"
            )));
        }
        q.push_back(now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(raw: PolicyConfig) -> Policy {
        Policy::resolve(&raw, "SSA", &["CMS"], 10).expect("valid")
    }

    #[test]
    fn defaults_allow_federation_members_only() {
        let p = policy(PolicyConfig::default());
        assert_eq!(p.allowed_agencies, ["SSA", "CMS"]);
        assert!(p.check_analyst("spiffe://cx/CMS/analyst/a").is_ok());
        let r = p
            .check_analyst("spiffe://cx/IRS/analyst/a")
            .expect_err("IRS not allowed");
        assert_eq!(r.code(), "CXF-P001");
        assert!(p.check_analyst("spiffe://cx/SSA/node/n").is_err());
    }

    #[test]
    fn min_k_is_a_floor() {
        let p = policy(PolicyConfig {
            min_k: Some(25),
            ..Default::default()
        });
        assert_eq!(p.k, 25);
        let p = policy(PolicyConfig {
            min_k: Some(5),
            ..Default::default()
        });
        assert_eq!(p.k, 10);
    }

    #[test]
    fn refuses_unknown_hidden_dimension_with_its_key() {
        let raw = PolicyConfig {
            hidden_dimensions: vec!["stat".into()],
            ..Default::default()
        };
        let (field, _) = Policy::resolve(&raw, "SSA", &[], 10).expect_err("unknown");
        assert_eq!(field, "policy.hidden_dimensions[0]");
    }

    #[test]
    fn in_flight_limit_is_per_analyst_and_freed_on_drop() {
        let f = InFlight::default();
        let a = f.enter("a", 2).expect("1st");
        let _b = f.enter("a", 2).expect("2nd");
        assert_eq!(f.enter("a", 2).expect_err("3rd").code(), "CXF-P003");
        let _other = f.enter("b", 2).expect("another analyst");
        drop(a);
        let _c = f.enter("a", 2).expect("a slot was freed");
        let _unlimited: Vec<_> = (0..10)
            .map(|_| f.enter("c", 0).expect("0 = no limit"))
            .collect();
    }

    #[test]
    fn rate_limiter_refuses_over_limit_per_analyst() {
        let r = RateLimiter::default();
        assert!(r.check("a", 2).is_ok());
        assert!(r.check("a", 2).is_ok());
        assert_eq!(r.check("a", 2).expect_err("third").code(), "CXF-P003");
        assert!(r.check("b", 2).is_ok());
        assert!(r.check("a", 0).is_ok());
    }

    #[tokio::test]
    async fn hides_dimensions_wherever_they_appear() {
        let ctx = cxfed_queries::context::planning_context().expect("ctx");
        let p = policy(PolicyConfig {
            hidden_dimensions: vec!["state".into()],
            ..Default::default()
        });
        for sql in [
            "SELECT state, COUNT(*) FROM experience GROUP BY state",
            "SELECT COUNT(*) FROM experience WHERE state = 'WY'",
            "SELECT channel, COUNT(*) FILTER (WHERE state = 'WY') FROM experience GROUP BY channel",
        ] {
            let q = cxfed_queries::validate::approve(&ctx.state(), sql)
                .await
                .expect("approve");
            assert_eq!(p.check_query(&q).expect_err(sql).code(), "CXF-P002");
        }
        let q = cxfed_queries::validate::approve(&ctx.state(), "SELECT COUNT(*) FROM experience")
            .await
            .expect("approve");
        assert!(p.check_query(&q).is_ok());
    }

    #[tokio::test]
    async fn hiding_a_date_hides_what_is_derived_from_it_and_back() {
        let ctx = cxfed_queries::context::planning_context().expect("ctx");
        let check = |hidden: &str, sql: &'static str| {
            let p = policy(PolicyConfig {
                hidden_dimensions: vec![hidden.into()],
                ..Default::default()
            });
            let ctx = &ctx;
            async move {
                let q = cxfed_queries::validate::approve(&ctx.state(), sql)
                    .await
                    .expect("approve");
                p.check_query(&q).map_err(|r| r.code())
            }
        };
        let by_quarter =
            "SELECT fiscal_year, fiscal_quarter, COUNT(*) FROM experience GROUP BY 1, 2";
        let by_date =
            "SELECT date_trunc('quarter', response_date) AS q, COUNT(*) FROM experience GROUP BY 1";
        assert_eq!(check("response_date", by_quarter).await, Err("CXF-P002"));
        assert_eq!(check("fiscal_quarter", by_date).await, Err("CXF-P002"));
        // Columns are hidden by name, in both tables: operational's fiscal quarter comes from
        // opened_date, and the name is the same.
        assert_eq!(check("opened_date", by_quarter).await, Err("CXF-P002"));
        assert_eq!(check("state", by_date).await, Ok(()));
    }
}
