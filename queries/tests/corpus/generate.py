#!/usr/bin/env python3
"""Writes refused.sql and allowed.sql: the hostile-query corpus and the allowed-query corpus.

The files are the data the tests read; this script is how they were made (templates crossed with
the places a forbidden thing can hide). Edit the lists, rerun, commit both outputs.
Format: a `-- expect: CODE` line (refused.sql only), the SQL (may span lines), a line `;;`.
"""
from pathlib import Path

HERE = Path(__file__).parent
IDS = ["person_id", "case_id", "response_id"]
refused = []


def r(code, sql):
    refused.append((code, sql))


# Identifiers anywhere (CXF-Q012).
for i in IDS:
    r("CXF-Q012", f"SELECT {i}, COUNT(*) FROM experience GROUP BY {i}")
    r("CXF-Q012", f"SELECT COUNT(*) FROM experience WHERE {i} = 'x'")
    r("CXF-Q012", f"SELECT COUNT(*) FROM experience WHERE {i} LIKE 'SSA%'")
    r("CXF-Q012", f"SELECT COUNT(*) FROM experience WHERE {i} IN ('a', 'b')")
    r("CXF-Q012", f"SELECT COUNT(*) FROM experience WHERE {i} IS NOT NULL")
    r("CXF-Q012", f"SELECT agency, COUNT(*) FROM experience GROUP BY agency HAVING COUNT({i}) > 1")
    r("CXF-Q012", f"SELECT COUNT({i}) FROM experience")
    r("CXF-Q012", f"SELECT SUM(CASE WHEN {i} = 'x' THEN trust END) FROM experience")
    r("CXF-Q012", f"SELECT AVG(trust) FILTER (WHERE {i} <> 'x') FROM experience")
    r("CXF-Q012", f"SELECT COUNT(*) FROM experience WHERE CAST({i} AS VARCHAR) = 'x'")
    r("CXF-Q012", f"SELECT COUNT(*) FROM experience WHERE lower({i}) = 'x'")
    r("CXF-Q012", f"SELECT COUNT(*) FROM experience WHERE coalesce({i}, 'x') = 'x'")
    r("CXF-Q012", f"SELECT COUNT(*) FROM experience GROUP BY lower({i})")
    r("CXF-Q012", f"SELECT COUNT(*) FROM experience WHERE \"{i}\" = 'x'")
    r("CXF-Q012", f"SELECT COUNT(*) FROM experience WHERE {i.upper()} = 'x'")
    r("CXF-Q012", f"SELECT COUNT(*) FROM experience e WHERE e.{i} = 'x'")
    r("CXF-Q012", f"SELECT agency, COUNT(*) FROM experience GROUP BY agency ORDER BY COUNT({i})")
    r("CXF-Q012", f"SELECT COUNT(*) FROM experience WHERE CASE WHEN {i} = 'x' THEN true ELSE false END")
    r("CXF-Q012", f"SELECT COUNT(*) FROM experience WHERE {i} BETWEEN 'a' AND 'b'")
    r("CXF-Q012", f"SELECT COUNT(*) FROM experience WHERE NOT ({i} = 'x')")
for i in ["person_id", "case_id"]:
    r("CXF-Q012", f"SELECT COUNT(*) FROM operational WHERE {i} = 'x'")
    r("CXF-Q012", f"SELECT outcome, COUNT(*) FROM operational GROUP BY outcome, {i}")
