#!/usr/bin/env python3
"""Utility of cxfed's differential privacy on demo-scale data, against OpenDP on the pooled data.

Starts `cxfed demo --serve` (3 agencies x N people, real mTLS nodes, DP mode, epsilon = 1 per
query), asks AVG(trust) by life_experience x journey_stage x channel through the federation
several times (fresh noise each time), and computes the same statistic over the pooled Parquet
files (truth, DuckDB) and with OpenDP's Laplace mechanism at the same epsilon over the pooled data
(same privacy unit: one person, one row, one group; trust clamped to 1..5 and centred on 3; epsilon
split evenly over the released noisy count and sum; the group keys are public vocabularies, so
OpenDP needs no partition selection). Reports the median and p90 relative error of each and the
ratio. Usage: bench/dp_utility.py [--people 20000] [--runs 5] [--epsilon 1]
"""
import argparse, json, os, re, signal, statistics, subprocess, sys, tempfile, time
from pathlib import Path

import duckdb
import opendp.prelude as dp

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("CXFED_BIN", str(Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release" / "cxfed")))
SQL = ("SELECT life_experience, journey_stage, channel, AVG(trust) AS t FROM experience "
       "GROUP BY life_experience, journey_stage, channel")


def start_demo(people, d, flags=()):
    proc = subprocess.Popen([str(BIN), "demo", "--serve", "--dir", d, "--people", str(people), *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = []
    deadline = time.time() + 600
    for line in proc.stdout:
        out.append(line)
        if "keeps running" in line:
            break
        if time.time() > deadline:
            raise SystemExit("demo did not start:\n" + "".join(out))
    url = re.search(r"node SSA\s+(https://\S+)", "".join(out)).group(1)
    return proc, url


def cxfed_query(url, d, agency, eps):
    a = agency.lower()
    cmd = [str(BIN), "query", "--node", url, "--ca", f"{d}/certs/ca.pem", "--cert", f"{d}/certs/{a}/analyst.pem",
           "--key", f"{d}/certs/{a}/analyst.key", "--format", "json", "--epsilon", str(eps), SQL]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    j = json.loads(r.stdout)
    return {(row[0], row[1], row[2]): row[3] for row in j["rows"] if row[3] is not None}


def truth(d):
    con = duckdb.connect()
    rows = con.execute(f"""SELECT life_experience, journey_stage, channel, AVG(trust)
        FROM read_parquet('{d}/data/*/experience/*.parquet') GROUP BY ALL""").fetchall()
    return {(a, b, c): v for a, b, c, v in rows if v is not None}


def opendp_release(d, eps, seed):
    """One row per person (chosen at random), trust clamped and centred; Laplace on n and s."""
    con = duckdb.connect()
    con.execute(f"SELECT setseed({(seed % 1000) / 1000.0})")
    rows = con.execute(f"""
        WITH s AS (SELECT person_id, life_experience, journey_stage, channel,
                          LEAST(GREATEST(trust, 1), 5) - 3 AS x, random() AS u
                   FROM read_parquet('{d}/data/*/experience/*.parquet') WHERE trust IS NOT NULL),
             r AS (SELECT *, ROW_NUMBER() OVER (PARTITION BY person_id ORDER BY u) AS k FROM s)
        SELECT life_experience, journey_stage, channel, COUNT(*)::DOUBLE, SUM(x)::DOUBLE
        FROM r WHERE k = 1 GROUP BY ALL""").fetchall()
    dp.enable_features("contrib")
    domain = dp.vector_domain(dp.atom_domain(T=float, nan=False))
    metric = dp.l1_distance(T=float)
    # epsilon split evenly over the two released statistics; per-person L1 sensitivity 1 and 2.
    count_mech = dp.m.make_laplace(domain, metric, scale=1.0 / (eps / 2))
    sum_mech = dp.m.make_laplace(domain, metric, scale=2.0 / (eps / 2))
    assert count_mech.check(1.0, eps / 2) and sum_mech.check(2.0, eps / 2)
    keys = [r[:3] for r in rows]
    n = count_mech([r[3] for r in rows])
    s = sum_mech([r[4] for r in rows])
    out = {}
    for key, nn, ss in zip(keys, n, s):
        if nn > 0:
            out[key] = min(5.0, max(1.0, 3.0 + ss / nn))
    return out


def rel_errors(est, tru, keys):
    return [abs(est[k] - tru[k]) / tru[k] for k in keys]


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


# Each setting runs the same data (the demo's seeds are fixed) in a fresh federation.
SETTINGS = [
    ("h = n (default)", []),
    ("h = n - 1", ["--assume-honest-nodes", "2"]),
    ("h = 1", ["--assume-honest-nodes", "1"]),
    ("no secure aggregation", ["--no-secure-aggregation"]),
]


def measure(a, flags):
    d = tempfile.mkdtemp(prefix="cxfed-dp-utility-")
    proc, url = start_demo(a.people, d, flags)
    runs = []
    try:
        tru = truth(d)
        # The demo spent SSA's analyst budget on its own queries; CMS and OPM analysts have 10 each.
        analysts = ["CMS"] * 10 + ["OPM"] * 10
        for i in range(a.runs):
            q0 = time.time()
            fed = cxfed_query(url, d, analysts[i], a.epsilon)
            q_secs = time.time() - q0
            odp = opendp_release(d, a.epsilon, seed=i + 1)
            both = sorted(set(fed) & set(odp) & set(tru))
            fe, oe = rel_errors(fed, tru, both), rel_errors(odp, tru, both)
            # Over every true group: a group a method did not release (or released as NULL) is
            # read as the middle of the 1-5 scale, what an analyst without it would assume.
            every = sorted(tru)
            fa = rel_errors({k: fed.get(k, 3.0) for k in every}, tru, every)
            oa = rel_errors({k: odp.get(k, 3.0) for k in every}, tru, every)
            runs.append({"groups_truth": len(tru), "groups_cxfed": len(set(fed) & set(tru)),
                         "groups_opendp": len(set(odp) & set(tru)),
                         "groups_compared": len(both),
                         "cxfed_median": statistics.median(fe), "cxfed_p90": pct(fe, 0.9),
                         "opendp_median": statistics.median(oe), "opendp_p90": pct(oe, 0.9),
                         "cxfed_median_all": statistics.median(fa), "opendp_median_all": statistics.median(oa),
                         "seconds_cxfed_query": round(q_secs, 3)})
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    med = lambda k: statistics.median(r[k] for r in runs)
    return {"runs": runs,
            "cxfed_median_rel_error": med("cxfed_median"), "opendp_median_rel_error": med("opendp_median"),
            "ratio_cxfed_over_opendp": med("cxfed_median") / med("opendp_median"),
            "cxfed_median_rel_error_all_groups": med("cxfed_median_all"),
            "opendp_median_rel_error_all_groups": med("opendp_median_all"),
            "median_query_seconds": med("seconds_cxfed_query")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--people", type=int, default=20000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--epsilon", type=float, default=1.0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "dp_utility.json"))
    a = ap.parse_args()
    if not BIN.exists():
        raise SystemExit(f"{BIN} missing: run `cargo build --release` first")
    t0 = time.time()
    settings = {name: measure(a, flags) for name, flags in SETTINGS}
    head = settings[SETTINGS[0][0]]
    summary = {"people_per_agency": a.people, "agencies": 3, "epsilon": a.epsilon, "binary": str(BIN),
               **{k: v for k, v in head.items() if k != "runs"}, "runs": head["runs"],
               "settings": settings, "seconds": round(time.time() - t0, 1)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(summary, indent=2) + "\n")
    md = [f"# DP utility: AVG(trust) by life_experience x journey_stage x channel, eps = {a.epsilon}, 3 x {a.people} people", "",
          f"Default setting ({SETTINGS[0][0]}), per run:", "",
          "| run | true groups released (truth / cxfed / OpenDP / both) | cxfed median | cxfed p90 | OpenDP median | OpenDP p90 | cxfed median, all groups | OpenDP median, all groups |",
          "|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(head["runs"]):
        md.append(f"| {i+1} | {r['groups_truth']} / {r['groups_cxfed']} / {r['groups_opendp']} / {r['groups_compared']} | "
                  f"{r['cxfed_median']:.2%} | {r['cxfed_p90']:.2%} | {r['opendp_median']:.2%} | {r['opendp_p90']:.2%} | "
                  f"{r['cxfed_median_all']:.2%} | {r['opendp_median_all']:.2%} |")
    md += ["", "Every setting, medians over runs (groups both released; all true groups, an unreleased one read as 3):", "",
           "| setting | cxfed | OpenDP (pooled, central) | ratio | cxfed, all groups | OpenDP, all groups | query latency (s, CLI end to end) |",
           "|---|---|---|---|---|---|---|"]
    for name, r in settings.items():
        md.append(f"| {name} | {r['cxfed_median_rel_error']:.2%} | {r['opendp_median_rel_error']:.2%} | "
                  f"{r['ratio_cxfed_over_opendp']:.2f} | {r['cxfed_median_rel_error_all_groups']:.2%} | "
                  f"{r['opendp_median_rel_error_all_groups']:.2%} | {r['median_query_seconds']:.3f} |")
    md += ["", f"Binary: {BIN}."]
    Path(a.out).with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
