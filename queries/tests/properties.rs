//! Property tests: the validator never panics or fails internally on generated SQL (a grammar
//! mixing allowed and forbidden pieces, plus garbage), and every accepted query, run as
//! partials on three shards and merged with k, executes and releases only groups of ≥ k people.
#![allow(missing_docs, clippy::unwrap_used)]

use std::sync::Arc;

use arrow::array::{ArrayRef, Date32Array, Int8Array, Int32Array, RecordBatch, StringArray};
use cxfed_queries::context::{register_functions, session_config};
use cxfed_queries::partial::suppress;
use cxfed_queries::rules::QueryError;
use cxfed_queries::schema::{self, Table};
use cxfed_queries::validate::approve;
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use proptest::prelude::*;

const K: u64 = 5;

fn shard(s: usize, rows: usize) -> (RecordBatch, RecordBatch) {
    let text = |f: &dyn Fn(usize) -> String| -> ArrayRef {
        Arc::new(StringArray::from(
            (0..rows).map(|i| Some(f(i))).collect::<Vec<_>>(),
        ))
    };
    let score = |salt: usize| -> ArrayRef {
        Arc::new(Int8Array::from(
            (0..rows)
                .map(|i| {
                    if (i + salt).is_multiple_of(13) {
                        None
                    } else {
                        Some(((i * 7 + salt + s) % 5 + 1) as i8)
                    }
                })
                .collect::<Vec<_>>(),
        ))
    };
    let dims = || -> Vec<ArrayRef> {
        vec![
            text(&|_| ["SSA", "CMS", "OPM"][s].to_string()),
            text(&|i| format!("service {}", i % 3)),
            text(&|i| schema::LIFE_EXPERIENCES[i % 2].to_string()),
            text(&|i| schema::JOURNEY_STAGES[(i / 3) % 4].to_string()),
            text(&|i| schema::CHANNELS[(i * 5 + s) % 5].to_string()),
            text(&|i| schema::STATES[i % 7].to_string()),
            text(&|i| schema::AGE_BANDS[i % 6].to_string()),
        ]
    };
    let date: ArrayRef = Arc::new(Date32Array::from(
        (0..rows)
            .map(|i| Some(20_000 + (i % 300) as i32))
            .collect::<Vec<_>>(),
    ));
    let mut e: Vec<ArrayRef> = vec![
        text(&|i| format!("r{s}-{i}")),
        text(&|i| format!("p{s}-{}", i % (rows / 2))),
        text(&|i| format!("c{s}-{i}")),
    ];
    e.extend(dims());
    e.push(Arc::clone(&date));
    e.extend((0..7).map(score));
    let mut o: Vec<ArrayRef> = vec![
        text(&|i| format!("c{s}-{i}")),
        text(&|i| format!("p{s}-{}", i % (rows / 2))),
    ];
    o.extend(dims());
    o.push(Arc::clone(&date));
    o.push(date);
    o.push(Arc::new(Int32Array::from(
        (0..rows)
            .map(|i| Some(((i * 31) % 200) as i32))
            .collect::<Vec<_>>(),
    )));
    o.push(Arc::new(Int32Array::from(
        (0..rows)
            .map(|i| {
                if i % 9 == 0 {
                    None
                } else {
                    Some((i % 60) as i32)
                }
            })
            .collect::<Vec<_>>(),
    )));
    o.push(Arc::new(arrow::array::BooleanArray::from(
        (0..rows).map(|i| Some(i % 3 == 0)).collect::<Vec<_>>(),
    )));
    o.push(Arc::new(arrow::array::BooleanArray::from(
        (0..rows).map(|i| Some(i % 7 == 0)).collect::<Vec<_>>(),
    )));
    o.push(text(&|i| schema::OUTCOMES[i % 4].to_string()));
    (
        Table::Experience
            .complete_v1_batch(
                &RecordBatch::try_new(Table::Experience.arrow_schema_of_version(1), e).unwrap(),
            )
            .unwrap(),
        Table::Operational
            .complete_v1_batch(
                &RecordBatch::try_new(Table::Operational.arrow_schema_of_version(1), o).unwrap(),
            )
            .unwrap(),
    )
}

fn context(shards: &[usize]) -> SessionContext {
    let ctx = SessionContext::new_with_config(session_config());
    register_functions(&ctx);
    let (e, o): (Vec<_>, Vec<_>) = shards.iter().map(|&s| shard(s, 120)).unzip();
    ctx.register_table(
        "experience",
        Arc::new(MemTable::try_new(Table::Experience.arrow_schema(), vec![e]).unwrap()),
    )
    .unwrap();
    ctx.register_table(
        "operational",
        Arc::new(MemTable::try_new(Table::Operational.arrow_schema(), vec![o]).unwrap()),
    )
    .unwrap();
    ctx
}

fn piece(options: &'static [&'static str]) -> impl Strategy<Value = &'static str> {
    proptest::sample::select(options)
}

