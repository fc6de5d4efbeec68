//! `cxfed report a11-quarterly`: the OMB Circular A-11 Section 280 quarterly CX data, in the
//! layout GSA publishes for High-Impact Service Providers, computed as federated queries.
//!
//! One row per agency × service × channel × question for a federal fiscal quarter: the seven
//! legacy items (question ids 1–7 in A-11 order), plus question 8 for FY2024+ thumbs-up/down
//! trust answers. Each question is one signed federated query over `experience` — counts per
//! answer option only, so each node calibrates its noise to 6 statistics (persons + 5 counts)
//! rather than to every question at once — and `population_size` (cases opened in the quarter)
//! is one more over `operational`: a report spends nine queries' worth of each node's privacy
//! budget (`--epsilon` sets how much each). `point_scale` and the respondent counts are computed
//! from the released counts (post-processing). `organization_name` and `service_provider_name`
//! are the names GSA's published data uses for the agency ([`agency_names`]). Every count is what the nodes' policies let out
//! — noised (`dp`) or exact for groups of at least k people (`k-only`; smaller groups withheld)
//! — and the `reflection` column says which, with the noise interval.

use std::collections::BTreeMap;

use cxfed_protocol::wire::{QueryRequest, QueryResponse};
use cxfed_queries::schema::SCORES;
use serde_json::Value;

use crate::client::{AnalystClient, QueryFailure, send_query};

/// The published header, exactly.
pub const HEADER: &[&str] = &[
    "fiscal_year",
    "quarter",
    "organization_id",
    "organization_name",
    "service_provider_id",
    "service_provider_name",
    "service_provider_desc",
    "service_id",
    "service_name",
    "service_provided",
    "transaction_point",
    "channel",
    "rating",
    "reflection",
    "population_size",
    "volume_of_customers_provided_survey_opportunity",
    "volume_of_respondents",
    "sample_size",
    "question_id",
    "question_text",
    "strongly_disagree_num",
    "disagree_num",
    "neutral_num",
    "agree_num",
    "strongly_agree_num",
    "strongly_agree_or_agree_num",
    "point_scale",
    "metric_category",
];

/// A-11 question id, standard text and metric category of each legacy item of
/// [`SCORES`] (same order).
const QUESTIONS: [(u32, &str, &str); 7] = [
    (
        2,
        "This interaction increased my confidence in {agency}.",
        "trust",
    ),
    (
        1,
        "I am satisfied with the service I received.",
        "satisfaction",
    ),
    (3, "My need was addressed.", "effectiveness"),
    (4, "It was easy to complete what I needed to do.", "ease"),
    (
        5,
        "It took a reasonable amount of time to do what I needed to do.",
        "efficiency",
    ),
    (6, "I was treated fairly.", "transparency"),
    (7, "Employees I interacted with were helpful.", "employee"),
];

