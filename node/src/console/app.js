// cxfed console: one page per role (analyst, steward, auditor), talking only to the local
// console server (/api/*), which talks to nodes over mTLS with the user's certificate.
// Everything a node or a log says is put on the page as text, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const PALETTE = ["#005ea2", "#d54309", "#00a91c", "#8168b3", "#936f38", "#e52207", "#0d7ea2", "#4d8055"];

/** Builds an element: el("td", {class: "num"}, "3.2", child, ...). */
function el(tag, attrs, ...children) {
  const e = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== undefined && v !== null && v !== false) e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

async function api(path, body) {
  const init = body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
  };
  const r = await fetch("/api/" + path, init);
  const text = await r.text();
  let json = null;
  try { json = JSON.parse(text); } catch (_) { /* not JSON */ }
  if (!r.ok) {
    const msg = json && json.message ? `${json.code || r.status} ${json.message}` : `${r.status} ${text}`;
    throw new Error(msg);
  }
  return json;
}

function fmt(v, digits) {
  if (v === null || v === undefined) return "—";
  if (typeof v === "number") {
    if (Number.isInteger(v)) return v.toLocaleString("en-US");
    if (v !== 0 && Math.abs(v) < 0.001) return v.toExponential(1);
    return v.toLocaleString("en-US", {maximumFractionDigits: digits ?? 3});
  }
  return String(v);
}

/** A result cell as a person reads it: the query's ROUND, dates as dates, federal labels. */
function cellText(v, f) {
  if (v === null || v === undefined || !f) return fmt(v);
  if (typeof v === "number" && f.decimals != null && !Number.isInteger(v)) {
    return v.toLocaleString("en-US", {minimumFractionDigits: f.decimals, maximumFractionDigits: f.decimals});
  }
  if (typeof v === "number" && f.calendar === "fiscal_year") return `FY${v}`;
  if (typeof v === "number" && f.calendar === "fiscal_quarter") return `Q${v}`;
  if (typeof v === "string" && (f.calendar === "date" || f.calendar === "quarter")) {
    const day = asDate(v);
    return f.calendar === "quarter" && fiscalQuarter(day) ? `${day} (${fiscalQuarter(day)})` : day;
  }
  return fmt(v);
}

/** A timestamp at midnight as its date. */
function asDate(s) {
  const m = /^(\d{4}-\d{2}-\d{2})T[0:.]*$/.exec(s);
  return m ? m[1] : s;
}

/** The federal fiscal quarter of a YYYY-MM-DD date (FY N runs Oct 1 N−1 .. Sep 30 N). */
function fiscalQuarter(day) {
  const m = /^(\d{4})-(\d{2})/.exec(day);
  if (!m) return null;
  const y = Number(m[1]), mo = Number(m[2]);
  if (mo < 1 || mo > 12) return null;
  return mo >= 10 ? `FY${y + 1} Q1` : `FY${y} Q${Math.floor((mo - 1) / 3) + 2}`;
}

function table(node, headers, rows, numeric) {
  node.replaceChildren(
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", {scope: "col"}, h)))),
    el("tbody", {}, rows.map((r) => el("tr", {}, r.map((c, i) =>
      c instanceof Node ? el("td", {}, c) : el("td", {class: numeric && numeric[i] ? "num" : null}, fmt(c)))))),
  );
}

const hash = new URLSearchParams(location.hash.slice(1));

// ---------------------------------------------------------------- charts (SVG, no library)

/** Horizontal bars with optional ±interval whiskers. items: [{label, value, ci}] */
function barChart(items, title, unit) {
  const W = 760, rowH = 24, left = 260, right = 70, top = 26;
  const H = top + items.length * rowH + 28;
  const max = Math.max(1e-9, ...items.map((d) => Math.abs(d.value) + (d.ci || 0)));
  const x = (v) => left + (W - left - right) * Math.max(0, v) / max;
  const svg = el("svg:svg", {viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img",
    "aria-label": `${title}: bar chart of ${items.length} groups`});
  svg.append(el("svg:text", {x: 0, y: 16, "font-weight": 600}, title));
  for (let t = 0; t <= 4; t++) {
    const v = max * t / 4, gx = x(v);
    svg.append(el("svg:line", {class: "grid", x1: gx, x2: gx, y1: top - 4, y2: H - 24}));
    svg.append(el("svg:text", {x: gx, y: H - 8, "text-anchor": "middle"}, fmt(v, 2)));
  }
  items.forEach((d, i) => {
    const y = top + i * rowH;
    const label = d.label.length > 38 ? d.label.slice(0, 37) + "…" : d.label;
    svg.append(el("svg:text", {x: left - 8, y: y + 16, "text-anchor": "end"}, label));
    const bar = el("svg:rect", {class: "bar" + (d.cls ? " " + d.cls : ""), x: left, y: y + 4,
      width: Math.max(1, x(d.value) - left), height: rowH - 8});
    bar.append(el("svg:title", {}, `${d.label}: ${fmt(d.value)}${d.ci ? " ± " + fmt(d.ci) : ""}${unit || ""}`));
    svg.append(bar);
    if (d.ci) {
      const lo = x(d.value - d.ci), hi = x(d.value + d.ci), cy = y + rowH / 2;
      svg.append(el("svg:line", {class: "err", x1: lo, x2: hi, y1: cy, y2: cy}));
      svg.append(el("svg:line", {class: "err", x1: lo, x2: lo, y1: cy - 5, y2: cy + 5}));
      svg.append(el("svg:line", {class: "err", x1: hi, x2: hi, y1: cy - 5, y2: cy + 5}));
    }
    svg.append(el("svg:text", {x: Math.max(x(d.value), d.ci ? x(d.value + d.ci) : 0) + 6, y: y + 16},
      fmt(d.value, 2)));
  });
  return svg;
}