r("CXF-Q012", "SELECT COUNT(DISTINCT case_id) FROM operational")
r("CXF-Q012", "SELECT COUNT(DISTINCT response_id) FROM experience")
r("CXF-Q012", "SELECT COUNT(*) FROM experience e JOIN operational o ON e.case_id = o.case_id WHERE o.person_id = 'x'")
r("CXF-Q012", "SELECT COUNT(*) FROM experience e JOIN operational o ON e.case_id = o.case_id GROUP BY e.person_id")
r("CXF-Q012", "SELECT COUNT(*) FROM experience e JOIN operational o ON e.person_id = o.person_id")
r("CXF-Q007", "SELECT COUNT(*) FROM experience WHERE case_id IN (SELECT case_id FROM operational)")
# Fuzzer finding: DataFusion 55 panics planning a scalar subquery without columns.
r("CXF-Q007", "SELECT COUNT(*) FROM experience WHERE trust > (SELECT FROM experience)")
r("CXF-Q012", "SELECT COUNT(*) FROM experience WHERE person_id = person_id")
r("CXF-Q012", "SELECT COUNT(*) FROM experience WHERE /* hide */ person_id -- x\n = 'x'")
r("CXF-Q012", "SELECT COUNT(*)\nFROM experience\nWHERE\n  person_id\n  = 'x'")

# Raw rows (CXF-Q005).
for cols in ["*", "trust", "trust, satisfaction", "agency, trust", "agency", "wait_minutes",
             "journey_stage, channel", "trust + 1", "abs(trust)", "response_date"]:
    table = "operational" if "wait" in cols else "experience"
    r("CXF-Q005", f"SELECT {cols} FROM {table}")
    r("CXF-Q005", f"SELECT {cols} FROM {table} WHERE agency = 'SSA' LIMIT 5")
r("CXF-Q005", "SELECT e.trust, o.wait_minutes FROM experience e JOIN operational o ON e.case_id = o.case_id")

# Aggregates outside the allow-list (CXF-Q011).
for f in ["MIN", "MAX", "ARRAY_AGG", "FIRST_VALUE", "LAST_VALUE", "BIT_AND", "BIT_OR",
          "BOOL_AND", "APPROX_DISTINCT", "APPROX_MEDIAN", "CORR", "COVAR", "REGR_SLOPE", "NTH_VALUE"]:
    args = "trust" if f not in ("CORR", "COVAR", "REGR_SLOPE") else "trust, ease"
    if f == "NTH_VALUE":
        args = "trust, 1"
    if f == "BOOL_AND":
        args = "trust > 3"
    r("CXF-Q011", f"SELECT {f}({args}) FROM experience")
    r("CXF-Q011", f"SELECT agency, {f}({args}) FROM experience GROUP BY agency")
r("CXF-Q011", "SELECT STRING_AGG(agency, ',') FROM experience")
r("CXF-Q011", "SELECT MAX(wait_minutes) FROM operational WHERE channel = 'phone'")
r("CXF-Q011", "SELECT MIN(response_date) FROM experience")

# GROUP BY measures, raw dates, expressions that single people out (CXF-Q013).
for m in ["trust", "satisfaction", "ease", "employee_helpfulness"]:
    r("CXF-Q013", f"SELECT {m}, COUNT(*) FROM experience GROUP BY {m}")
    r("CXF-Q013", f"SELECT COUNT(*) FROM experience GROUP BY {m} * 10 + ease")
for m in ["wait_minutes", "processing_days"]:
    r("CXF-Q013", f"SELECT {m}, COUNT(*) FROM operational GROUP BY {m}")
    r("CXF-Q013", f"SELECT COUNT(*) FROM operational GROUP BY {m} / 60")
for d in ["response_date"]:
    r("CXF-Q013", f"SELECT {d}, COUNT(*) FROM experience GROUP BY {d}")
    r("CXF-Q013", f"SELECT COUNT(*) FROM experience GROUP BY date_trunc('day', {d})")
    r("CXF-Q013", f"SELECT COUNT(*) FROM experience GROUP BY date_trunc('week', {d})")
    r("CXF-Q013", f"SELECT COUNT(*) FROM experience GROUP BY date_part('day', {d})")
for d in ["opened_date", "closed_date"]:
    r("CXF-Q013", f"SELECT {d}, COUNT(*) FROM operational GROUP BY {d}")
    r("CXF-Q013", f"SELECT COUNT(*) FROM operational GROUP BY date_trunc('hour', {d})")
r("CXF-Q013", "SELECT COUNT(*) FROM experience GROUP BY CASE WHEN trust > 3 THEN 1 ELSE 0 END")
r("CXF-Q013", "SELECT COUNT(*) FROM experience GROUP BY agency || channel")

