// tinylm page: runs dashboard (live curves from metrics.jsonl, read incrementally) and playground.
// Plain JS, no build step; charts by uPlot (vendored under /static/vendor/uplot, MIT).
"use strict";

const params = new URLSearchParams(location.search);
const POLL_MS = Number(params.get("poll")) || 3000; // ?poll=500 for a faster page (tests)
// Ten colours that stay apart (Tableau 10): with the probe in colorFor, up to ten runs on screen
// never share one.
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2",
                "#bcbd22", "#7f7f7f"];
const LN2 = Math.log(2);
const MAX_SELECTED = 8; // runs drawn by default: more lines than colours stop being readable

let apiKey = params.get("key") || localStorage.getItem("tinylm-api-key") || "";
const runs = new Map(); // name -> {row, train: [], evals: [], offset, file, selected, color}
let chart = null;
let chartKey = "";
let yUnitChosen = null; // "nats" | "bpb" once the user picks one; until then chosen per runs
let phaseMarks = []; // curriculum phase boundaries on the chart: {run, phase, x, color, px}

// A run's colour depends on its name (and is remembered in this browser), never on the order
// in which runs appear: a new run does not repaint the others. Two names that hash alike get
// the next free colour.
function colorFor(name) {
  let saved = {};
  try { saved = JSON.parse(localStorage.getItem("tinylm-run-colors") || "{}"); } catch (e) { saved = {}; }
  const taken = new Set([...runs.values()].map((r) => r.color));
  // A colour remembered from another runs directory may be in use here: then probe anew.
  if (saved[name] && !taken.has(saved[name])) return saved[name];
  let hash = 0;
  for (const ch of name) hash = (hash * 31 + ch.codePointAt(0)) >>> 0;
  let i = hash % COLORS.length;
  for (let k = 0; k < COLORS.length && taken.has(COLORS[i]); k++) i = (i + 1) % COLORS.length;
  saved[name] = COLORS[i];
  try { localStorage.setItem("tinylm-run-colors", JSON.stringify(saved)); } catch (e) { /* private mode */ }
  return COLORS[i];
}

// Loss per token cannot be compared across tokenizers; bits per byte can. The default unit is
// bits/byte when the selected runs use different tokenizers, until the user picks one.
function yUnit() {
  if (yUnitChosen) return yUnitChosen;
  const tokenizers = new Set([...runs.values()].filter((r) => r.selected && r.row).map((r) => r.row.tokenizer));
  return tokenizers.size > 1 ? "bpb" : "nats";
}

function $(id) { return document.getElementById(id); }

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (apiKey) headers.Authorization = "Bearer " + apiKey;
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (response.status === 401) {
    $("key-box").hidden = false;
    throw new Error("API key required");
  }
  return response;
}

async function apiJSON(path, options) {
  const response = await api(path, options);
  const body = await response.json();
  if (!response.ok) throw new Error((body.error && body.error.message) || response.statusText);
  return body;
}

function fmt(value, digits = 4) {
  return value === null || value === undefined ? "-" : Number(value).toFixed(digits);
}

// A run's curriculum (data.phases, from /api/runs): "2/3 · steps 41–80 · play 20% zoo 80%" and,
// as the cell's tooltip, every phase on its own line.
function pct(share) { return `${+(share * 100).toFixed(1)}%`; }

function phaseLine(p) {
  const mix = Object.entries(p.weights).filter(([, w]) => w > 0).map(([n, w]) => `${n} ${pct(w)}`).join(" ");
  return `steps ${p.first}–${p.last} · ${mix}`;
}

function phaseCell(c) {
  if (!c) return "-";
  const p = c.phases[c.current - 1];
  const all = c.phases.map((q) => `phase ${q.index}: ${phaseLine(q)}`).join("\n");
  return `<span class="phase" title="${escapeHTML(all)}">${c.current}/${c.count} · ${escapeHTML(phaseLine(p))}</span>`;
}

function human(n) {
  for (const [unit, size] of [["B", 1e9], ["M", 1e6], ["K", 1e3]]) {
    if (n >= size) return (n / size).toFixed(1) + unit;
  }
  return String(n);
}

// ------------------------------------------------------------------------------------------
// Runs table and metrics
// ------------------------------------------------------------------------------------------