/// The names GSA's published HISP data uses (`organization_name`, `service_provider_name`) for
/// the usual agency abbreviations: the department (or independent agency) and the service
/// provider. An abbreviation not listed is used as both.
const AGENCY_NAMES: &[(&str, &str, &str)] = &[
    (
        "SSA",
        "Social Security Administration",
        "Social Security Administration",
    ),
    (
        "CMS",
        "U.S. Department of Health & Human Services",
        "Centers for Medicare and Medicaid Services",
    ),
    (
        "HHS",
        "U.S. Department of Health & Human Services",
        "U.S. Department of Health & Human Services",
    ),
    (
        "OPM",
        "Office of Personnel Management",
        "Office of Personnel Management",
    ),
    (
        "IRS",
        "Internal Revenue Service",
        "Internal Revenue Service",
    ),
    (
        "VA",
        "Department of Veterans Affairs",
        "Department of Veterans Affairs",
    ),
    (
        "VBA",
        "Department of Veterans Affairs",
        "Veterans Benefits Administration",
    ),
    (
        "VHA",
        "Department of Veterans Affairs",
        "Veterans Health Administration",
    ),
    ("DOL", "Department of Labor", "Department of Labor"),
    (
        "FEMA",
        "Department of Homeland Security",
        "Federal Emergency Management Agency",
    ),
    (
        "TSA",
        "Department of Homeland Security",
        "Transportation Security Administration",
    ),
    (
        "CBP",
        "Department of Homeland Security",
        "Customs and Border Protection",
    ),
    (
        "DHS",
        "Department of Homeland Security",
        "Department of Homeland Security",
    ),
    (
        "USCIS",
        "U.S. Citizenship and Immigration Services",
        "Citizenship and Immigration Services",
    ),
    (
        "SBA",
        "Small Business Administration",
        "Small Business Administration",
    ),
    (
        "HUD",
        "Department of Housing and Urban Development",
        "Housing and Urban Development",
    ),
    (
        "USDA",
        "Department of Agriculture",
        "Department of Agriculture",
    ),
    (
        "NRCS",
        "Department of Agriculture",
        "Natural Resources Conservation Service",
    ),
    ("ED", "Department of Education", "Department of Education"),
    ("DOS", "Department of State", "Department of State"),
    (
        "DOI",
        "Department of the Interior",
        "Department of the Interior",
    ),
    (
        "FWS",
        "Department of the Interior",
        "Fish and Wildlife Service",
    ),
    ("DOC", "Department of Commerce", "Department of Commerce"),
    (
        "USPTO",
        "Department of Commerce",
        "United States Patent and Trademark Office",
    ),
    (
        "GSA",
        "General Services Administration",
        "General Services Administration",
    ),
    (
        "USAID",
        "United States Agency for International Development",
        "U.S. Agency for International Development",
    ),
    ("DOD", "Department of Defense", "Department of Defense"),
];

/// `(organization_name, service_provider_name)` for an agency abbreviation, as GSA's published
/// data names them; the abbreviation itself for both when it is not in the table.
pub fn agency_names(abbreviation: &str) -> (&str, &str) {
    AGENCY_NAMES
        .iter()
        .find(|(a, _, _)| a.eq_ignore_ascii_case(abbreviation))
        .map_or((abbreviation, abbreviation), |(_, org, provider)| {
            (*org, *provider)
        })
}

/// Question id of the FY2024+ thumbs-up/down trust item.
const THUMBS_QUESTION: u32 = 8;

/// The experience query for one item (or `trust_thumbs_up`): per group, counts per answer.
pub fn item_sql(item: &str, fiscal_year: i32, quarter: u8) -> String {
    let values: &[u8] = if item == THUMBS {
        &[0, 1]
    } else {
        &[1, 2, 3, 4, 5]
    };
    let counts: Vec<String> = values
        .iter()
        .map(|v| format!("COUNT(*) FILTER (WHERE {item} = {v}) AS c{v}"))
        .collect();
    format!(
        "SELECT agency, service, channel, {} FROM experience \
         WHERE fiscal_year = {fiscal_year} AND fiscal_quarter = {quarter} \
         GROUP BY agency, service, channel",
        counts.join(", ")
    )
}

/// The thumbs-up/down trust column of the FY2024+ form.
const THUMBS: &str = "trust_thumbs_up";

/// The operational query: cases opened in the quarter per group.
pub fn population_sql(fiscal_year: i32, quarter: u8) -> String {
    format!(
        "SELECT agency, service, channel, COUNT(*) AS cases FROM operational \
         WHERE fiscal_year = {fiscal_year} AND fiscal_quarter = {quarter} \
         GROUP BY agency, service, channel"
    )
}

/// One released number and the half-width of its 95% noise interval (0 when exact).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Num {
    value: f64,
    ci: f64,
}

type Key = (String, String, String);

/// The agencies whose part each (agency, service, channel) row of a response lacks.
fn missing_by_group(resp: &QueryResponse) -> BTreeMap<Key, Vec<String>> {
    resp.rows
        .iter()
        .enumerate()
        .map(|(r, row)| {
            let text = |i: usize| row.get(i).and_then(Value::as_str).unwrap_or("").to_string();
            (
                (text(0), text(1), text(2)),
                crate::output::missing_parts(resp, r).to_vec(),
            )
        })
        .collect()
}