const DIMS: &[&str] = &[
    "agency",
    "channel",
    "journey_stage",
    "state",
    "age_band",
    "service",
    "life_experience",
    "person_id",
    "trust",
    "response_date",
    "date_trunc('month', response_date)",
];
const AGGS: &[&str] = &[
    "COUNT(*)",
    "AVG(trust)",
    "SUM(ease)",
    "STDDEV(satisfaction)",
    "VAR_POP(efficiency)",
    "COUNT(DISTINCT person_id)",
    "MAX(trust)",
    "COUNT(trust)",
    "AVG(CASE WHEN trust >= 4 THEN 1.0 ELSE 0.0 END)",
    "COUNT(*) FILTER (WHERE channel = 'phone')",
    "SUM(trust * ease)",
    "MIN(person_id)",
    "trust",
    "*",
];
const WHERES: &[&str] = &[
    "",
    " WHERE trust > 2",
    " WHERE channel IN ('phone', 'website')",
    " WHERE person_id = 'p0-1'",
    " WHERE response_date > DATE '2024-11-01'",
    " WHERE trust IS NOT NULL AND ease < 4",
    " WHERE agency = (SELECT agency FROM experience LIMIT 1)",
    " WHERE state LIKE 'C%'",
];
const TAILS: &[&str] = &[
    "",
    " HAVING COUNT(*) > 3",
    " ORDER BY 1",
    " LIMIT 3",
    " ORDER BY 1 DESC LIMIT 2",
    " UNION SELECT 1",
    "; DROP TABLE experience",
    " OVER ()",
];

fn query() -> impl Strategy<Value = String> {
    (
        proptest::collection::vec(piece(DIMS), 0..3),
        proptest::collection::vec(piece(AGGS), 1..4),
        piece(WHERES),
        piece(TAILS),
        any::<bool>(),
    )
        .prop_map(|(dims, aggs, filter, tail, group)| {
            let mut dims: Vec<&str> = dims;
            dims.dedup();
            let select: Vec<&str> = dims.iter().copied().chain(aggs.iter().copied()).collect();
            let group_by = if group && !dims.is_empty() {
                format!(" GROUP BY {}", dims.join(", "))
            } else {
                String::new()
            };
            format!(
                "SELECT {} FROM experience{filter}{group_by}{tail}",
                select.join(", ")
            )
        })
}

fn garbage() -> impl Strategy<Value = String> {
    prop_oneof![
        "[ -~]{0,80}",
        proptest::collection::vec(
            piece(&[
                "SELECT",
                "FROM",
                "experience",
                "(",
                ")",
                ",",
                "person_id",
                "COUNT",
                "*",
                "GROUP",
                "BY",
                "WHERE",
                "'",
                "\"",
                ";",
                "--",
                "/*",
                "JOIN",
                "ON",
                "1",
                "trust",
                "OVER"
            ]),
            0..30
        )
        .prop_map(|v| v.join(" ")),
    ]
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, .. ProptestConfig::default() })]

    #[test]
    fn validator_never_panics_or_fails_internally(sql in prop_oneof![query(), garbage()]) {
        let rt = runtime();
        let ctx = cxfed_queries::context::planning_context().unwrap();
        match rt.block_on(approve(&ctx.state(), &sql)) {
            Ok(_) | Err(QueryError::Rejected(_)) => {}
            Err(e) => prop_assert!(false, "internal error for {sql}: {e}"),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 120, .. ProptestConfig::default() })]

    #[test]
    fn accepted_queries_release_only_groups_of_at_least_k(sql in query()) {
        let rt = runtime();
        rt.block_on(async {
            let coordinator = context(&[]);
            let Ok(q) = approve(&coordinator.state(), &sql).await else { return Ok(()) };
            let mut partials = Vec::new();
            for s in 0..3 {
                let ctx = context(&[s]);
                let q = approve(&ctx.state(), &sql).await.unwrap();
                let batches = ctx.execute_logical_plan(q.partial_plan().unwrap()).await.unwrap().collect().await.unwrap();
                let (kept, _) = suppress(&batches, K).unwrap();
                partials.extend(kept);
            }
            let merged = q.merge(&coordinator, partials, K).await.unwrap();
            prop_assert_eq!(merged.schema.fields().len(), q.columns().len());
            if let Some(min) = merged.min_released_persons {
                prop_assert!(min >= K, "{} released a group of {} people", sql, min);
            }
            Ok(())
        })?;
    }
}

/// The generator must not be vacuous: a fair share of what it makes is accepted.
#[test]
fn generator_produces_accepted_and_refused_queries() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let rt = runtime();
    let ctx = cxfed_queries::context::planning_context().unwrap();
    let mut runner = TestRunner::deterministic();
    let strategy = query();
    let mut accepted = 0;
    for _ in 0..300 {
        let sql = strategy.new_tree(&mut runner).unwrap().current();
        if rt.block_on(approve(&ctx.state(), &sql)).is_ok() {
            accepted += 1;
        }
    }
    assert!((20..280).contains(&accepted), "{accepted} of 300 accepted");
}