# Windows (CXF-Q010).
for w in ["COUNT(*) OVER ()", "AVG(trust) OVER (PARTITION BY agency)", "SUM(trust) OVER (ORDER BY agency)"]:
    r("CXF-Q010", f"SELECT agency, {w} FROM experience")
r("CXF-Q010", "SELECT agency, COUNT(*), RANK() OVER (ORDER BY COUNT(*)) FROM experience GROUP BY agency")
r("CXF-Q010", "SELECT agency, AVG(trust), LAG(AVG(trust)) OVER (ORDER BY agency) FROM experience GROUP BY agency")
r("CXF-Q010", "SELECT agency, ROW_NUMBER() OVER (PARTITION BY agency ORDER BY trust) FROM experience")

# Subqueries, CTEs, derived tables (CXF-Q007).
r("CXF-Q007", "SELECT COUNT(*) FROM (SELECT * FROM experience) t")
r("CXF-Q007", "SELECT COUNT(*) FROM (SELECT agency FROM experience WHERE trust = 5) t")
r("CXF-Q007", "WITH t AS (SELECT * FROM experience) SELECT COUNT(*) FROM t")
r("CXF-Q007", "WITH t AS (SELECT agency, trust FROM experience) SELECT agency, AVG(trust) FROM t GROUP BY agency")
r("CXF-Q007", "SELECT COUNT(*) FROM experience WHERE trust > (SELECT AVG(trust) FROM experience)")
r("CXF-Q007", "SELECT COUNT(*) FROM experience WHERE EXISTS (SELECT 1 FROM operational WHERE outcome = 'denied')")
r("CXF-Q007", "SELECT COUNT(*) FROM experience WHERE agency IN (SELECT agency FROM operational)")
r("CXF-Q007", "SELECT (SELECT COUNT(*) FROM operational) FROM experience GROUP BY agency")
r("CXF-Q007", "SELECT COUNT(*) FROM (VALUES (1), (2)) t(x)")
r("CXF-Q007", "SELECT AVG(c) FROM (SELECT agency, COUNT(*) AS c FROM experience GROUP BY agency) t")

# Set operations (CXF-Q008).
for op in ["UNION", "UNION ALL", "INTERSECT", "EXCEPT"]:
    r("CXF-Q008", f"SELECT COUNT(*) FROM experience {op} SELECT COUNT(*) FROM operational")
    r("CXF-Q008", f"SELECT agency, COUNT(*) FROM experience GROUP BY agency {op} SELECT agency, COUNT(*) FROM operational GROUP BY agency")

# Joins (CXF-Q009).
r("CXF-Q009", "SELECT COUNT(*) FROM experience a JOIN experience b ON a.case_id = b.case_id")
r("CXF-Q009", "SELECT COUNT(*) FROM operational a JOIN operational b ON a.case_id = b.case_id")
r("CXF-Q009", "SELECT COUNT(*) FROM experience e JOIN operational o ON e.agency = o.agency")
r("CXF-Q009", "SELECT COUNT(*) FROM experience e JOIN operational o ON e.channel = o.channel AND e.state = o.state")
for j in ["LEFT JOIN", "RIGHT JOIN", "FULL JOIN", "LEFT OUTER JOIN"]:
    r("CXF-Q009", f"SELECT COUNT(*) FROM experience e {j} operational o ON e.case_id = o.case_id")
r("CXF-Q009", "SELECT COUNT(*) FROM experience CROSS JOIN operational")
r("CXF-Q009", "SELECT COUNT(*) FROM experience e JOIN operational o ON e.case_id = o.case_id AND o.wait_minutes > 5")