/** Lines over an ordered x (quarters, dates), one per series, with interval whiskers; `total`
 * is how many series there were before only the first few were kept. */
function lineChart(xs, series, title, total) {
  const W = 760, H = 320, left = 60, right = 50, top = 30, bottom = 50;
  const vals = series.flatMap((s) => s.points.filter((p) => p).flatMap((p) => [p.value - (p.ci || 0), p.value + (p.ci || 0)]));
  let lo = Math.min(...vals), hi = Math.max(...vals);
  if (!(hi > lo)) { lo -= 1; hi += 1; }
  const pad = (hi - lo) * 0.08; lo -= pad; hi += pad;
  const x = (i) => left + (xs.length === 1 ? (W - left - right) / 2 : (W - left - right) * i / (xs.length - 1));
  const y = (v) => top + (H - top - bottom) * (1 - (v - lo) / (hi - lo));
  const svg = el("svg:svg", {viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img",
    "aria-label": `${title}: line chart, ${series.length} series over ${xs.length} points` +
      ((total || series.length) > series.length ? ` (${total - series.length} more series not drawn)` : "")});
  svg.append(el("svg:text", {x: 0, y: 16, "font-weight": 600}, title));
  const dropped = (total || series.length) - series.length;
  if (dropped > 0) {
    svg.append(el("svg:text", {class: "note", x: W, y: 16, "text-anchor": "end"},
      `${series.length} of ${total} series drawn`));
  }
  for (let t = 0; t <= 4; t++) {
    const v = lo + (hi - lo) * t / 4;
    svg.append(el("svg:line", {class: "grid", x1: left, x2: W - right, y1: y(v), y2: y(v)}));
    svg.append(el("svg:text", {x: left - 6, y: y(v) + 4, "text-anchor": "end"}, fmt(v, 2)));
  }
  const every = Math.ceil(xs.length / 10);
  xs.forEach((label, i) => {
    if (i % every === 0) svg.append(el("svg:text", {x: x(i), y: H - bottom + 18, "text-anchor": "middle"}, label));
  });
  series.forEach((s, k) => {
    const colour = PALETTE[k % PALETTE.length];
    const pts = s.points.map((p, i) => p && [x(i), y(p.value), p]).filter(Boolean);
    svg.append(el("svg:polyline", {class: "series", stroke: colour, points: pts.map((p) => p[0] + "," + p[1]).join(" ")}));
    for (const [px, py, p] of pts) {
      if (p.ci) svg.append(el("svg:line", {class: "err", x1: px, x2: px, y1: y(p.value - p.ci), y2: y(p.value + p.ci)}));
      const dot = el("svg:circle", {cx: px, cy: py, r: 4, fill: colour});
      dot.append(el("svg:title", {}, `${s.name} ${p.x}: ${fmt(p.value)}${p.ci ? " ± " + fmt(p.ci) : ""}`));
      svg.append(dot);
    }
  });
  const legend = el("div", {class: "legend"}, series.map((s, k) => {
    const sw = el("span", {class: "swatch"});
    sw.style.background = PALETTE[k % PALETTE.length];
    return el("span", {}, sw, s.name);
  }));
  const note = dropped > 0 ? el("p", {class: "note", id: "series-note"},
    `Only the first ${series.length} of ${total} series are drawn (${dropped} not shown); the table below has every row.`) : null;
  return el("div", {}, svg, legend, note);
}

/** A journey answer (the same people at two agencies) as a flow: each row carries its people
 * from a group of `from` (or all of them) to a group of `to` — or, under LEFT JOIN, to "not at
 * `to`" — as a band whose width is its noisy people count; labels give the count ± its 95%
 * interval and each average of `from`'s measure (trust at SSA, say) ± its interval. */