async function refreshRuns() {
  const body = await apiJSON("/api/runs");
  let index = runs.size;
  for (const row of body.runs) {
    let run = runs.get(row.name);
    if (!run) {
      run = { train: [], evals: [], offset: 0, file: "", selected: index < MAX_SELECTED,
              color: colorFor(row.name) };
      runs.set(row.name, run);
      index++;
    }
    run.row = row;
  }
  renderTable();
  for (const el of document.querySelectorAll("input[name=yunit]")) el.checked = el.value === yUnit();
}

function renderTable() {
  const tbody = $("runs-table").querySelector("tbody");
  tbody.textContent = "";
  $("no-runs").hidden = runs.size > 0;
  for (const [name, run] of runs) {
    const r = run.row;
    const tr = document.createElement("tr");
    tr.dataset.run = name;
    const box = document.createElement("input");
    box.type = "checkbox";
    box.checked = run.selected;
    box.addEventListener("change", () => { run.selected = box.checked; drawChart(); refreshSamples(); });
    const cells = [
      null,
      `<span class="swatch" style="background:${run.color}"></span>${escapeHTML(name)}`,
      `<span class="status-${r.status}">${r.status}</span>`,
      r.max_steps ? `${r.step}/${r.max_steps}` : String(r.step),
      phaseCell(r.curriculum),
      human(r.tokens),
      fmt(r.best_val_loss),
      fmt(r.best_bits_per_byte),
      fmt(r.last_train_loss),
      r.last_checkpoint || "-",
    ];
    cells.forEach((html, i) => {
      const td = document.createElement("td");
      if (i === 0) td.appendChild(box); else td.innerHTML = html;
      if (i === 2) td.className = "status";
      if (i === 4) td.className = "phase-cell";
      tr.appendChild(td);
    });
    tbody.appendChild(tr);
  }
}

function escapeHTML(text) {
  const div = document.createElement("div");
  div.textContent = text;
  return div.innerHTML;
}

async function pollMetrics(name, run) {
  // Read the run's metrics.jsonl from where we stopped; the server sends only complete lines.
  for (let guard = 0; guard < 50; guard++) {
    const q = `offset=${run.offset}&file=${encodeURIComponent(run.file)}`;
    const body = await apiJSON(`/api/runs/${encodeURIComponent(name)}/metrics?${q}`);
    if (body.reset) { run.train = []; run.evals = []; }
    for (const r of body.records) (r.kind === "train" ? run.train : run.evals).push(r);
    const more = body.offset > run.offset && body.records.length > 0 && body.offset - run.offset >= (4 << 20) - 4096;
    run.offset = body.offset;
    run.file = body.file;
    if (!more) break;
  }
}

async function refreshSamples() {
  const box = $("samples");
  const parts = [];
  let count = 0;
  for (const [name, run] of runs) {
    if (!run.selected) continue;
    const body = await apiJSON(`/api/runs/${encodeURIComponent(name)}/samples?limit=2`);
    for (const s of body.samples) {
      count++;
      parts.push(`<div class="sample"><b style="color:${run.color}">${escapeHTML(name)}</b> step ${s.step} ${escapeHTML(s.tag || "")}\n${escapeHTML(s.text)}</div>`);
    }
  }
  box.innerHTML = parts.join("") || "<p>No samples yet.</p>";
  $("samples-count").textContent = `(${count})`;
}

// ------------------------------------------------------------------------------------------
// The chart: train (solid) and val (dashed, points) loss of the selected runs, overlaid
// ------------------------------------------------------------------------------------------

function xMode() { return document.querySelector("input[name=xaxis]:checked").value; }

function bitsPerNat(run) {
  // bits/byte per nat/token of this run's data, from its latest evaluation with both figures
  // (val/bits_per_byte = val/loss / ln 2 / bytes per token): converts its train loss too.
  for (let i = run.evals.length - 1; i >= 0; i--) {
    const e = run.evals[i], bpb = Number(e["val/bits_per_byte"]), nats = Number(e["val/loss"]);
    if (Number.isFinite(bpb) && Number.isFinite(nats) && nats > 0 && e["val/bits_per_byte"] !== null) return bpb / nats;
  }
  return null;
}