# Not a query (CXF-Q003).
for s in ["DROP TABLE experience", "DELETE FROM experience", "UPDATE experience SET trust = 5",
          "INSERT INTO experience SELECT * FROM experience", "CREATE TABLE x AS SELECT 1",
          "CREATE VIEW v AS SELECT * FROM experience", "COPY experience TO '/tmp/x.csv'",
          "SET datafusion.execution.batch_size = 1", "SHOW TABLES", "EXPLAIN SELECT COUNT(*) FROM experience",
          "EXPLAIN ANALYZE SELECT COUNT(*) FROM experience", "DESCRIBE experience",
          "CREATE EXTERNAL TABLE x STORED AS CSV LOCATION '/etc/passwd'", "TRUNCATE experience",
          "ALTER TABLE experience ADD COLUMN x INT"]:
    r("CXF-Q003", s)

# Multiple statements (CXF-Q002).
r("CXF-Q002", "SELECT COUNT(*) FROM experience; DROP TABLE experience")
r("CXF-Q002", "SELECT COUNT(*) FROM experience; SELECT COUNT(*) FROM operational")
r("CXF-Q002", "SELECT COUNT(*) FROM experience;\n-- trailing\nSELECT 1")

# Syntax (CXF-Q001).
for s in ["SELEC COUNT(*) FROM experience", "SELECT COUNT(* FROM experience", "SELECT FROM", "",
          "SELECT COUNT(*) FROM experience WHERE", "SELECT 'unterminated FROM experience"]:
    r("CXF-Q001", s)

# Tables (CXF-Q006).
for s in ["SELECT COUNT(*) FROM secrets", "SELECT COUNT(*) FROM information_schema.tables",
          "SELECT COUNT(*) FROM generate_series(1, 10)", "SELECT COUNT(*) FROM range(10)",
          "SELECT 1", "SELECT COUNT(*)", "SELECT COUNT(*) FROM other_catalog.public.experience",
          "SELECT COUNT(*) FROM 'data.parquet'"]:
    r("CXF-Q006", s)

# DISTINCT (CXF-Q015).
r("CXF-Q015", "SELECT DISTINCT agency FROM experience")
r("CXF-Q015", "SELECT COUNT(DISTINCT agency) FROM experience")
r("CXF-Q015", "SELECT COUNT(DISTINCT trust) FROM experience")
r("CXF-Q015", "SELECT SUM(DISTINCT trust) FROM experience")
r("CXF-Q015", "SELECT AVG(DISTINCT wait_minutes) FROM operational")

# Grouping sets (CXF-Q017).
r("CXF-Q017", "SELECT agency, COUNT(*) FROM experience GROUP BY ROLLUP(agency)")
r("CXF-Q017", "SELECT agency, channel, COUNT(*) FROM experience GROUP BY CUBE(agency, channel)")
r("CXF-Q017", "SELECT agency, COUNT(*) FROM experience GROUP BY GROUPING SETS ((agency), ())")

# Functions (CXF-Q014).
r("CXF-Q014", "SELECT COUNT(*) FROM experience WHERE agency SIMILAR TO 'S.*'")
r("CXF-Q014", "SELECT agency, AVG(trust) FROM experience WHERE random() < 0.5 GROUP BY agency")
r("CXF-Q014", "SELECT COUNT(*) FROM experience WHERE now() > response_date")