function journeyMap(result) {
  const j = result.journey;
  const ci95 = result.ci95 || [];
  const col = (role) => j.roles.indexOf(role);
  const cFrom = col("from-group"), cTo = col("to-group"), cN = col("count");
  const avgs = j.roles.flatMap((r, i) => r === "avg" ? [i] : []);
  if (cN < 0 || !result.rows.length) return null;
  const ci = (r, c) => (ci95[r] || [])[c];
  const vague = (r, c) => ((result.not_informative || [])[r] || []).includes(result.columns[c]);
  const pm = (r, c, digits) => (ci(r, c) != null ? ` ± ${fmt(ci(r, c), digits)}` : "") +
    (vague(r, c) ? " (not informative)" : "");
  const away = (row) => cTo >= 0 && row[cTo] === null && j.left;
  const fromName = (row) => cFrom >= 0 ? `${j.from} · ${fmt(row[cFrom])}` : `${j.from} · ${j.from_table}`;
  const toName = (row) => {
    if (cTo < 0) return j.left ? `${j.from} · everyone (at ${j.to} or not)` : `at ${j.to}`;
    if (row[cTo] === null) {
      return j.left ? `not at ${j.to}` + (j.to_group_optional ? ` (or no ${result.columns[cTo]})` : "")
        : `${j.to} · (none)`;
    }
    return `${j.to} · ${fmt(row[cTo])}`;
  };
  const flows = result.rows.map((row, r) => ({row, r, from: fromName(row), to: toName(row),
    n: Math.max(0, Number(row[cN]) || 0), away: away(row)}));
  const froms = [...new Set(flows.map((f) => f.from))];
  const tos = [...new Set(flows.map((f) => f.to))];
  const total = flows.reduce((a, f) => a + f.n, 0) || 1;
  // Band heights share 240 px; each stage takes at least the height of its labels.
  const W = 760, top = 34, gap = 12, nodeW = 14, left = 170, right = W - 300;
  const scale = 240 / total;
  const place = (names, key, labelH) => {
    const pos = new Map();
    let y = top;
    for (const name of names) {
      const n = flows.filter((f) => f[key] === name).reduce((a, f) => a + f.n, 0);
      const h = Math.max(2, n * scale);
      pos.set(name, {y, h, n, used: 0});
      y += Math.max(h, labelH) + gap;
    }
    return {pos, end: y};
  };
  const from = place(froms, "from", 32), to = place(tos, "to", 14 * (2 + avgs.length) + 2);
  const fromPos = from.pos, toPos = to.pos;
  const H = Math.max(from.end, to.end) + 8;
  const svg = el("svg:svg", {viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img",
    "aria-label": `Journey map: ${flows.length} flows from ${j.from} to ${j.to}`});
  svg.append(el("svg:text", {x: 0, y: 16, "font-weight": 600},
    `${j.from} (${j.from_table}) → ${j.to} (${j.to_table}), the same people matched privately`));
  for (const f of flows) {
    const a = fromPos.get(f.from), b = toPos.get(f.to), h = Math.max(1, f.n * scale);
    const y0 = a.y + a.used, y1 = b.y + b.used;
    a.used += h; b.used += h;
    const x0 = left + nodeW, x1 = right, mid = (x0 + x1) / 2;
    const path = el("svg:path", {class: "flow" + (f.away ? " away" : ""),
      d: `M${x0},${y0} C${mid},${y0} ${mid},${y1} ${x1},${y1} L${x1},${y1 + h} C${mid},${y1 + h} ${mid},${y0 + h} ${x0},${y0 + h} Z`});
    const measures = avgs.map((c) => `${result.columns[c]} ${fmt(f.row[c], 2)}${pm(f.r, c, 2)}`).join(", ");
    path.append(el("svg:title", {}, `${f.from} → ${f.to}: ${fmt(f.row[cN])}${pm(f.r, cN, 0)} people` +
      (measures ? `; ${measures}` : "")));
    svg.append(path);
  }
  for (const [name, p] of fromPos) {
    svg.append(el("svg:rect", {class: "stage", x: left, y: p.y, width: nodeW, height: p.h}));
    svg.append(el("svg:text", {x: left - 8, y: p.y + Math.min(p.h, 30) / 2 + 4, "text-anchor": "end"},
      `${name}`));
    svg.append(el("svg:text", {class: "sub", x: left - 8, y: p.y + Math.min(p.h, 30) / 2 + 18, "text-anchor": "end"},
      `${fmt(Math.round(p.n))} people`));
  }
  for (const [name, p] of toPos) {
    const mine = flows.filter((f) => f.to === name);
    const isAway = mine.every((f) => f.away);
    svg.append(el("svg:rect", {class: "stage" + (isAway ? " away" : ""), x: right, y: p.y, width: nodeW, height: p.h}));
    const one = mine.length === 1 ? mine[0] : null;
    const lines = [name, one ? `${fmt(one.row[cN])}${pm(one.r, cN, 0)} people` : `${fmt(Math.round(p.n))} people`];
    if (one) for (const c of avgs) lines.push(`${result.columns[c]} ${fmt(one.row[c], 2)}${pm(one.r, c, 2)}`);
    lines.forEach((t, i) => svg.append(el("svg:text", {class: i ? "sub" : null, x: right + nodeW + 8,
      y: p.y + 12 + i * 14}, t)));
  }
  const noisy = ci95.some((r) => r && r[cN] != null);
  const caption = el("figcaption", {class: "muted"},
    `Band width: people in each flow${noisy ? " (noisy counts; ± is the 95% interval of the noise)" : " (exact counts, each at least k)"}.` +
    (avgs.length ? ` Averages read ${j.from}'s ${j.measure || "measure"} of the people in the flow.` : "") +
    " Nobody learns who is at both: the agencies matched their people privately.");
  return el("div", {}, svg, caption);
}