function curves() {
  // One [xs, ys] table per series; uPlot.join aligns them on the union of the x values.
  const mode = xMode();
  const bpb = yUnit() === "bpb";
  const logX = $("xlog").checked;
  const tables = [];
  const series = [];
  const marks = [];
  for (const [name, run] of runs) {
    if (!run.selected) continue;
    const last = run.train[run.train.length - 1];
    const perStep = last && last.step ? last.tokens / last.step : 0;
    const x = (r, isEval) => (mode === "step" ? r.step : isEval ? r.step * perStep : r.tokens);
    // Where each next phase starts: after the last step of the one before (serve/phases.py).
    const c = run.row && run.row.curriculum;
    for (const p of c ? c.phases.slice(0, -1) : []) {
      const xv = mode === "step" ? p.last : p.last * perStep;
      if (Number.isFinite(xv) && xv > 0) marks.push({ run: name, phase: p.index + 1, x: xv, color: run.color });
    }
    const scale = bpb ? bitsPerNat(run) : 1;
    for (const [kind, records, key] of [["train", run.train, "loss"], ["val", run.evals, "val/loss"]]) {
      const y = (r) => (!bpb ? Number(r[key]) : kind === "val" ? Number(r["val/bits_per_byte"] ?? NaN)
        : scale === null ? NaN : Number(r[key]) * scale);
      const pts = records
        .map((r) => [x(r, kind === "val"), y(r)])
        .filter(([xv, yv]) => Number.isFinite(xv) && Number.isFinite(yv) && yv > 0 && (!logX || xv > 0));
      pts.sort((a, b) => a[0] - b[0]);
      tables.push([pts.map((p) => p[0]), pts.map((p) => p[1])]);
      series.push({
        label: `${name} ${kind}`, run: name, kind, stroke: run.color, width: kind === "train" ? 1.5 : 2,
        dash: kind === "val" ? [6, 4] : undefined, points: { show: kind === "val", size: 5 }, spanGaps: true,
      });
    }
  }
  return { tables, series, marks };
}

// uPlot draw hook: a dashed vertical line in the run's colour at each phase boundary, labelled
// with the phase that starts there. Marks outside the plotted x range are skipped.
function drawPhaseMarks(u) {
  const ctx = u.ctx;
  const { left, top, width, height } = u.bbox;
  ctx.save();
  ctx.setLineDash([3, 3]);
  ctx.lineWidth = 1;
  ctx.font = `${Math.round(11 * devicePixelRatio)}px system-ui, sans-serif`;
  for (const m of phaseMarks) {
    m.px = null;
    const px = u.valToPos(m.x, "x", true);
    if (!Number.isFinite(px) || px < left || px > left + width) continue;
    m.px = px;
    ctx.strokeStyle = m.color;
    ctx.fillStyle = m.color;
    ctx.beginPath();
    ctx.moveTo(px, top);
    ctx.lineTo(px, top + height);
    ctx.stroke();
    ctx.fillText(`phase ${m.phase}`, px + 3 * devicePixelRatio, top + 12 * devicePixelRatio);
  }
  ctx.restore();
}

function drawChart() {
  const { tables, series, marks } = curves();
  phaseMarks = marks;
  const box = $("chart");
  const unit = yUnit();
  const key = [xMode(), unit, $("xlog").checked, $("ylog").checked, ...series.map((s) => s.label)].join("|");
  const data = tables.length ? uPlot.join(tables) : [[]];
  if (chart && key === chartKey) {
    chart.setData(data);
    return;
  }
  if (chart) chart.destroy();
  chartKey = key;
  const opts = {
    width: Math.max(400, box.clientWidth || 900),
    height: 380,
    scales: {
      x: { time: false, distr: $("xlog").checked ? 3 : 1 },
      y: { distr: $("ylog").checked ? 3 : 1 },
    },
    axes: [{ label: xMode() === "step" ? "step" : "tokens" },
           { label: unit === "bpb" ? "bits/byte" : "loss (nats/token)" }],
    series: [{ label: xMode() }, ...series],
    hooks: { draw: [drawPhaseMarks] },
  };
  chart = new uPlot(opts, data, box);
}

// For tests and the curious: the chart's data points per run and kind.
window.tinylmDashboard = {
  chart: () => chart,
  yUnit,
  // Phase boundaries drawn on the chart: [{run, phase, x, drawn}] (drawn: inside the plot).
  phaseMarks() { return phaseMarks.map((m) => ({ run: m.run, phase: m.phase, x: m.x, drawn: m.px !== null && m.px !== undefined })); },
  colors() { return Object.fromEntries([...runs].map(([n, r]) => [n, r.color])); },
  points(run, kind) {
    if (!chart) return [];
    const i = chart.series.findIndex((s) => s.run === run && s.kind === kind);
    if (i < 0) return [];
    const xs = chart.data[0], ys = chart.data[i];
    const out = [];
    for (let j = 0; j < xs.length; j++) if (ys[j] !== null && ys[j] !== undefined) out.push([xs[j], ys[j]]);
    return out;
  },
};