# Identifiers in expressions, hashes and string functions (CXF-Q012 when the function exists;
# functions this build lacks are refused as such, CXF-Q014).
r("CXF-Q012", "SELECT COUNT(*) FROM experience WHERE person_id % 2 = 0")
r("CXF-Q014", "SELECT COUNT(*) FROM experience GROUP BY md5(person_id)")
r("CXF-Q014", "SELECT agency, COUNT(*) FROM experience WHERE sha256(person_id) > 'a' GROUP BY agency")
r("CXF-Q014", "SELECT COUNT(*) FROM experience WHERE digest(case_id, 'sha256') IS NOT NULL")
r("CXF-Q014", "SELECT COUNT(*) FROM experience WHERE substr(person_id, 1, 3) = 'SSA'")
r("CXF-Q012", "SELECT COUNT(*) FROM experience WHERE length(response_id) > 10")
r("CXF-Q012", "SELECT COUNT(*) FROM experience WHERE concat(person_id, '') = 'x'")
r("CXF-Q012", "SELECT COUNT(*) FROM experience WHERE \"person_id\" = 'x'")
r("CXF-Q012", "SELECT COUNT(*) FROM experience WHERE PERSON_ID = 'x'")
r("CXF-Q012", "SELECT COUNT(*) FROM experience WHERE agency = 'SSA' /* harmless */ AND person_id = 'x'")
# Unicode tricks: a Cyrillic "е" in the table name, a fullwidth letter, a zero-width space.
r("CXF-Q006", "SELECT COUNT(*) FROM \"\u0435xperience\"")
r("CXF-Q004", "SELECT COUNT(*) FROM experience WHERE \"person\u200b_id\" = 'x'")
r("CXF-Q001", "SELECT COUNT(*) FROM experience WHERE trust \uff1e 3")
# Percentiles: of an expression or of a column without a public bucket grid (CXF-Q019, in
# every mode); with a percentile that is no literal in [0, 1], a centroid count or an ordering
# by something else (CXF-Q011). Percentiles of measures with a grid are in allowed.sql.
r("CXF-Q019", "SELECT MEDIAN(wait_minutes + 1) FROM operational")
r("CXF-Q019", "SELECT channel, PERCENTILE_CONT(0.9) WITHIN GROUP (ORDER BY wait_minutes * 2) FROM operational GROUP BY channel")
r("CXF-Q019", "SELECT MEDIAN(CASE WHEN trust > 3 THEN trust END) FROM experience")
r("CXF-Q019", "SELECT APPROX_PERCENTILE_CONT(date_part('year', response_date), 0.5) FROM experience")
r("CXF-Q019", "SELECT MEDIAN(fiscal_quarter) FROM operational")
r("CXF-Q019", "SELECT e.agency, MEDIAN(o.wait_minutes / 60.0) FROM experience e JOIN operational o ON e.case_id = o.case_id GROUP BY e.agency")
r("CXF-Q011", "SELECT PERCENTILE_CONT(1.5) WITHIN GROUP (ORDER BY wait_minutes) FROM operational")
r("CXF-Q011", "SELECT PERCENTILE_CONT(-0.1) WITHIN GROUP (ORDER BY trust) FROM experience")
r("CXF-Q011", "SELECT APPROX_PERCENTILE_CONT(wait_minutes, trust) FROM operational o JOIN experience e ON e.case_id = o.case_id")
r("CXF-Q011", "SELECT APPROX_PERCENTILE_CONT(wait_minutes, 0.5, 100) FROM operational")
r("CXF-Q012", "SELECT MEDIAN(CASE WHEN person_id = 'x' THEN trust END) FROM experience")
r("CXF-Q015", "SELECT MEDIAN(DISTINCT trust) FROM experience")
# Table functions reading files (CXF-Q006).
r("CXF-Q006", "SELECT COUNT(*) FROM read_parquet('/etc/passwd')")
r("CXF-Q006", "SELECT COUNT(*) FROM read_csv('data/ssa/experience.csv')")
# Aggregates of aggregates (CXF-Q016).
r("CXF-Q016", "SELECT SUM(COUNT(*)) FROM experience GROUP BY agency")
r("CXF-Q016", "SELECT AVG(AVG(trust)) FROM experience")
# Functions (CXF-Q014), and row values that could make a query fail (a failure discloses one bit
# about the row that caused it).
r("CXF-Q014", "SELECT COUNT(*) FROM experience WHERE power(trust - 3, -1) > 0")
r("CXF-Q014", "SELECT COUNT(*) FROM experience WHERE CAST(trust AS DECIMAL(3, 1)) > 1")
r("CXF-Q014", "SELECT COUNT(*) FROM experience WHERE response_date + INTERVAL '1 day' > DATE '2025-01-01'")
r("CXF-Q014", "SELECT COUNT(*) FROM experience WHERE channel LIKE service")
r("CXF-Q014", "SELECT AVG(round(trust, trust)) FROM experience")
r("CXF-Q014", "SELECT COUNT(*) FROM experience WHERE regexp_like(service, '^Ret')")
r("CXF-Q014", "SELECT COUNT(*) FROM experience WHERE to_hex(trust) = '5'")
# k-only: arguments that can single out one value or hide a condition (CXF-Q020; the validator
# accepts them, a k-only node refuses them).
r("CXF-Q020", "SELECT ROUND(LN(SUM(EXP(100 * trust))) / 100) FROM experience")
r("CXF-Q020", "SELECT SUM(trust * date_part('day', response_date)) FROM experience")
r("CXF-Q020", "SELECT SUM(trust * trust * trust) FROM experience")
r("CXF-Q020", "SELECT SUM(greatest(wait_minutes - 600, 0, 1)) FROM operational")
r("CXF-Q020", "SELECT AVG(CASE WHEN trust > 3 THEN CASE WHEN state = 'WY' THEN trust END END) FROM experience")
r("CXF-Q020", "SELECT SUM(CAST(state = 'WY' AS INT) * trust) FROM experience")
r("CXF-Q020", "SELECT SUM(sqrt(wait_minutes)) FROM operational")