// ---------------------------------------------------------------- analyst

let last = null; // {result, measures, dims}

function isTime(name, values) {
  return /quarter|date|month|year|week/i.test(name) ||
    values.every((v) => typeof v === "string" && /^\d{4}-\d{2}(-\d{2})?/.test(v));
}

function drawChart() {
  const fig = $("chart");
  const {result, dims} = last;
  const m = Number($("measure").value);
  if (Number.isNaN(m)) { fig.replaceChildren(el("p", {class: "muted"}, "No numeric column to chart.")); return; }
  const name = result.columns[m];
  const ci95 = result.ci95 || [];
  const ci = (r) => (ci95[r] || [])[m] ?? null;
  const rows = result.rows.map((row, r) => ({row, r})).filter(({row}) => typeof row[m] === "number");
  const time = dims.find((d) => isTime(result.columns[d], rows.map(({row}) => row[d])));
  if (time !== undefined && rows.length > 1) {
    const others = dims.filter((d) => d !== time);
    const xs = [...new Set(rows.map(({row}) => String(row[time]).slice(0, 10)))].sort();
    const byName = new Map();
    for (const {row, r} of rows) {
      const s = others.map((d) => fmt(row[d])).join(" · ") || name;
      if (!byName.has(s)) byName.set(s, new Array(xs.length).fill(null));
      const x = String(row[time]).slice(0, 10);
      byName.get(s)[xs.indexOf(x)] = {x, value: row[m], ci: ci(r)};
    }
    const series = [...byName].slice(0, PALETTE.length).map(([n, points]) => ({name: n, points}));
    fig.replaceChildren(lineChart(xs, series, `${name} by ${result.columns[time]}`, byName.size));
  } else {
    const items = rows.slice(0, 40).map(({row, r}) => ({
      label: dims.map((d) => fmt(row[d])).join(" · ") || name, value: row[m], ci: ci(r),
    }));
    fig.replaceChildren(barChart(items, `${name}${dims.length ? " by " + dims.map((d) => result.columns[d]).join(" × ") : ""}`));
  }
  const n = ci95.some((r) => r && r[m] != null);
  fig.append(el("figcaption", {class: "muted"}, n
    ? "Whiskers: 95% interval of the differential-privacy noise."
    : "Values are exact (no noise interval for this column)."));
}