/// Rows of a response keyed by (agency, service, channel), by column name.
fn by_group(resp: &QueryResponse) -> BTreeMap<Key, BTreeMap<String, Num>> {
    let mut out = BTreeMap::new();
    for (r, row) in resp.rows.iter().enumerate() {
        let text = |i: usize| row.get(i).and_then(Value::as_str).unwrap_or("").to_string();
        let mut cells = BTreeMap::new();
        for (c, name) in resp.columns.iter().enumerate().skip(3) {
            if let Some(v) = row.get(c).and_then(Value::as_f64) {
                let ci = resp
                    .ci95
                    .get(r)
                    .and_then(|x| x.get(c))
                    .copied()
                    .flatten()
                    .unwrap_or(0.0);
                cells.insert(name.clone(), Num { value: v, ci });
            }
        }
        out.insert((text(0), text(1), text(2)), cells);
    }
    out
}

/// Runs the report's queries through `node` and renders the CSV.
pub async fn a11_quarterly(
    client: &AnalystClient,
    node: &str,
    fiscal_year: i32,
    quarter: u8,
    epsilon: Option<f64>,
) -> Result<String, QueryFailure> {
    let ask = |sql: String| QueryRequest::new(sql).epsilon(epsilon);
    let mut answers = Vec::new();
    for item in SCORES.iter().chain([&THUMBS]) {
        answers.push(send_query(client, node, &ask(item_sql(item, fiscal_year, quarter))).await?);
    }
    let ops = send_query(client, node, &ask(population_sql(fiscal_year, quarter))).await?;
    Ok(render(&answers, &ops, fiscal_year, quarter))
}