# Unknown columns (CXF-Q004).
r("CXF-Q004", "SELECT COUNT(nosuch) FROM experience")
r("CXF-Q004", "SELECT AVG(wait_minutes) FROM experience")
# The linkage key is never queryable, by any of its names (CXF-Q012, before planning).
r("CXF-Q012", "SELECT COUNT(*) FROM experience WHERE ssn = '1'")
# Found by cargo-fuzz (30-minute run): a FILTER that is not a condition was planned, then
# failed inside the DP plan as an internal error.
r("CXF-Q004", "SELECT life_experience, AVG(trust) FILTER (WHERE 'phone') FROM experience GROUP BY life_experience")
r("CXF-Q004", "SELECT COUNT(*) FILTER (WHERE trust) FROM experience")

# Size (CXF-Q018).
r("CXF-Q018", "SELECT COUNT(*) FROM experience WHERE " + " OR ".join(f"trust = {i % 5 + 1}" for i in range(2000)))
r("CXF-Q018", "SELECT COUNT(*) FROM experience WHERE " + "(" * 300 + "trust > 1" + ")" * 300)
r("CXF-Q018", "SELECT " + " + ".join(["COUNT(*)"] * 3000) + " FROM experience")

allowed = []
# Answered only by a differential-privacy federation; a k-only one refuses them (CXF-Q021).
dp_only = []
dims = ["agency", "service", "life_experience", "journey_stage", "channel", "state", "age_band"]
for d in dims:
    allowed.append(f"SELECT {d}, COUNT(*), AVG(trust) FROM experience GROUP BY {d} ORDER BY {d}")
    allowed.append(f"SELECT {d}, COUNT(DISTINCT person_id), STDDEV(satisfaction) FROM experience GROUP BY {d} ORDER BY 1")
    allowed.append(f"SELECT {d}, SUM(wait_minutes), AVG(processing_days) FROM operational GROUP BY {d} ORDER BY {d}")
for d in ["outcome", "first_contact_resolved", "abandoned"]:
    allowed.append(f"SELECT {d}, COUNT(*), VAR_POP(wait_minutes) FROM operational GROUP BY {d} ORDER BY {d}")
for a, b in [("agency", "channel"), ("journey_stage", "channel"), ("life_experience", "age_band"), ("state", "agency")]:
    allowed.append(f"SELECT {a}, {b}, COUNT(*), AVG(ease) FROM experience GROUP BY {a}, {b} ORDER BY {a}, {b}")
for g in ["month", "quarter", "year"]:
    allowed.append(f"SELECT date_trunc('{g}', response_date) AS p, AVG(trust) FROM experience GROUP BY date_trunc('{g}', response_date) ORDER BY p")
    allowed.append(f"SELECT date_part('{g}', opened_date) AS p, COUNT(*) FROM operational GROUP BY date_part('{g}', opened_date) ORDER BY p")
    allowed.append(f"SELECT agency, date_trunc('{g}', response_date) AS p, COUNT(*) FROM experience GROUP BY agency, date_trunc('{g}', response_date) ORDER BY agency, p")