function toCsv(result) {
  const q = (v) => {
    const s = v === null || v === undefined ? "" : String(v);
    return /[",\n\r]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s;
  };
  const ci95 = result.ci95 || [];
  const noisy = result.columns.map((_, i) => ci95.some((r) => r && r[i] != null));
  const head = result.columns.flatMap((c, i) => noisy[i] ? [c, c + "_ci95"] : [c]);
  // Rows without every node's part name the missing nodes in a last column.
  const missing = result.incomplete_groups ? (result.missing_parts || []) : null;
  if (missing) head.push("missing_parts");
  const uninformative = (result.not_informative || []).length ? result.not_informative : null;
  if (uninformative) head.push("not_informative");
  const formats = result.formats || [];
  // Machine-readable: dates without a time of day, numbers as the query rounded them.
  const csvValue = (v, i) => {
    const f = formats[i] || {};
    if (typeof v === "string" && (f.calendar === "date" || f.calendar === "quarter")) return asDate(v);
    if (typeof v === "number" && f.decimals != null && !Number.isInteger(v)) return v.toFixed(f.decimals);
    return v;
  };
  const lines = [head.map(q).join(",")];
  result.rows.forEach((row, r) => {
    const cells = row.flatMap((v, i) => noisy[i] ? [csvValue(v, i), (ci95[r] || [])[i]] : [csvValue(v, i)]);
    if (missing) cells.push((missing[r] || []).join(";"));
    if (uninformative) cells.push((uninformative[r] || []).join(";"));
    lines.push(cells.map(q).join(","));
  });
  return lines.join("\r\n") + "\r\n";
}

function showResult(raw) {
  // A k-only federation sends no intervals at all (the server omits empty `ci95`).
  const result = {...raw, ci95: raw.ci95 || [], noise_sd: raw.noise_sd || []};
  const dims = [], measures = [];
  result.columns.forEach((c, i) => {
    const vals = result.rows.map((r) => r[i]).filter((v) => v !== null);
    (vals.length && vals.every((v) => typeof v === "number") ? measures : dims).push(i);
  });
  last = {result, dims, measures};
  $("nodes").replaceChildren(...result.nodes.map((n) => el("li", {class: n.status},
    el("strong", {}, n.agency), ` ${n.status}`,
    n.status === "ok" ? ` · ${fmt(n.groups)} groups` : "",
    n.epsilon != null ? ` · ε ${fmt(n.epsilon)}` : "",
    n.error ? ` · ${n.error}` : "")));
  $("measure").replaceChildren(...measures.map((i) => el("option", {value: i}, result.columns[i])));
  const prefer = measures.find((i) => /avg|mean|median|share|trust|satisf/i.test(result.columns[i]));
  if (prefer !== undefined) $("measure").value = String(prefer);
  const numeric = result.columns.map((_, i) => measures.includes(i));
  const formats = result.formats || [];
  const uninformative = (r, i) => ((result.not_informative || [])[r] || []).includes(result.columns[i]);
  const rows = result.rows.map((row, r) => row.map((v, i) => {
    const ci = (result.ci95[r] || [])[i];
    const f = formats[i];
    const text = cellText(v, f);
    if (ci == null) return f ? el("span", {}, text) : v;
    const span = el("span", {}, text, el("span", {class: "pm"}, ` ± ${fmt(ci, f && f.decimals != null ? f.decimals : 3)}`));
    if (uninformative(r, i)) {
      span.append(el("span", {class: "uninformative", title: "The noise interval is wider than the measure's whole range: this value says nothing."}, " (not informative)"));
    }
    return span;
  }));
  // A row without every node's part says whose part it lacks.
  const headers = [...result.columns];
  if (result.incomplete_groups) {
    headers.push("missing parts");
    rows.forEach((row, r) => row.push(((result.missing_parts || [])[r] || []).join(", ")));
  }
  table($("rows"), headers, rows, numeric);
  for (const td of $("rows").querySelectorAll("tbody td")) {
    if (numeric[td.cellIndex]) td.classList.add("num");
  }
  const url = URL.createObjectURL(new Blob([toCsv(result)], {type: "text/csv"}));
  $("csv").href = url;
  const map = result.journey ? journeyMap(result) : null;
  $("journey").hidden = !map;
  $("journey-map").replaceChildren(...(map ? [map] : []));
  drawChart();
  $("result").hidden = false;
  $("status").textContent = `${result.rows.length} rows from ${result.nodes.length} nodes · privacy ${result.privacy}` +
    (result.suppressed_groups ? ` · ${result.suppressed_groups} groups withheld` : "") +
    (result.incomplete_cells ? ` · ${result.incomplete_cells} cells NULL: a node withheld its part (fewer than its k people there)` : "") +
    (result.incomplete_groups ? ` · ${result.incomplete_groups} rows without every node's part (see missing parts: that node has none of the group's rows, or fewer than its k)` : "") +
    ((result.not_informative || []).flat().length ? ` · ${(result.not_informative || []).flat().length} values not informative: the noise interval is wider than the measure's whole range (too few people for this ε)` : "") +
    ` · query ${result.query_id}` + (result.complete ? "" : " · PARTIAL: not every node contributed");
}

function explainText(e) {
  if (!e) return "";
  if (e.status === "refused") {
    return `REFUSED ${e.code} ${e.rule}` + (e.line ? ` at line ${e.line}, column ${e.column}` : "") + `\n${e.reason}`;
  }
  return `Accepted. Output columns: ${e.columns.join(", ")}\n\nValidated plan:\n${e.plan}\n\n` +
    `Partial plan each node runs:\n${e.partial_plan}\n\nMerge:\n${e.merge.map((m) => "  " + m).join("\n")}\n\n` +
    `Privacy:\n${e.privacy.map((m) => "  " + m).join("\n")}`;
}

function showRefusal(error, explain) {
  const box = $("refusal");
  box.replaceChildren(
    el("p", {}, el("span", {class: "code"}, error.code), ` ${error.kind}: ${error.message}`),
    ...[
      error.line ? el("p", {}, `At SQL line ${error.line}, column ${error.column}.`) : null,
      error.nodes && error.nodes.length ? el("ul", {class: "nodes"}, error.nodes.map((n) =>
        el("li", {class: n.status}, el("strong", {}, n.agency), ` ${n.status}`, n.error ? ` — ${n.error}` : ""))) : null,
      error.query_id ? el("p", {class: "muted"}, `query ${error.query_id}`) : null,
    ].filter(Boolean),
  );
  box.hidden = false;
  if (explain) {
    $("explain-out").textContent = explainText(explain);
    $("explain-box").hidden = false;
  }
}

async function runQuery() {
  const sql = $("sql").value.trim();
  if (!sql) { $("status").textContent = "Type a query first."; $("sql").focus(); return; }
  const eps = $("epsilon").value.trim();
  $("run").disabled = true;
  $("refusal").hidden = true; $("result").hidden = true; $("explain-box").hidden = true;
  $("status").textContent = "Running on every node…";
  const t = performance.now();
  try {
    // ε goes as typed: the console refuses what is not a number it can spend (Number() would
    // turn "abc" into NaN, which JSON sends as null — "the node's maximum").
    const r = await api("query", {sql, epsilon: eps || null, allow_partial: $("partial").checked});
    if (r.ok) {
      showResult(r.result);
      $("status").textContent += ` · ${Math.round(performance.now() - t)} ms`;
    } else {
      $("status").textContent = "Refused.";
      showRefusal(r.error, r.explain);
    }
  } catch (e) {
    $("status").textContent = "";
    showRefusal({code: "console", kind: "error", message: e.message}, null);
  } finally {
    $("run").disabled = false;
  }
}

async function runExplain() {
  $("status").textContent = "Explaining…";
  try {
    const e = await api("explain", {sql: $("sql").value});
    $("explain-out").textContent = explainText(e);
    $("explain-box").hidden = false;
    $("status").textContent = e.status === "refused" ? `Would be refused: ${e.code}` : "The query passes every rule.";
  } catch (e) {
    $("status").textContent = e.message;
  }
}

function columnNote(c) {
  const parts = [c.type];
  if (c.domain) parts.push(c.kind === "measure" ? `valid ${c.domain}` : c.domain);
  if (c.dp_bounds) parts.push(`privacy clamp ${fmt(c.dp_bounds[0])}..=${fmt(c.dp_bounds[1])}`);
  return parts.join(" · ");
}

function showSchema(schema) {
  $("schema").replaceChildren(el("p", {class: "muted"}, `schema version ${schema.version}. `,
    "Measures: the range a value must be in to be stored, and the privacy clamp — in dp mode each value is ",
    "clamped to it before it is summed, so a longer wait counts as the upper bound."),
    ...schema.tables.map((t) => el("div", {},
      el("h3", {}, t.name),
      el("ul", {}, t.columns.map((c) => el("li", {"data-column": `${t.name}.${c.name}`},
        el("code", {}, c.name), el("span", {class: "kind " + c.kind}, c.kind),
        el("div", {class: "muted"}, columnNote(c)))))))
  );
}

async function analyst(who) {
  $("analyst").hidden = false;
  const [examples, schema] = await Promise.all([api("examples"), api("node/0/schema").catch((e) => e)]);
  if (schema instanceof Error) $("schema").replaceChildren(el("p", {class: "bad"}, schema.message));
  else showSchema(schema);
  $("example").replaceChildren(el("option", {value: ""}, "— choose an example —"),
    ...examples.map((x, i) => el("option", {value: i}, x.title)));
  $("example").addEventListener("change", () => {
    const x = examples[Number($("example").value)];
    if (x) $("sql").value = x.sql;
  });
  $("run").addEventListener("click", runQuery);
  $("explain").addEventListener("click", runExplain);
  $("measure").addEventListener("change", drawChart);
  $("sql").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); runQuery(); }
  });
  if (hash.has("example")) {
    $("example").value = hash.get("example");
    $("example").dispatchEvent(new Event("change"));
  }
  if (hash.has("sql")) $("sql").value = hash.get("sql");
  if (hash.has("epsilon")) $("epsilon").value = hash.get("epsilon");
  // A link may fill the editor, but runs its query (and spends budget) only with this console's
  // run key, which only a page of this origin can read: a page of another localhost port can
  // navigate here with the session cookie, but cannot know it.
  if (hash.has("run")) {
    const session = await api("session").catch(() => null);
    if (session && session.run_key && hash.get("run") === session.run_key) {
      await runQuery();
    } else {
      $("status").textContent = "This link asked to run its query, but it does not carry this console's run key, " +
        "so nothing was run. Check the SQL, then press Run query.";
    }
  }
}