async function tick() {
  try {
    await refreshRuns();
    await Promise.all([...runs].filter(([, r]) => r.selected).map(([n, r]) => pollMetrics(n, r)));
    drawChart();
    await refreshSamples();
    $("conn").textContent = "";
  } catch (e) {
    $("conn").textContent = "⚠ " + e.message;
  }
}

async function loop() {
  await tick();
  setTimeout(loop, POLL_MS);
}

// ------------------------------------------------------------------------------------------
// Playground: stream a completion (server-sent events over fetch, so the key header is sent)
// ------------------------------------------------------------------------------------------

let controller = null;

async function loadModels() {
  const body = await apiJSON("/v1/models");
  const select = $("pg-model");
  const current = select.value;
  select.textContent = "";
  for (const m of body.data) {
    const option = document.createElement("option");
    option.value = m.id;
    option.textContent = m.id.includes("/") ? m.id : `${m.id} (newest: ${m.checkpoint})`;
    select.appendChild(option);
  }
  if (current) select.value = current;
}

function numberField(id) {
  const value = $(id).value;
  return value === "" ? null : Number(value);
}

async function generate() {
  const out = $("pg-output");
  const status = $("pg-status");
  const prompt = $("pg-prompt").value;
  out.textContent = "";
  const shown = document.createElement("span");
  shown.className = "prompt";
  shown.textContent = prompt;
  const text = document.createElement("span");
  text.id = "pg-text";
  out.append(shown, text);
  status.className = "";
  status.textContent = "generating…";
  const body = {
    model: $("pg-model").value, prompt, stream: true,
    temperature: numberField("pg-temperature"), top_k: numberField("pg-top-k"),
    top_p: numberField("pg-top-p"), max_tokens: numberField("pg-max-tokens"),
    stream_options: { include_usage: true },
  };
  const seed = numberField("pg-seed");
  if (seed !== null) body.seed = seed;
  controller = new AbortController();
  $("pg-go").disabled = true;
  $("pg-stop").disabled = false;
  let finish = null, usage = null;
  try {
    const response = await api("/v1/completions", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) {
      const err = await response.json();
      throw new Error((err.error && err.error.message) || response.statusText);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const payload = event.slice(6);
        if (payload === "[DONE]") continue;
        const chunk = JSON.parse(payload);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        for (const c of chunk.choices || []) {
          text.textContent += c.text;
          if (c.finish_reason) finish = c.finish_reason;
        }
      }
    }
    status.textContent = `done (${finish || "?"}${usage ? `, ${usage.completion_tokens} tokens` : ""})`;
  } catch (e) {
    if (e.name === "AbortError") status.textContent = "stopped";
    else { status.className = "error"; status.textContent = e.message; }
  } finally {
    controller = null;
    $("pg-go").disabled = false;
    $("pg-stop").disabled = true;
  }
}

async function reloadModel() {
  const id = $("pg-model").value.split("/")[0];
  try {
    const body = await apiJSON("/api/reload", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ model: id }),
    });
    $("pg-status").textContent = `serving ${body.model} at ${body.checkpoint}`;
    await loadModels();
  } catch (e) {
    $("pg-status").className = "error";
    $("pg-status").textContent = e.message;
  }
}

function init() {
  $("api-key").value = apiKey;
  $("key-save").addEventListener("click", () => {
    apiKey = $("api-key").value;
    localStorage.setItem("tinylm-api-key", apiKey);
    $("key-box").hidden = true;
    loadModels().catch(() => {});
    tick();
  });
  for (const el of document.querySelectorAll("input[name=xaxis], #xlog, #ylog")) {
    el.addEventListener("change", drawChart);
  }
  for (const el of document.querySelectorAll("input[name=yunit]")) {
    el.addEventListener("change", () => { yUnitChosen = el.value; drawChart(); });
  }
  $("pg-go").addEventListener("click", generate);
  $("pg-stop").addEventListener("click", () => controller && controller.abort());
  $("pg-reload").addEventListener("click", reloadModel);
  $("pg-model").addEventListener("focus", () => loadModels().catch(() => {}));
  loadModels().catch((e) => { $("pg-status").textContent = e.message; });
  loop();
}

init();
