//! `explain`: what a query will do before it runs — the validated plan, the partial plan every
//! node derives and runs, how partials are merged, and the privacy rules that apply — or the
//! refusal with its rule code, reason and position.

use std::fmt;

use datafusion::execution::context::SessionState;
use serde::Serialize;

use crate::keyset::{GroupKeys, PublicKeys};
use crate::partial::PERSONS;
use crate::privacy::DpParams;
use crate::query::AggKind;
use crate::rules::{QueryError, Rejection};
use crate::validate::approve;

/// The outcome of explaining one query.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Explanation {
    /// The query passes every rule.
    Accepted {
        /// Output columns.
        columns: Vec<String>,
        /// The validated logical plan (DataFusion's indented form).
        plan: String,
        /// The partial plan each node runs on its own rows.
        partial_plan: String,
        /// How each output aggregate is rebuilt from the summed partials.
        merge: Vec<String>,
        /// The privacy rules that apply to this query.
        privacy: Vec<String>,
    },
    /// The query breaks a rule.
    Refused {
        /// Stable code, e.g. `CXF-Q012`.
        code: String,
        /// Stable slug, e.g. `identifier-not-allowed`.
        rule: String,
        /// One line.
        reason: String,
        /// 1-based SQL line, when known.
        #[serde(skip_serializing_if = "Option::is_none")]
        line: Option<u64>,
        /// 1-based SQL column, when known.
        #[serde(skip_serializing_if = "Option::is_none")]
        column: Option<u64>,
    },
}

impl From<&Rejection> for Explanation {
    fn from(r: &Rejection) -> Self {
        Explanation::Refused {
            code: r.rule.code().into(),
            rule: r.rule.slug().into(),
            reason: r.reason.clone(),
            line: r.position.map(|p| p.line),
            column: r.position.map(|p| p.column),
        }
    }
}

/// Explains `sql` as a `k-only` node with k = `node_k` and a federation k = `federation_k`
/// would run it.
pub async fn explain(
    state: &SessionState,
    sql: &str,
    node_k: u64,
    federation_k: u64,
) -> Result<Explanation, QueryError> {
    explain_with(state, sql, node_k, federation_k, None).await
}

/// A node's `dp` settings, as explain needs them.
#[derive(Debug, Clone, Copy)]
pub struct DpContext<'a> {
    /// The query's parameters at this node.
    pub params: &'a DpParams,
    /// The key values this node treats as public.
    pub public_keys: &'a PublicKeys,
    /// The steward's cap on groups (a larger public key set is refused).
    pub max_groups: u64,
    /// Whether this node, as coordinator, adds public-key partials by secure aggregation.
    pub secure_aggregation: bool,
}