// ---------------------------------------------------------------- steward

async function stewardLoad() {
  const i = $("steward-node").value || "0";
  $("steward-status").textContent = "Loading…";
  const [schema, policy, budget, activity] = await Promise.all(
    ["schema", "policy", "budget", "activity?limit=100"].map((p) => api(`node/${i}/${p}`).catch((e) => e)));
  const problems = [schema, policy, budget, activity].filter((x) => x instanceof Error).map((e) => e.message);
  if (!(schema instanceof Error)) {
    table($("tables"), ["Table", "Rows", "Last ingest (UTC)"],
      schema.tables.map((t) => [t.name, t.rows ?? "—", t.last_ingest ? t.last_ingest.replace("T", " ").replace("Z", "") : "never"]),
      [false, true, false]);
  }
  if (!(policy instanceof Error)) {
    const p = policy, d = policy.privacy;
    const items = [
      ["Agency", p.agency],
      ["Analysts allowed from", p.allowed_agencies && p.allowed_agencies.length ? p.allowed_agencies.join(", ") : "every agency in the federation"],
      ["Hidden dimensions", p.hidden_dimensions.length ? p.hidden_dimensions.join(", ") : "none"],
      ["k (minimum people per group)", p.k],
      ["Maximum groups per query", p.max_groups],
      ["Rate limit", `${p.rate_limit_per_minute} queries per analyst per minute`],
      ["Query time limit", `${p.query_timeout_secs} s`],
      ["Query memory limit", `${p.memory_limit_mb} MiB`],
      ["Privacy mode", d.mode === "dp" ? "differential privacy" : "k-anonymity only"],
    ];
    if (d.mode === "dp") {
      items.push(["ε per query", d.epsilon_per_query], ["δ", d.delta],
        ["Budget per analyst", `ε ${d.budget_epsilon} per ${d.budget_period_days} days`],
        ["Contribution bounds", `${d.max_groups_per_person} groups, ${d.max_rows_per_person} rows per person per query`]);
    }
    $("policy").replaceChildren(...items.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, fmt(v))]));
  }
  if (!(budget instanceof Error)) {
    if (budget.mode !== "dp") {
      $("budget-chart").replaceChildren(el("p", {class: "muted"}, "This node runs k-only: no privacy budget is spent."));
    } else if (!budget.analysts.length) {
      $("budget-chart").replaceChildren(el("p", {class: "muted"}, "No analyst has spent budget in this period."));
    } else {
      const items = budget.analysts.flatMap((a) => {
        const name = a.analyst.split("/").slice(-3).join("/");
        return [{label: `${name} used`, value: a.used}, {label: `${name} left`, value: a.remaining, cls: "left"}];
      });
      $("budget-chart").replaceChildren(barChart(items, `ε used and left of ${budget.budget_epsilon} per ${budget.period_days} days`));
    }
    table($("budget"), ["Analyst", "Queries", "ε used", "ε left"],
      budget.analysts.map((a) => [a.analyst, a.queries, a.used, a.remaining]), [false, true, true, true]);
  }
  if (!(activity instanceof Error)) {
    table($("activity"), ["Seq", "Time (UTC)", "Endpoint", "Analyst", "Decision", "Code", "Groups out", "Withheld", "ε", "SQL"],
      activity.map((e) => [e.seq, e.time.replace("T", " ").replace("Z", ""), e.endpoint, e.analyst || e.peer,
        decisionCell(e.decision), e.code, e.groups_released, e.groups_withheld, e.epsilon_spent, e.sql || ""]),
      [true, false, false, false, false, false, true, true, true, false]);
    for (const td of $("activity").querySelectorAll("tbody td:last-child")) td.classList.add("sql");
  }
  $("steward-status").textContent = problems.length ? problems.join(" · ") :
    `Node ${i} · ${activity.length} recent requests`;
}