/// The CSV for the answers of [`item_sql`] (for each of [`SCORES`], then thumbs) and
/// [`population_sql`].
pub fn render(
    items: &[QueryResponse],
    ops: &QueryResponse,
    fiscal_year: i32,
    quarter: u8,
) -> String {
    let population = by_group(ops);
    let mut w = csv::Writer::from_writer(Vec::new());
    let _ = w.write_record(HEADER);
    let questions = QUESTIONS.iter().copied().chain([(
        THUMBS_QUESTION,
        "Thumbs up: I trust {agency} (FY2024+ form; thumbs up counted as agree, down as disagree).",
        "trust",
    )]);
    let mut rows: BTreeMap<(Key, u32), Vec<String>> = BTreeMap::new();
    for (resp, (qid, text, metric)) in items.iter().zip(questions) {
        let missing = missing_by_group(resp);
        for ((agency, service, channel), cells) in by_group(resp) {
            let count = |v: u8| {
                cells
                    .get(&format!("c{v}"))
                    .map(|n| n.value.max(0.0).round())
            };
            // Thumbs: down is "disagree", up is "agree". `options`: which the form asks.
            let (by_option, options): ([Option<f64>; 5], [bool; 5]) = if qid == THUMBS_QUESTION {
                (
                    [None, count(0), None, count(1), None],
                    [false, true, false, true, false],
                )
            } else {
                (
                    [count(1), count(2), count(3), count(4), count(5)],
                    [true; 5],
                )
            };
            let n: f64 = by_option.iter().flatten().sum();
            if n <= 0.0 {
                continue;
            }
            let ci = cells.values().map(|c| c.ci).fold(0.0, f64::max);
            let reflection = if resp.privacy == "dp" {
                let eps: Vec<String> = resp
                    .nodes
                    .iter()
                    .filter_map(|x| x.epsilon.map(|e| format!("{}:{e}", x.agency)))
                    .collect();
                format!(
                    "cxfed: counts carry differential-privacy noise (epsilon per node {}); 95% \
                     noise interval of each count +/-{ci:.0}",
                    eps.join(" ")
                )
            } else {
                let blank = options
                    .iter()
                    .zip(&by_option)
                    .filter(|(asked, c)| **asked && c.is_none())
                    .count();
                let mut r = "cxfed: exact counts; groups of fewer than k people were withheld by \
                             the nodes (k-anonymity)"
                    .to_string();
                if blank > 0 {
                    r.push_str(&format!(
                        "; {blank} answer count(s) held by 1 to k-1 people (at the federation or \
                         at one node) left blank, and the sample, agree count and mean count \
                         only the answers shown"
                    ));
                }
                r
            };
            // Counts without some node's part say whose (see `QueryResponse::missing_parts`),
            // before the noise interval, which stays the reflection's last words.
            let reflection = match missing.get(&(agency.clone(), service.clone(), channel.clone()))
            {
                Some(m) if !m.is_empty() => {
                    let note = format!(
                        "no part from {} (none of their rows in this group, or fewer than their \
                         k)",
                        m.join(" ")
                    );
                    match reflection.split_once("; 95% noise interval") {
                        Some((head, tail)) => format!("{head}; {note}; 95% noise interval{tail}"),
                        None => format!("{reflection}; {note}"),
                    }
                }
                _ => reflection,
            };
            // A total over a blank count would be wrong (and, with the blank, tell it).
            let withheld = |i: usize| options[i] && by_option[i].is_none();
            let agree = (!withheld(3) && !withheld(4))
                .then(|| by_option[3].unwrap_or(0.0) + by_option[4].unwrap_or(0.0));
            let mean = (qid != THUMBS_QUESTION && !(0..5).any(withheld)).then(|| {
                by_option
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (i + 1) as f64 * c.unwrap_or(0.0))
                    .sum::<f64>()
                    / n
            });
            let cases = population
                .get(&(agency.clone(), service.clone(), channel.clone()))
                .and_then(|c| c.get("cases"))
                .map_or(String::new(), |c| format!("{:.0}", c.value.max(0.0)));
            let show = |c: Option<f64>| c.map_or(String::new(), |c| format!("{c:.0}"));
            let (organization, provider) = agency_names(&agency);
            let record = vec![
                fiscal_year.to_string(),
                quarter.to_string(),
                String::new(),
                organization.to_string(),
                String::new(),
                provider.to_string(),
                String::new(),
                String::new(),
                service.clone(),
                service.clone(),
                String::new(),
                channel.clone(),
                String::new(),
                reflection,
                cases,
                String::new(),
                format!("{n:.0}"),
                format!("{n:.0}"),
                qid.to_string(),
                text.replace("{agency}", &agency),
                show(by_option[0]),
                show(by_option[1]),
                show(by_option[2]),
                show(by_option[3]),
                show(by_option[4]),
                agree.map_or(String::new(), |a| format!("{a:.0}")),
                mean.map_or(String::new(), |m| format!("{m:.2}")),
                metric.to_string(),
            ];
            rows.insert(((agency, service, channel), qid), record);
        }
    }
    for record in rows.values() {
        let _ = w.write_record(record);
    }
    String::from_utf8(w.into_inner().unwrap_or_default()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agencies_are_named_as_in_the_published_data() {
        assert_eq!(
            agency_names("CMS"),
            (
                "U.S. Department of Health & Human Services",
                "Centers for Medicare and Medicaid Services"
            )
        );
        assert_eq!(
            agency_names("SSA"),
            (
                "Social Security Administration",
                "Social Security Administration"
            )
        );
        assert_eq!(
            agency_names("fema"),
            (
                "Department of Homeland Security",
                "Federal Emergency Management Agency"
            )
        );
        // Not in the table: the abbreviation, for both.
        assert_eq!(agency_names("NOAA"), ("NOAA", "NOAA"));
        let mut seen = std::collections::BTreeSet::new();
        for (a, _, _) in AGENCY_NAMES {
            assert!(seen.insert(*a), "{a} twice");
        }
    }

    #[test]
    fn queries_are_accepted_by_the_validator() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let ctx = cxfed_queries::context::planning_context().expect("ctx");
            let sqls = SCORES
                .iter()
                .chain([&THUMBS])
                .map(|i| item_sql(i, 2026, 1))
                .chain([population_sql(2026, 1)]);
            for sql in sqls {
                cxfed_queries::validate::approve(&ctx.state(), &sql)
                    .await
                    .unwrap_or_else(|e| panic!("{sql}: {e}"));
            }
        });
    }
}
