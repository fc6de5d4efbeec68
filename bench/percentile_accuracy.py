#!/usr/bin/env python3
"""Accuracy of cxfed's DP percentiles (issue 21) against OpenDP's quantile mechanism on the pooled data.

Starts `cxfed demo --serve` (3 agencies x N people, real mTLS nodes, DP mode, epsilon = 1 per
query and node), asks MEDIAN and PERCENTILE_CONT(0.9) of wait_minutes by channel through the
federation --runs times (fresh noise each time), and compares each answer with the exact pooled
percentile (DuckDB's quantile_cont over the nodes' Parquet files, waits clamped to the DP bound of
240) and with OpenDP's private quantile (exponential mechanism, Smith 2011 / permute-and-flip) over
the pooled data at the same epsilon: one row per person (chosen at random, as cxfed keeps one
group and one row per person), candidates every whole minute 0..240, epsilon split evenly over the
two quantiles of a channel (channels are disjoint: parallel composition; the keys are public, so
OpenDP needs no partition selection). Errors: rank error (the distance from p to the ranks
[F(x-), F(x)] the estimate x holds in the pooled data, 0 for a true p-quantile) and absolute
error in minutes, for cxfed also of its answer rounded to a whole minute (OpenDP's candidates are
whole minutes, and so are the true waits). Channels with fewer than --min-waits waits are skipped.
Usage: bench/percentile_accuracy.py [--people 20000] [--runs 5] [--epsilon 1]
"""
import argparse, bisect, json, os, re, signal, statistics, subprocess, tempfile, time
from pathlib import Path