function decisionCell(d) {
  return el("span", {class: d === "executed" ? "good" : d === "refused" ? "bad" : null}, d || "—");
}

async function steward(who) {
  $("steward").hidden = false;
  $("steward-node").replaceChildren(...who.nodes.map((n, i) => el("option", {value: i}, n)));
  $("steward-node").addEventListener("change", stewardLoad);
  $("steward-refresh").addEventListener("click", stewardLoad);
  await stewardLoad();
}

// ---------------------------------------------------------------- auditor

let audit = null;

function options(select, values, all) {
  const keep = select.value;
  select.replaceChildren(el("option", {value: ""}, all), ...values.map((v) => el("option", {value: v}, v)));
  if (values.includes(keep)) select.value = keep;
}

/** A `datetime-local` value read as UTC (the fields say so), in ms; `end`: the last ms of the
 * minute (or second) it names. */
function utcMillis(v, end) {
  const m = /^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,3}))?)?$/.exec(v || "");
  if (!m) return null;
  const t = Date.UTC(+m[1], +m[2] - 1, +m[3], +m[4], +m[5], +(m[6] || 0), +((m[7] || "0").padEnd(3, "0")));
  if (!end) return t;
  return t + (m[7] ? 0 : m[6] ? 999 : 59999);
}

function drawLog() {
  if (!audit) return;
  const f = {node: $("f-node").value, analyst: $("f-analyst").value, decision: $("f-decision").value,
    from: utcMillis($("f-from").value, false), to: utcMillis($("f-to").value, true)};
  const rows = [];
  for (const n of audit.nodes) {
    if (!n.entries || (f.node && n.agency !== f.node)) continue;
    for (const e of n.entries) {
      const who = e.analyst || e.peer || "";
      const t = Date.parse(e.time || "");
      if (f.analyst && who !== f.analyst) continue;
      if (f.decision && (e.decision || e.kind) !== f.decision) continue;
      if (f.from !== null && !(t >= f.from)) continue;
      if (f.to !== null && !(t <= f.to)) continue;
      rows.push(e);
    }
  }
  rows.sort((a, b) => (b.time || "").localeCompare(a.time || "") || a.node.localeCompare(b.node));
  $("log-count").textContent = `${rows.length} ${rows.length === 1 ? "entry" : "entries"} shown`;
  table($("log"), ["Node", "Seq", "Time (UTC)", "Kind", "Endpoint", "Analyst / peer", "Decision", "Code", "Released", "Withheld", "ε", "SQL", "Query id"],
    rows.slice(0, 1000).map((e) => [e.node, e.seq, (e.time || "").replace("T", " ").replace("Z", ""), e.kind, e.endpoint || "",
      e.analyst || e.peer || "", decisionCell(e.decision), e.code, e.groups_released, e.groups_withheld, e.epsilon_spent,
      e.sql || "", e.query_id ? e.query_id.slice(0, 12) : null]),
    [false, true, false, false, false, false, false, false, true, true, true, false, false]);
  for (const td of $("log").querySelectorAll("tbody td:nth-child(12)")) td.classList.add("sql");
}

