//! Noise intervals: over many independent noise draws on the same data, the 95% interval the
//! merge reports around STDDEV, VARIANCE, AVG, COUNT and constant-scaled or rounded aggregates
//! covers the noiseless value about 95% of the time.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;

use arrow::array::{ArrayRef, Date32Array, Float64Array, Int8Array, RecordBatch, StringArray};
use datafusion::datasource::MemTable;
use datafusion::execution::context::SessionContext;

use cxfed_queries::dp::SplitMix64;
use cxfed_queries::partial::Partial;
use cxfed_queries::privacy::DpParams;
use cxfed_queries::schema::Table;
use cxfed_queries::validate::approve;

const PEOPLE: usize = 3_000;
const DRAWS: usize = 300;

fn context() -> SessionContext {
    let mut rng = SplitMix64(42);
    let mut next = move |m: u64| {
        use cxfed_queries::dp::RandomSource;
        (rng.next_u64().expect("seeded rng") % m) as i8
    };
    let trust: Vec<Option<i8>> = (0..PEOPLE)
        .map(|i| Some(if i % 3 == 0 { 5 } else { 1 + next(5) }))
        .collect();
    let text = |f: &dyn Fn(usize) -> String| -> ArrayRef {
        Arc::new(StringArray::from(
            (0..PEOPLE).map(|i| Some(f(i))).collect::<Vec<_>>(),
        ))
    };
    let score: ArrayRef = Arc::new(Int8Array::from(trust));
    let mut columns: Vec<ArrayRef> = vec![
        text(&|i| format!("r{i}")),
        text(&|i| format!("p{i}")),
        text(&|i| format!("c{i}")),
        text(&|_| "SSA".into()),
        text(&|_| "s".into()),
        text(&|_| "approaching_retirement".into()),
        text(&|_| "apply".into()),
        text(&|i| if i % 2 == 0 { "phone" } else { "web" }.into()),
        text(&|_| "WY".into()),
        text(&|_| "65_74".into()),
        Arc::new(Date32Array::from(vec![Some(20_000); PEOPLE])),
    ];
    columns.extend(std::iter::repeat_n(score, 7));
    let batch = Table::Experience
        .complete_v1_batch(
            &RecordBatch::try_new(Table::Experience.arrow_schema_of_version(1), columns).unwrap(),
        )
        .unwrap();
    let ctx = SessionContext::new();
    cxfed_queries::context::register_functions(&ctx);
    ctx.register_table(
        "experience",
        Arc::new(MemTable::try_new(Table::Experience.arrow_schema(), vec![vec![batch]]).unwrap()),
    )
    .unwrap();
    ctx.register_table(
        "operational",
        Arc::new(MemTable::try_new(Table::Operational.arrow_schema(), vec![vec![]]).unwrap()),
    )
    .unwrap();
    ctx
}

fn value(batch: &RecordBatch, row: usize, col: usize) -> f64 {
    let a = arrow::compute::cast(batch.column(col), &arrow::datatypes::DataType::Float64).unwrap();
    a.as_any()
        .downcast_ref::<Float64Array>()
        .unwrap()
        .value(row)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intervals_cover_the_noiseless_value_95_percent_of_the_time() {
    let ctx = context();
    let sql = "SELECT channel, STDDEV(trust) AS sd, VARIANCE(trust) AS v, COUNT(*) AS n, \
               AVG(trust) * 100 AS pct, ROUND(AVG(trust), 2) AS a, AVG(trust) - 1 AS shifted \
               FROM experience GROUP BY channel ORDER BY channel";
    let q = approve(&ctx.state(), sql).await.unwrap();
    let params = DpParams {
        epsilon: 1.0,
        delta: 1e-6,
        max_groups_per_person: 1,
        max_rows_per_person: 1,
        k: 10,
    };
    let dp = q.dp_partial(&params).unwrap();
    let exact = ctx
        .execute_logical_plan(dp.plan.clone())
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    // The noiseless answer through the same merge (same clamping and post-processing).
    let truth = q
        .merge_partials(
            &ctx,
            vec![Partial {
                batches: exact.clone(),
                meta: dp.meta.clone(),
            }],
            1,
        )
        .await
        .unwrap();
    let truth = &truth.batches[0];
    assert_eq!(truth.num_rows(), 2);
    let columns = 1..truth.num_columns();
    let mut covered = vec![0usize; truth.num_columns()];
    let mut widths = vec![0.0f64; truth.num_columns()];
    let mut rng = SplitMix64(7);
    for _ in 0..DRAWS {
        let noisy = dp.add_noise(&exact, &mut rng).unwrap();
        let m = q
            .merge_partials(
                &ctx,
                vec![Partial {
                    batches: noisy,
                    meta: dp.meta.clone(),
                }],
                1,
            )
            .await
            .unwrap();
        assert_eq!(m.batches[0].num_rows(), 2, "both groups are far above τ");
        for c in columns.clone() {
            let ci = m.ci95[0][c].unwrap_or_else(|| panic!("column {c} has no interval"));
            widths[c] += ci / DRAWS as f64;
            let err = (value(&m.batches[0], 0, c) - value(truth, 0, c)).abs();
            // ROUND adds up to half a unit of its last digit on top of the noise.
            if err <= ci + 0.005 {
                covered[c] += 1;
            }
        }
        assert_eq!(m.ci95[0][0], None, "the group key is exact");
    }
    for c in columns {
        let rate = covered[c] as f64 / DRAWS as f64;
        eprintln!("column {c}: coverage {rate}, mean half-width {}", widths[c]);
        assert!(
            (0.88..=0.995).contains(&rate),
            "column {c}: coverage {rate} (mean half-width {})",
            widths[c]
        );
    }
    // pct = 100 × avg, and shifting by a constant keeps the width.
    assert!((widths[4] / widths[5] - 100.0).abs() < 1e-6, "{widths:?}");
    assert!((widths[6] - widths[5]).abs() < 1e-9, "{widths:?}");
}
