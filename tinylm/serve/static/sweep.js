// tinylm sweep page: each hyper-parameter against the trials' best bits/byte (SVG scatter), and
// the trial table sorted best first. Polls /api/sweep (summary.json, rewritten after each trial).
"use strict";

const params = new URLSearchParams(location.search);
const POLL_MS = Number(params.get("poll")) || 5000;
let apiKey = params.get("key") || localStorage.getItem("tinylm-api-key") || "";
const SVG = "http://www.w3.org/2000/svg";
const W = 320, H = 220, PAD = { l: 52, r: 12, t: 22, b: 34 };
let latest = null;

function $(id) { return document.getElementById(id); }

async function fetchSweep() {
  const headers = apiKey ? { Authorization: "Bearer " + apiKey } : {};
  const response = await fetch("/api/sweep", { headers });
  if (response.status === 401) { $("key-box").hidden = false; throw new Error("API key required"); }
  const body = await response.json();
  if (!response.ok) throw new Error((body.error && body.error.message) || response.statusText);
  return body;
}

function score(t) { return t.best_bits_per_byte ?? t.best_val_loss; }

function el(name, attrs, parent) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (parent) parent.appendChild(node);
  return node;
}

// Points of one axis: [x position in 0..1, y score, trial] plus tick labels.
function axisPoints(axis, trials) {
  const shown = trials.filter((t) => score(t) !== null && t.params[axis.key] !== undefined);
  const numeric = shown.every((t) => Number.isFinite(Number(t.params[axis.key])));
  if (numeric && (axis.kind === "float" || axis.kind === "int") && shown.length > 0) {
    const f = (v) => (axis.log ? Math.log10(Number(v)) : Number(v));
    const xs = shown.map((t) => f(t.params[axis.key]));
    const lo = Math.min(...xs), hi = Math.max(...xs), span = hi - lo || 1;
    const ticks = [lo, hi].map((v) => [(v - lo) / span, axis.log ? Number(10 ** v).toPrecision(2) : Number(v.toPrecision(3)).toString()]);
    return { points: shown.map((t, i) => [(xs[i] - lo) / span, score(t), t]), ticks };
  }
  const values = [...new Set(shown.map((t) => t.params[axis.key]))];
  if (numeric) values.sort((a, b) => Number(a) - Number(b));
  const pos = (v) => (values.length === 1 ? 0.5 : values.indexOf(v) / (values.length - 1));
  return { points: shown.map((t) => [pos(t.params[axis.key]), score(t), t]), ticks: values.map((v) => [pos(v), v]) };
}

function drawChart(axis, trials, best) {
  const svg = el("svg", { width: W, height: H, class: "sweep-chart", "data-axis": axis.key });
  const { points, ticks } = axisPoints(axis, trials);
  const ys = points.map((p) => p[1]);
  const ylo = Math.min(...ys), yhi = Math.max(...ys), yspan = yhi - ylo || 1;
  const px = (x) => PAD.l + x * (W - PAD.l - PAD.r);
  const py = (y) => H - PAD.b - ((y - ylo) / yspan) * (H - PAD.t - PAD.b);
  el("line", { x1: PAD.l, y1: H - PAD.b, x2: W - PAD.r, y2: H - PAD.b, class: "axis" }, svg);
  el("line", { x1: PAD.l, y1: PAD.t, x2: PAD.l, y2: H - PAD.b, class: "axis" }, svg);
  el("text", { x: W / 2, y: 14, "text-anchor": "middle" }, svg).textContent = axis.key + (axis.log ? " (log)" : "");
  for (const [x, label] of ticks) el("text", { x: px(x), y: H - PAD.b + 14, "text-anchor": "middle" }, svg).textContent = label;
  if (points.length) {
    for (const y of [ylo, yhi]) el("text", { x: PAD.l - 4, y: py(y) + 4, "text-anchor": "end" }, svg).textContent = y.toFixed(3);
  }
  el("text", { x: 12, y: H / 2, transform: `rotate(-90 12 ${H / 2})`, "text-anchor": "middle" }, svg).textContent = "best bits/byte";
  for (const [x, y, t] of points) {
    const c = el("circle", { cx: px(x), cy: py(y), r: 5, class: t.status + (t === best ? " best" : ""), "data-trial": t.trial }, svg);
    el("title", {}, c).textContent = `trial ${t.trial} (${t.name}): ${y.toFixed(4)}, ${t.status}`;
  }
  return svg;
}

function render(data) {
  latest = data;
  $("sweep-name").textContent = data.sweep;
  const counts = {};
  for (const t of data.trials) counts[t.status] = (counts[t.status] || 0) + 1;
  $("sweep-info").textContent = `${data.trials.length} trials (${Object.entries(counts).map(([k, v]) => `${v} ${k}`).join(", ")}); ${data.sampler || "?"} sampler, ${data.pruner || "?"} pruner`;
  const scored = data.trials.filter((t) => score(t) !== null);
  const best = scored.filter((t) => t.status === "finished").sort((a, b) => score(a) - score(b))[0] || null;
  const charts = $("sweep-charts");
  charts.replaceChildren(...data.axes.map((axis) => drawChart(axis, data.trials, best)));
  const keys = data.axes.map((a) => a.key);
  const head = $("trials-table").tHead.rows[0];
  head.replaceChildren(...["#", "trial", "run", ...keys.map((k) => k.split(".").pop()), "status", "steps", "best val loss", "best bits/byte"].map((text) => {
    const th = document.createElement("th"); th.textContent = text; return th;
  }));
  const body = $("trials-table").tBodies[0];
  body.replaceChildren(...data.trials.map((t, i) => {
    const tr = document.createElement("tr");
    tr.dataset.trial = t.trial;
    if (t === best) tr.className = "best";
    const cells = [i + 1, t.trial, t.name, ...keys.map((k) => t.params[k] ?? ""), t.status, t.steps,
      t.best_val_loss === null ? "-" : t.best_val_loss.toFixed(4), t.best_bits_per_byte === null ? "-" : t.best_bits_per_byte.toFixed(4)];
    cells.forEach((text, j) => {
      const td = document.createElement("td");
      td.textContent = String(text);
      if (j === keys.length + 3) td.className = "status-" + t.status;
      tr.appendChild(td);
    });
    return tr;
  }));
  $("no-trials").hidden = scored.length > 0;
}

async function poll() {
  try {
    render(await fetchSweep());
    $("conn").textContent = "";
  } catch (e) {
    $("conn").textContent = e.message;
  }
  setTimeout(poll, POLL_MS);
}

$("key-save").addEventListener("click", () => {
  apiKey = $("api-key").value;
  localStorage.setItem("tinylm-api-key", apiKey);
  $("key-box").hidden = true;
});

// For tests: what each chart draws, as [trial, x pixel, y pixel] per point.
window.tinylmSweep = {
  latest: () => latest,
  points: (key) => [...document.querySelectorAll(`svg[data-axis="${key}"] circle`)].map((c) => [Number(c.dataset.trial), Number(c.getAttribute("cx")), Number(c.getAttribute("cy"))]),
};
poll();