async function auditLoad() {
  $("audit-refresh").disabled = true;
  $("audit-status").textContent = "Fetching every node's log and verifying it…";
  try {
    audit = await api("audit");
  } catch (e) {
    $("audit-status").textContent = e.message;
    $("audit-refresh").disabled = false;
    return;
  }
  $("checks").replaceChildren(...audit.nodes.map((n) => {
    if (n.error) return el("li", {class: "error"}, el("strong", {}, n.url), ` could not be read: ${n.error}`);
    const c = n.check;
    const text = c.status === "clean"
      ? `chain verified: seq ${c.first_seq}–${c.last_seq}, ${c.checkpoints} signed checkpoints, ${c.signatures_checked} analyst signatures re-checked`
      : c.status === "tampered" ? `TAMPERED: first bad entry seq ${c.seq}: ${c.message}`
      : c.status === "wrong-node" ? `WRONG NODE: ${c.message}` : c.message;
    return el("li", {class: c.status}, el("strong", {}, n.agency), ` ${text} (${fmt(n.total)} entries)`);
  }));
  const r = audit.reconciliation;
  $("reconciliation").replaceChildren(
    el("p", {class: r.mismatches.length ? "bad" : "good"},
      `${r.nodes.length} nodes (${r.nodes.join(", ")}), ${r.queries} coordinated queries, ${r.matched} node answers matched, ${r.mismatches.length} mismatches`),
    ...(r.mismatches.length ? [el("ul", {}, r.mismatches.map((m) => el("li", {}, m)))] : []));
  const entries = audit.nodes.flatMap((n) => n.entries || []);
  options($("f-node"), audit.nodes.filter((n) => n.agency).map((n) => n.agency), "all nodes");
  options($("f-analyst"), [...new Set(entries.map((e) => e.analyst || e.peer).filter(Boolean))].sort(), "everyone");
  options($("f-decision"), [...new Set(entries.map((e) => e.decision || e.kind).filter(Boolean))].sort(), "any");
  for (const k of ["node", "analyst", "decision", "from", "to"]) {
    if (hash.has(k)) $("f-" + k).value = hash.get(k);
  }
  drawLog();
  $("audit-status").textContent = `Fetched ${audit.nodes.length} logs.`;
  $("audit-refresh").disabled = false;
}

async function auditor() {
  $("auditor").hidden = false;
  $("filters").addEventListener("input", drawLog);
  $("filters").addEventListener("submit", (e) => e.preventDefault());
  $("audit-refresh").addEventListener("click", auditLoad);
  await auditLoad();
}

// ---------------------------------------------------------------- start

async function start() {
  let who;
  try {
    who = await api("whoami");
  } catch (e) {
    $("who").textContent = "";
    $("fatal").textContent = `The console could not start: ${e.message}`;
    $("fatal").hidden = false;
    return;
  }
  const titles = {analyst: "Analyst", steward: "Data steward", auditor: "Auditor"};
  $("role-title").textContent = "· " + (titles[who.role] || who.role);
  document.title = `cxfed · ${titles[who.role] || who.role} · ${who.agency}`;
  $("who").textContent = `${who.identity} · nodes: ${who.nodes.join(", ")}`;
  try {
    if (who.role === "analyst") await analyst(who);
    else if (who.role === "steward") await steward(who);
    else if (who.role === "auditor") await auditor(who);
  } finally {
    document.body.dataset.ready = "true";
  }
}

start();