/// Explains `sql` as a node would run it, in `dp` mode when `dp` is given.
pub async fn explain_with(
    state: &SessionState,
    sql: &str,
    node_k: u64,
    federation_k: u64,
    dp_context: Option<DpContext<'_>>,
) -> Result<Explanation, QueryError> {
    if crate::journey::is_journey(sql) {
        return explain_journey(state, sql, node_k.max(federation_k), dp_context).await;
    }
    let dp = dp_context.map(|c| c.params);
    let approved = match approve(state, sql).await {
        Ok(a) => a,
        Err(QueryError::Rejected(r)) => return Ok(Explanation::from(&r)),
        Err(e) => return Err(e),
    };
    let keys = dp_context.map(|c| approved.group_keys_under(c.public_keys, c.max_groups));
    let with_keys = |d: crate::privacy::DpPartial| match &keys {
        Some(Ok(k)) => d.with_keys(k.clone()),
        _ => Ok(d),
    };
    let dp_partial = match dp
        .map(|p| approved.dp_partial(p).and_then(with_keys))
        .transpose()
    {
        Ok(d) => d,
        Err(QueryError::Rejected(r)) => return Ok(Explanation::from(&r)),
        Err(e) => return Err(e),
    };
    let partial = match &dp_partial {
        Some(d) => d.plan.clone(),
        None => match approved.partial_plan() {
            Ok(p) => p,
            Err(QueryError::Rejected(r)) => return Ok(Explanation::from(&r)),
            Err(e) => return Err(e),
        },
    };
    let merge = approved
        .aggregate_kinds()
        .iter()
        .zip(approved.aggregate_names())
        .enumerate()
        .map(|(i, (kind, name))| {
            let formula = match kind {
                AggKind::Count | AggKind::CountPersons => format!("Σ __a{i}_n"),
                AggKind::Sum => format!("Σ __a{i}_s"),
                AggKind::Avg => format!("Σ __a{i}_s / Σ __a{i}_n"),
                AggKind::Variance { population: false } => {
                    format!("(Σq − (Σs)²/Σn) / (Σn − 1) over __a{i}_{{n,s,q}}")
                }
                AggKind::Variance { population: true } => {
                    format!("(Σq − (Σs)²/Σn) / Σn over __a{i}_{{n,s,q}}")
                }
                AggKind::Stddev { population: false } => {
                    format!("√((Σq − (Σs)²/Σn) / (Σn − 1)) over __a{i}_{{n,s,q}}")
                }
                AggKind::Stddev { population: true } => {
                    format!("√((Σq − (Σs)²/Σn) / Σn) over __a{i}_{{n,s,q}}")
                }
                AggKind::Percentile { p } => crate::percentile::merge_formula(
                    approved.histogram_of(i).unwrap_or(i),
                    *p,
                    approved.percentile_grid(i).as_ref(),
                ),
            };
            format!("{name} = {formula}")
        })
        .collect();
    let mut privacy = Vec::new();
    let mut public = false;
    if let (Some(d), Some(p)) = (&dp_partial, dp) {
        privacy.push(format!(
            "differential privacy: each node spends ε = {} on this query, clamps values to declared bounds, keeps at most {} group(s) and {} row(s) per person",
            p.epsilon, p.max_groups_per_person, p.max_rows_per_person
        ));
        // A histogram's buckets share one scale: shown once, as a range.
        let scales: Vec<String> = d
            .meta
            .scales
            .iter()
            .filter_map(|(c, b)| match crate::percentile::bucket_of(c) {
                None => Some(format!("{c}: {b}")),
                Some((i, 0)) => {
                    let last = approved.percentile_grid(i)?.buckets().saturating_sub(1);
                    Some(format!("__a{i}_h0..h{last}: {b} each"))
                }
                Some(_) => None,
            })
            .collect();
        privacy.push(format!(
            "discrete Laplace noise scales per released value: {}",
            scales.join(", ")
        ));
        // A histogram is one statistic however many buckets it has, and percentiles of one
        // measure and FILTER read one histogram.
        let grids: Vec<_> = (0..approved.aggregate_kinds().len())
            .filter_map(|i| Some((i, approved.percentile_grid(i)?, approved.histogram_of(i)?)))
            .collect();
        let m = d.meta.scales.len()
            - grids
                .iter()
                .filter(|(i, _, src)| i == src)
                .map(|(_, g, _)| g.buckets().saturating_sub(1))
                .sum::<usize>();
        let names = approved.aggregate_names();
        let name = |i: usize| names.get(i).map_or("?", String::as_str);
        for (i, grid, src) in &grids {
            if i != src {
                privacy.push(format!(
                    "{}: read off the histogram of {} (same measure and FILTER: no further ε)",
                    name(*i),
                    name(*src)
                ));
                continue;
            }
            let scale = d
                .meta
                .scales
                .get(&crate::percentile::bucket_name(*i, 0))
                .copied();
            privacy.push(crate::percentile::explain_lines(
                *i,
                name(*i),
                grid,
                scale,
                m,
            ));
        }
        let threshold = |reason: String| {
            format!(
                "{reason}a group is released only if its noisy {PERSONS} ≥ τ = {:.1} (δ = {}, k = {node_k})",
                d.threshold, p.delta
            )
        };
        public = matches!(keys, Some(Ok(GroupKeys::Public(_))));
        if public && dp_context.is_some_and(|c| c.secure_aggregation) {
            privacy.push("secure aggregation (with more than one node): each node adds a noise share instead of a full draw and masks its dense partial; the coordinator reads only the sum, whose noise is one central draw when every node is honest".into());
        }
        privacy.push(match keys {
            Some(Ok(GroupKeys::Public(set))) => format!(
                "group keys are public ({}): every one of the {} groups is released, noisy even where it holds nobody; no ε or δ is spent on choosing groups, and the coordinator withholds none",
                set.describe(),
                set.len()
            ),
            Some(Ok(GroupKeys::DataDependent { key, why })) => {
                threshold(format!("group key {key} is not public ({why}): "))
            }
            Some(Err(e)) => format!("every node refuses this query: {e}"),
            None => threshold(String::new()),
        });
    }
    if dp.is_none() {
        privacy.push(format!(
            "every node withholds any group with {PERSONS} (distinct person_id) below its own k (this node: {node_k}) and reports how many it withheld"
        ));
        for (i, (name, regions)) in approved
            .aggregate_names()
            .iter()
            .zip(approved.cell_regions()?)
            .enumerate()
        {
            let supports = if regions.is_empty() {
                format!("its own value (__a{i}_n)")
            } else {
                regions
                    .iter()
                    .enumerate()
                    .map(|(j, r)| format!("__a{i}_p{j}: people where {r}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            };
            privacy.push(format!(
                "cell {name} is withheld (NULL) where any of these holds 1 to k − 1 people: {supports}"
            ));
        }
    }
    if !public {
        privacy.push(format!("the coordinator releases a merged group only if the nodes' {PERSONS} add up to at least its k ({federation_k})"));
    }
    privacy.extend([
        "no raw row, identifier or withheld group leaves a node; each node re-validates the analyst's SQL itself".into(),
        "HAVING, ORDER BY and LIMIT run only at the coordinator, after suppression".into(),
    ]);
    if dp.is_none() {
        privacy.push("k-only mode: exact values; k-anonymity alone does not stop differencing between queries".into());
    }
    Ok(Explanation::Accepted {
        columns: approved.columns(),
        plan: approved.plan().display_indent().to_string(),
        partial_plan: partial.display_indent().to_string(),
        merge,
        privacy,
    })
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Explanation::Accepted {
                columns,
                plan,
                partial_plan,
                merge,
                privacy,
            } => {
                writeln!(f, "ACCEPTED — columns: {}", columns.join(", "))?;
                writeln!(f, "\nValidated plan:\n{}", indent(plan))?;
                writeln!(
                    f,
                    "\nPartial plan (each node, on its own rows):\n{}",
                    indent(partial_plan)
                )?;
                writeln!(
                    f,
                    "\nMerge (coordinator, per group, summing every node's partials):"
                )?;
                for m in merge {
                    writeln!(f, "  {m}")?;
                }
                writeln!(f, "\nPrivacy:")?;
                for p in privacy {
                    writeln!(f, "  - {p}")?;
                }
                Ok(())
            }
            Explanation::Refused {
                code,
                rule,
                reason,
                line,
                column,
            } => {
                write!(f, "REFUSED {code} {rule}: {reason}")?;
                if let (Some(l), Some(c)) = (line, column) {
                    write!(f, " (at line {l}, column {c})")?;
                }
                writeln!(f)
            }
        }
    }
}

fn indent(s: &str) -> String {
    s.lines()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Explains a journey query ([`crate::journey`]): each side's per-person SQL, how the answer
/// is built, and its privacy rules.
async fn explain_journey(
    state: &SessionState,
    sql: &str,
    k: u64,
    dp_context: Option<DpContext<'_>>,
) -> Result<Explanation, QueryError> {
    let keys = dp_context.map_or_else(PublicKeys::schema_only, |c| c.public_keys.clone());
    let plan = match crate::journey::plan_with_keys(state, sql, &keys).await {
        Ok(p) => p,
        Err(QueryError::Rejected(r)) => return Ok(Explanation::from(&r)),
        Err(e) => return Err(e),
    };
    let (a, b) = (&plan.value_side, &plan.member_side);
    let cells = plan.cells().len();
    let mut privacy = vec![
        format!(
            "a journey: the same people at {} and {}, matched on the private linkage key by a private intersection-sum (blinded with fresh secrets, values encrypted to the coordinator's fresh key); neither node learns which of its people the other holds, and no pseudonym or linkage value leaves either",
            a.agency, b.agency
        ),
        "each side counts one record per person: its smallest group value and the mean of its measure over the person's rows that pass its conditions".to_string(),
        format!(
            "{} learns how many of {}'s people match per group of its own (not which); {} learns how many people {} has per group",
            b.agency, a.agency, a.agency, b.agency
        ),
    ];
    match dp_context {
        Some(c) => privacy.push(format!(
            "differential privacy: both nodes charge ε = {} to the analyst's budget; {} adds discrete Laplace noise to every released count and sum (sensitivity 1 and the measure's range per person, doubled for LEFT JOIN); every one of the {cells} cells is released with its 95% interval",
            c.params.epsilon, b.agency
        )),
        None => privacy.push(format!(
            "k-only: a cell of fewer than k = {k} people (the largest k of the coordinator and both nodes) is withheld"
        )),
    }
    Ok(Explanation::Accepted {
        columns: plan.outputs.iter().map(|o| o.name().to_string()).collect(),
        plan: plan.canonical_sql(),
        partial_plan: format!(
            "{} ({}, value side): {}\n{} ({}, membership side): {}",
            a.agency,
            a.table.name(),
            a.side_sql,
            b.agency,
            b.table.name(),
            b.side_sql
        ),
        merge: vec![format!(
            "{cells} cells known in advance ({} of {} × {} of {}{}); per cell the count and the sum of the measure over the people in it, decrypted by the coordinator; AVG = sum / count",
            a.cells().len(),
            a.agency,
            b.cells().len(),
            b.agency,
            if plan.left {
                ", plus the people at the first only, who read NULL on the second's side"
            } else {
                ""
            }
        )],
        privacy,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::planning_context;
    use crate::keyset::PublicKeys;

    #[tokio::test]
    async fn explains_accepted_and_refused_queries() {
        let ctx = planning_context().expect("context");
        let e = explain(
            &ctx.state(),
            "SELECT channel, AVG(trust) FROM experience GROUP BY channel",
            10,
            10,
        )
        .await
        .expect("explain");
        let text = e.to_string();
        assert!(text.starts_with("ACCEPTED"), "{text}");
        assert!(
            text.contains("__persons") && text.contains("Σ __a0_s / Σ __a0_n"),
            "{text}"
        );
        let e = explain(
            &ctx.state(),
            "SELECT person_id FROM experience GROUP BY person_id",
            10,
            10,
        )
        .await
        .expect("explain");
        let json = serde_json::to_value(&e).expect("json");
        assert_eq!(json["status"], "refused");
        assert_eq!(json["code"], "CXF-Q012");
        assert_eq!(json["column"], 8);
    }

    #[tokio::test]
    async fn says_whether_group_keys_are_public() {
        let ctx = planning_context().expect("context");
        let params = DpParams {
            epsilon: 1.0,
            delta: 1e-6,
            max_groups_per_person: 1,
            max_rows_per_person: 1,
            k: 10,
        };
        let keys = PublicKeys::schema_only();
        let dp = |max_groups| DpContext {
            params: &params,
            public_keys: &keys,
            max_groups,
            secure_aggregation: true,
        };
        let text = |sql: &'static str, max_groups: u64| {
            let state = ctx.state();
            async move {
                explain_with(&state, sql, 10, 10, Some(dp(max_groups)))
                    .await
                    .expect("explain")
                    .to_string()
            }
        };
        let t = text(
            "SELECT channel, COUNT(*) FROM experience GROUP BY channel",
            100,
        )
        .await;
        assert!(
            t.contains(&format!(
                "group keys are public (channel ({}, the schema's vocabulary))",
                crate::schema::CHANNELS.len()
            )) && t.contains("no ε or δ is spent on choosing groups")
                && !t.contains("τ ="),
            "{t}"
        );
        let t = text(
            "SELECT service, COUNT(*) FROM experience GROUP BY service",
            100,
        )
        .await;
        assert!(
            t.contains("group key service is not public") && t.contains("τ ="),
            "{t}"
        );
        let t = text(
            "SELECT channel, state, COUNT(*) FROM experience GROUP BY channel, state",
            100,
        )
        .await;
        assert!(t.contains("every node refuses this query"), "{t}");
    }

    #[tokio::test]
    async fn a_journey_is_explained_side_by_side() {
        let ctx = crate::context::planning_context().expect("ctx");
        let sql = "SELECT a.channel, COUNT(*) AS n, AVG(a.trust) AS t FROM ssa.experience a LEFT JOIN cms.operational b USING (person_id) WHERE a.life_experience = 'approaching_retirement' GROUP BY a.channel";
        let e = explain(&ctx.state(), sql, 10, 11).await.expect("explain");
        let text = e.to_string();
        assert!(matches!(e, Explanation::Accepted { .. }), "{text}");
        assert!(
            text.contains("SSA (experience, value side): SELECT person_id"),
            "{text}"
        );
        assert!(
            text.contains("CMS (operational, membership side)"),
            "{text}"
        );
        assert!(text.contains("k = 11"), "{text}");
        assert!(text.contains("people at the first only"), "{text}");
        // A journey of another shape is refused like any query, with its code.
        let bad = "SELECT a.channel, COUNT(*) FROM ssa.experience a RIGHT JOIN cms.operational b USING (person_id) GROUP BY a.channel";
        let e = explain(&ctx.state(), bad, 10, 10).await.expect("explain");
        assert!(e.to_string().contains("CXF-Q022"), "{e}");
    }
}