for m in ["trust", "satisfaction", "effectiveness", "ease", "efficiency", "transparency", "employee_helpfulness"]:
    allowed.append(f"SELECT channel, AVG({m}), STDDEV_POP({m}), VARIANCE({m}), COUNT({m}) FROM experience GROUP BY channel ORDER BY channel")
    allowed.append(f"SELECT agency, AVG(CASE WHEN {m} >= 4 THEN 1.0 ELSE 0.0 END) AS share FROM experience GROUP BY agency ORDER BY agency")
    allowed.append(f"SELECT COUNT(*) FILTER (WHERE {m} >= 4), COUNT(*) FILTER (WHERE {m} <= 2), SUM({m}) FROM experience")
for d in dims:
    allowed.append(f"SELECT {d}, AVG(trust) FILTER (WHERE channel = 'phone'), COUNT(*) FILTER (WHERE channel = 'website') FROM experience GROUP BY {d} ORDER BY {d}")
    allowed.append(f"SELECT e.{d}, AVG(o.processing_days), AVG(e.efficiency) FROM experience e JOIN operational o ON e.case_id = o.case_id GROUP BY e.{d} ORDER BY e.{d}")
for g in ["month", "quarter", "year"]:
    allowed.append(f"SELECT outcome, date_trunc('{g}', opened_date) AS p, AVG(processing_days) FROM operational GROUP BY outcome, date_trunc('{g}', opened_date) ORDER BY outcome, p")
allowed += [
    "SELECT COUNT(*) FROM experience",
    "SELECT COUNT(DISTINCT person_id) FROM operational",
    "SELECT AVG(trust), STDDEV(trust), VAR_POP(trust), STDDEV_SAMP(trust) FROM experience",
    "SELECT agency, COUNT(*) AS n FROM experience GROUP BY agency HAVING COUNT(*) > 100 ORDER BY n DESC, agency",
    "SELECT agency, AVG(trust) AS t FROM experience GROUP BY agency ORDER BY t DESC, agency LIMIT 2",
    "SELECT channel, ROUND(AVG(trust), 2) FROM experience WHERE response_date >= DATE '2025-04-01' GROUP BY channel ORDER BY channel",
    "SELECT channel, COUNT(*) FROM experience WHERE channel IN ('phone', 'website') GROUP BY channel ORDER BY channel",
    "SELECT channel, COUNT(*) FROM experience WHERE trust BETWEEN 2 AND 4 GROUP BY channel ORDER BY channel",
    "SELECT channel, COUNT(*) FROM experience WHERE service LIKE 'Ret%' GROUP BY channel ORDER BY channel",
    "SELECT channel, COUNT(*) FROM experience WHERE employee_helpfulness IS NULL GROUP BY channel ORDER BY channel",
    "SELECT outcome, AVG(coalesce(wait_minutes, 0)) FROM operational GROUP BY outcome ORDER BY outcome",
    "SELECT outcome, AVG(abs(processing_days - 30)) FROM operational GROUP BY outcome ORDER BY outcome",
    "SELECT e.channel, AVG(o.wait_minutes), AVG(e.satisfaction) FROM experience e JOIN operational o ON e.case_id = o.case_id GROUP BY e.channel ORDER BY e.channel",
    "SELECT o.outcome, COUNT(*), AVG(e.trust) FROM experience e JOIN operational o ON o.case_id = e.case_id GROUP BY o.outcome ORDER BY o.outcome",
    "SELECT e.agency, AVG(e.satisfaction) FILTER (WHERE o.wait_minutes > 60) FROM experience e INNER JOIN operational o ON e.case_id = o.case_id GROUP BY e.agency ORDER BY e.agency",
    "SELECT o.first_contact_resolved, AVG(e.trust), COUNT(DISTINCT e.person_id) FROM experience e JOIN operational o ON e.case_id = o.case_id GROUP BY o.first_contact_resolved ORDER BY 1",
    "SELECT experience.agency, COUNT(*) FROM experience JOIN operational ON experience.case_id = operational.case_id GROUP BY experience.agency ORDER BY 1",
    "SELECT AGENCY, count(*) FROM EXPERIENCE GROUP BY AGENCY ORDER BY AGENCY",
    "select agency, avg(trust) from experience group by agency order by agency",
    "SELECT agency, COUNT(*) * 2 AS doubled, AVG(trust) + 1 FROM experience GROUP BY agency ORDER BY agency",
    "SELECT journey_stage, SUM(processing_days) / COUNT(processing_days) FROM operational GROUP BY journey_stage ORDER BY journey_stage",
    "SELECT age_band, AVG(trust) FROM experience WHERE state = 'CA' AND channel <> 'paper' GROUP BY age_band ORDER BY age_band",
    "SELECT agency, COUNT(*) FROM operational WHERE closed_date IS NULL GROUP BY agency ORDER BY agency",
    "SELECT agency, COUNT(*) FROM operational WHERE NOT abandoned GROUP BY agency ORDER BY agency",
    "SELECT channel, AVG(wait_minutes / 60.0) FROM operational GROUP BY channel ORDER BY channel",
]

