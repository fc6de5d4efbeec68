//! The example queries the demo runs and the console offers: a title and SQL each, and one
//! query shown being refused.

/// The queries the demo runs: a title and SQL.
pub const QUERIES: &[(&str, &str)] = &[
    (
        "Approaching retirement: trust and satisfaction by journey stage and channel (SSA + CMS + OPM)",
        "SELECT journey_stage, channel, COUNT(DISTINCT person_id) AS people,\n       ROUND(AVG(trust), 2) AS avg_trust, ROUND(AVG(satisfaction), 2) AS avg_satisfaction\nFROM experience\nWHERE life_experience = 'approaching_retirement' AND journey_stage IN ('apply', 'decision')\nGROUP BY journey_stage, channel\nORDER BY journey_stage, people DESC",
    ),
    (
        "Share of respondents who trust the agency (4 or 5) by agency and quarter",
        "SELECT agency, date_trunc('quarter', response_date) AS quarter,\n       COUNT(*) AS responses,\n       ROUND(AVG(CASE WHEN trust >= 4 THEN 1.0 ELSE 0.0 END), 3) AS trust_share\nFROM experience\nWHERE life_experience = 'approaching_retirement'\nGROUP BY agency, date_trunc('quarter', response_date)\nORDER BY agency, quarter",
    ),
    (
        "Wait time vs satisfaction, by channel (each node joins its own survey and case rows)",
        "SELECT o.channel, COUNT(*) AS responses, ROUND(AVG(o.wait_minutes), 1) AS avg_wait_min,\n       ROUND(AVG(e.satisfaction) FILTER (WHERE o.wait_minutes <= 15), 2) AS sat_wait_15_or_less,\n       ROUND(AVG(e.satisfaction) FILTER (WHERE o.wait_minutes > 60), 2) AS sat_wait_over_60\nFROM experience e JOIN operational o ON e.case_id = o.case_id\nWHERE o.wait_minutes IS NOT NULL\nGROUP BY o.channel\nORDER BY avg_wait_min DESC",
    ),
    (
        "Processing time by agency and outcome (closed cases)",
        "SELECT agency, outcome, COUNT(*) AS cases,\n       ROUND(AVG(processing_days), 1) AS avg_days, ROUND(STDDEV(processing_days), 1) AS sd_days\nFROM operational\nWHERE life_experience = 'approaching_retirement' AND outcome <> 'pending'\nGROUP BY agency, outcome\nORDER BY agency, outcome",
    ),
    (
        "Median and 90th-percentile wait by channel (dp mode: read off noisy histograms over a public grid)",
        "SELECT channel, COUNT(*) AS cases,\n       ROUND(MEDIAN(wait_minutes), 1) AS median_wait_min,\n       ROUND(PERCENTILE_CONT(0.9) WITHIN GROUP (ORDER BY wait_minutes), 1) AS p90_wait_min\nFROM operational\nWHERE wait_minutes IS NOT NULL\nGROUP BY channel\nORDER BY channel",
    ),
];

/// The journey query the demo runs (its federation's agencies share people on the retirement
/// journey and a linkage key): the same people at SSA and CMS, matched privately.
pub const JOURNEY: (&str, &str) = (
    "A journey: SSA's approaching-retirement people by how their Medicare enrollment at CMS ended (the same people, matched privately on the linkage key; NULL: not at CMS)",
    "SELECT b.outcome AS cms_outcome, COUNT(*) AS people, AVG(a.trust) AS ssa_trust\nFROM ssa.experience a LEFT JOIN cms.operational b USING (person_id)\nWHERE a.life_experience = 'approaching_retirement'\n  AND b.life_experience = 'approaching_retirement'\nGROUP BY b.outcome",
);

/// A query the demo shows being refused.
pub const REFUSED: (&str, &str) = (
    "A refused query: trying to group by a person",
    "SELECT person_id, AVG(trust) FROM experience GROUP BY person_id",
);