import duckdb
import opendp.prelude as dp

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("CXFED_BIN", str(Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release" / "cxfed")))
SQL = ("SELECT channel, MEDIAN(wait_minutes) AS m, PERCENTILE_CONT(0.9) WITHIN GROUP (ORDER BY wait_minutes) AS p90 "
       "FROM operational WHERE wait_minutes IS NOT NULL GROUP BY channel")
PS = {"median": 0.5, "p90": 0.9}


def start_demo(people, d):
    proc = subprocess.Popen([str(BIN), "demo", "--serve", "--dir", d, "--people", str(people)],
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
    out = {}
    for row, ci in zip(j["rows"], j["ci95"]):
        out[row[0]] = {"median": row[1], "p90": row[2], "median_ci": ci[1], "p90_ci": ci[2]}
    return out


def pooled_waits(d):
    con = duckdb.connect()
    rows = con.execute(f"""SELECT channel, LEAST(wait_minutes, 240)::DOUBLE
        FROM read_parquet('{d}/data/*/operational/*.parquet') WHERE wait_minutes IS NOT NULL""").fetchall()
    out = {}
    for c, w in rows:
        out.setdefault(c, []).append(w)
    return {c: sorted(v) for c, v in out.items()}


def quantile_cont(xs, p):
    at = p * (len(xs) - 1)
    lo, hi = int(at), min(len(xs) - 1, int(at) + 1)
    return xs[lo] + (at - lo) * (xs[hi] - xs[lo])


def rank_error(xs, value, p):
    """How far p is from the ranks `value` holds: 0 when F(value-) <= p <= F(value), the
    definition of a p-quantile of data with ties (waits are whole minutes, many are 0)."""
    below = bisect.bisect_left(xs, value) / len(xs)
    at_or_below = bisect.bisect_right(xs, value) / len(xs)
    return max(0.0, below - p, p - at_or_below)


def opendp_release(d, eps, seed):
    """One row per person (random), then OpenDP's private quantile per channel, eps/2 each."""
    con = duckdb.connect()
    con.execute(f"SELECT setseed({(seed % 1000) / 1000.0})")
    rows = con.execute(f"""
        WITH s AS (SELECT person_id, channel, LEAST(wait_minutes, 240)::DOUBLE AS w, random() AS u
                   FROM read_parquet('{d}/data/*/operational/*.parquet') WHERE wait_minutes IS NOT NULL),
             r AS (SELECT *, ROW_NUMBER() OVER (PARTITION BY person_id ORDER BY u) AS k FROM s)
        SELECT channel, w FROM r WHERE k = 1""").fetchall()
    by = {}
    for c, w in rows:
        by.setdefault(c, []).append(w)
    dp.enable_features("contrib")
    domain = dp.vector_domain(dp.atom_domain(T=float, nan=False))
    metric = dp.symmetric_distance()
    candidates = [float(x) for x in range(0, 241)]
    out = {}
    for c, ws in by.items():
        out[c] = {}
        for name, p in PS.items():
            make = lambda s: dp.m.make_private_quantile(domain, metric, dp.max_divergence(), candidates, p, s)
            m = dp.binary_search_chain(make, d_in=1, d_out=eps / 2)
            out[c][name] = m(ws)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--people", type=int, default=20000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--epsilon", type=float, default=1.0)
    ap.add_argument("--min-waits", type=int, default=200)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "percentile_accuracy.json"))
    a = ap.parse_args()
    if not BIN.exists():
        raise SystemExit(f"{BIN} missing: run `cargo build --release` first")
    d = tempfile.mkdtemp(prefix="cxfed-percentiles-")
    t0 = time.time()
    proc, url = start_demo(a.people, d)
    try:
        waits = pooled_waits(d)
        channels = sorted(c for c, v in waits.items() if len(v) >= a.min_waits)
        rows = []
        analysts = ["CMS"] * 10 + ["OPM"] * 10
        for i in range(a.runs):
            fed = cxfed_query(url, d, analysts[i], a.epsilon)
            odp = opendp_release(d, a.epsilon, seed=i + 1)
            for c in channels:
                for name, p in PS.items():
                    truth = quantile_cont(waits[c], p)
                    f = fed.get(c, {}).get(name)
                    o = odp.get(c, {}).get(name)
                    rows.append({"run": i + 1, "channel": c, "quantile": name, "waits": len(waits[c]), "truth": truth,
                                 "cxfed": f, "cxfed_ci95": fed.get(c, {}).get(name + "_ci"), "opendp": o,
                                 "cxfed_abs": None if f is None else abs(f - truth),
                                 "cxfed_rounded_abs": None if f is None else abs(round(f) - truth),
                                 "opendp_abs": None if o is None else abs(o - truth),
                                 "cxfed_rank": None if f is None else rank_error(waits[c], f, p),
                                 "opendp_rank": None if o is None else rank_error(waits[c], o, p)})
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    med = lambda xs: statistics.median(x for x in xs if x is not None)
    table = []
    for c in channels:
        for name in PS:
            rs = [r for r in rows if r["channel"] == c and r["quantile"] == name]
            table.append({"channel": c, "quantile": name, "waits": rs[0]["waits"], "truth": rs[0]["truth"],
                          **{k: med(r[k] for r in rs) for k in ["cxfed_abs", "cxfed_rounded_abs", "opendp_abs", "cxfed_rank", "opendp_rank"]}})
    summary = {"people_per_agency": a.people, "agencies": 3, "epsilon": a.epsilon, "runs": a.runs, "rows": rows,
               "by_channel": table,
               "median_rank_error": {"cxfed": med(r["cxfed_rank"] for r in rows), "opendp": med(r["opendp_rank"] for r in rows)},
               "median_abs_error_minutes": {"cxfed": med(r["cxfed_abs"] for r in rows),
                                            "cxfed_rounded": med(r["cxfed_rounded_abs"] for r in rows),
                                            "opendp": med(r["opendp_abs"] for r in rows)},
               "mean_abs_error_minutes": {k: statistics.mean(r[k + "_abs"] for r in rows if r[k + "_abs"] is not None)
                                          for k in ["cxfed", "cxfed_rounded", "opendp"]},
               "mean_rank_error": {k: statistics.mean(r[k + "_rank"] for r in rows if r[k + "_rank"] is not None)
                                   for k in ["cxfed", "opendp"]},
               "seconds": round(time.time() - t0, 1)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(summary, indent=2) + "\n")
    md = [f"# DP percentiles: MEDIAN and p90 of wait_minutes by channel, eps = {a.epsilon}, 3 x {a.people} people, {a.runs} runs", "",
          "Median over runs. cxfed: three nodes, secure aggregation (channels are public), the median and p90 read off one histogram at the whole eps; OpenDP: pooled data, private quantile, eps/2 each.", "",
          "| channel | quantile | waits | pooled truth | cxfed abs err (min) | cxfed rounded | OpenDP abs err (min) | cxfed rank err | OpenDP rank err |",
          "|---|---|---|---|---|---|---|---|---|"]
    for t in table:
        md.append(f"| {t['channel']} | {t['quantile']} | {t['waits']} | {t['truth']:.1f} | {t['cxfed_abs']:.2f} | {t['cxfed_rounded_abs']:.2f} | {t['opendp_abs']:.2f} | "
                  f"{t['cxfed_rank']:.4f} | {t['opendp_rank']:.4f} |")
    s = summary
    ma, mr = s["mean_abs_error_minutes"], s["mean_rank_error"]
    md += ["", f"Over all rows: mean rank error cxfed {mr['cxfed']:.4f}, OpenDP {mr['opendp']:.4f}; "
           f"mean absolute error cxfed {ma['cxfed']:.2f} min ({ma['cxfed_rounded']:.2f} rounded), OpenDP {ma['opendp']:.2f} min; "
           f"median absolute error cxfed {s['median_abs_error_minutes']['cxfed']:.2f} ({s['median_abs_error_minutes']['cxfed_rounded']:.2f} rounded), "
           f"OpenDP {s['median_abs_error_minutes']['opendp']:.2f} min."]
    Path(a.out).with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