dp_only += [
    "SELECT MEDIAN(trust) FROM experience",
    "SELECT agency, MEDIAN(trust) FROM experience GROUP BY agency ORDER BY agency",
    "SELECT APPROX_PERCENTILE_CONT(trust, 0.5) FROM experience",
    "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY wait_minutes) FROM operational",
    "SELECT approx_percentile_cont(wait_minutes, 0.99) FROM operational",
    "SELECT channel, MEDIAN(wait_minutes), PERCENTILE_CONT(0.9) WITHIN GROUP (ORDER BY wait_minutes) AS p90 FROM operational GROUP BY channel ORDER BY channel",
    "SELECT channel, PERCENTILE_CONT(0.1) WITHIN GROUP (ORDER BY wait_minutes DESC) FROM operational GROUP BY channel ORDER BY channel",
    "SELECT outcome, PERCENTILE_CONT(0.5) WITHIN GROUP (ORDER BY processing_days), COUNT(*) FROM operational GROUP BY outcome ORDER BY outcome",
    "SELECT agency, MEDIAN(satisfaction), APPROX_PERCENTILE_CONT(ease, 0.25), AVG(trust) FROM experience GROUP BY agency ORDER BY agency",
    "SELECT e.channel, MEDIAN(o.wait_minutes) FILTER (WHERE e.trust <= 2) FROM experience e JOIN operational o ON e.case_id = o.case_id GROUP BY e.channel ORDER BY e.channel",
    "SELECT journey_stage, quantile_cont(processing_days, 0.75) FROM operational WHERE outcome = 'approved' GROUP BY journey_stage ORDER BY journey_stage",
]
for d in dims:
    dp_only.append(f"SELECT {d}, MEDIAN(wait_minutes), MEDIAN(processing_days) FROM operational GROUP BY {d} ORDER BY {d}")

out = ["-- Refused queries: each block is `-- expect: CODE`, the SQL, then a line `;;`.",
       "-- Generated by generate.py; checked by queries/tests/corpus.rs (validator) and",
       "-- tests/tests/corpus.rs (coordinator and node over mTLS).", ""]
for code, sql in refused:
    out += [f"-- expect: {code}", sql, ";;"]
(HERE / "refused.sql").write_text("\n".join(out) + "\n")
out = ["-- Allowed queries: the SQL, then a line `;;`. Every one orders by all its group keys.",
       "-- Generated by generate.py; federated answers must equal pooled answers.",
       "-- Blocks with `-- expect: CXF-Q021` (percentiles) are answered in dp mode only: a k-only",
       "-- federation refuses them with that code.", ""]
for sql in allowed:
    out += [sql, ";;"]
for sql in dp_only:
    out += ["-- expect: CXF-Q021", sql, ";;"]
(HERE / "allowed.sql").write_text("\n".join(out) + "\n")
print(f"{len(refused)} refused, {len(allowed)} allowed, {len(dp_only)} allowed in dp mode only")
