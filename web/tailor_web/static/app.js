// The Tailor dashboard: talks only to this server's HTTP/JSON API (/api/v1), with the token in a header.
"use strict";

const TOKEN_KEY = "tailor-token"; // sessionStorage: this tab only, gone when it closes
const THEME_KEY = "tailor-theme"; // a display preference, not a secret
const THEMES = ["system", "light", "dark"];
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem(TOKEN_KEY) || "";
let watching = null; // the AbortController of the open watch stream
let chart = null;
let comparison = null; // {summary, sortKey, ascending, selected}

// --- talking to the API -----------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}), Authorization: `Bearer ${token}` };
  if (options.json !== undefined) headers["Content-Type"] = "application/json";
  const reply = await fetch(path, {
    method: options.method || "GET",
    headers,
    body: options.json !== undefined ? JSON.stringify(options.json) : undefined,
    signal: options.signal,
  });
  if (!reply.ok) throw await errorOf(reply);
  return options.raw ? reply : reply.json();
}

async function errorOf(reply) {
  try {
    const body = await reply.json();
    return new ApiError(reply.status, body.error.code, body.error.message);
  } catch {
    return new ApiError(reply.status, "UNKNOWN", `the server answered ${reply.status}`);
  }
}

// What a person should read for a refusal: the gateway's words, with what to do for the usual ones.
function explain(error) {
  if (!(error instanceof ApiError)) return `Could not reach the Tailor server: ${error.message}`;
  const said = `${error.message} (${error.code})`;
  if (error.code === "UNAUTHENTICATED") return `The gateway did not accept this token: ${said}. Check it and sign in again.`;
  if (error.code === "PERMISSION_DENIED") return `This token may not do that: ${said}.`;
  if (error.code === "NOT_FOUND") return `Not found in your project: ${said}.`;
  if (error.code === "RESOURCE_EXHAUSTED") return `Too many requests or too large: ${said}.`;
  if (error.code === "UNAVAILABLE") return `The gateway is not answering: ${said}.`;
  return said;
}

// Server-Sent Events over fetch (EventSource cannot send an Authorization header).
async function watchPipeline(id, onPipeline, signal) {
  const reply = await api(`/api/v1/pipelines/${encodeURIComponent(id)}/events`, { raw: true, signal });
  const reader = reply.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (event === "pipeline") onPipeline(JSON.parse(data.join("\n")));
      else if (event === "error") {
        const body = JSON.parse(data.join("\n"));
        throw new ApiError(0, body.error.code, body.error.message);
      } else if (event === "end") return;
    }
  }
}

async function downloadArchive(artifactId, name) {
  const reply = await api(`/api/v1/artifacts/${artifactId}/archive`, { raw: true });
  const url = URL.createObjectURL(await reply.blob());
  const link = document.createElement("a");
  link.href = url;
  link.download = `${name || artifactId.slice(0, 12)}.tar`;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

// --- small helpers ----------------------------------------------------------------------------
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key in node) node[key] = value;
    else node.setAttribute(key, value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

const lower = (state, prefix) => (state || "").replace(prefix, "").toLowerCase();
const pipelineState = (p) => lower(p.state, "PIPELINE_STATE_");
const stageState = (s) => lower(s.state, "OPERATION_STATE_");
const when = (iso) => (iso ? new Date(iso).toLocaleString() : "");
function size(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  const units = ["KiB", "MiB", "GiB", "TiB"];
  let value = bytes / 1024;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(1)} ${units[unit]}`;
}
function figure(value) {
  if (typeof value !== "number") return value === undefined || value === null ? "" : String(value);
  return Math.abs(value) >= 100 ? value.toFixed(1) : Number(value.toPrecision(4)).toString();
}

function say(text) {
  $("status").textContent = text;
}
function alertUser(text) {
  const box = $("alert");
  box.textContent = text;
  box.hidden = !text;
}

// An upload with progress: XMLHttpRequest, because fetch reports no upload progress. Each file's name in
// the form is its path inside the artifact (a folder's files relative to the folder, as the CLI sends).
function uploadFiles(files, { kind, format, name }, onProgress) {
  const form = new FormData();
  for (const file of files) {
    const path = file.webkitRelativePath ? file.webkitRelativePath.split("/").slice(1).join("/") : file.name;
    form.append("file", file, path);
  }
  const query = new URLSearchParams({ kind, format, name });
  return new Promise((resolve, reject) => {
    const request = new XMLHttpRequest();
    request.open("POST", `/api/v1/artifacts?${query}`);
    request.setRequestHeader("Authorization", `Bearer ${token}`);
    request.upload.onprogress = (e) => e.lengthComputable && onProgress(e.loaded, e.total);
    request.onerror = () => reject(new Error("the upload was cut off"));
    request.onload = () => {
      let body = {};
      try {
        body = JSON.parse(request.responseText);
      } catch {}
      if (request.status === 200) resolve(body);
      else reject(new ApiError(request.status, body.error?.code || "UNKNOWN", body.error?.message || `the server answered ${request.status}`));
    };
    request.send(form);
  });
}

async function submitUpload(event) {
  event.preventDefault();
  const folder = [...$("upload-folder").files];
  const files = folder.length ? folder : [...$("upload-files").files];
  const said = $("upload-said");
  if (!files.length) {
    said.textContent = "Choose files or a folder first.";
    return;
  }
  const name = $("upload-name").value.trim() || (folder.length ? folder[0].webkitRelativePath.split("/")[0] : files[0].name);
  const bar = $("upload-progress");
  bar.hidden = false;
  bar.value = 0;
  said.textContent = `Uploading ${files.length} file(s)…`;
  try {
    const reply = await uploadFiles(files, { kind: $("upload-kind").value, format: $("upload-format").value.trim(), name }, (done, total) => {
      bar.value = Math.round((100 * done) / total);
    });
    bar.value = 100;
    said.textContent = `Uploaded ${name}: artifact ${reply.artifact.id}`;
    $("upload-form").reset();
    await openHome();
  } catch (error) {
    said.textContent = "";
    alertUser(`The upload was refused: ${explain(error)}`);
  }
}

// A spec as YAML: the gateway's whole check (validate) or a submission; its refusal is shown as it is.
async function sendSpec(validateOnly) {
  const said = $("spec-said");
  const spec_yaml = $("spec-yaml").value;
  if (!spec_yaml.trim()) {
    said.textContent = "Write a spec first.";
    return;
  }
  alertUser("");
  said.textContent = validateOnly ? "Checking…" : "Submitting…";
  try {
    const reply = validateOnly
      ? await api("/api/v1/pipelines:validate", { method: "POST", json: { spec_yaml } })
      : await api("/api/v1/pipelines", { method: "POST", json: { spec_yaml, idempotency_key: randomKey() } });
    if (validateOnly) said.textContent = `Valid: it would run ${reply.stages.map((s) => s.name).join(", ")}.`;
    else location.hash = `#/pipelines/${reply.id}`;
  } catch (error) {
    said.textContent = "";
    alertUser(`The spec was refused: ${explain(error)}`);
  }
}

function randomKey() {
  // getRandomValues works on plain http too (randomUUID needs a secure context).
  return [...crypto.getRandomValues(new Uint8Array(16))].map((b) => b.toString(16).padStart(2, "0")).join("");
}

// --- views ------------------------------------------------------------------------------------
function show(view) {
  for (const name of ["sign-in", "home", "pipeline"]) $(`view-${name}`).hidden = name !== view;
  $("sign-out").hidden = view === "sign-in";
  $("nav-home").hidden = view !== "pipeline";
}

async function route() {
  if (watching) watching.abort();
  watching = null;
  alertUser("");
  if (!token) {
    show("sign-in");
    $("token").focus();
    return;
  }
  const match = location.hash.match(/^#\/pipelines\/([\w-]+)$/);
  try {
    if (match) await openPipeline(match[1]);
    else await openHome();
  } catch (error) {
    if (error.name === "AbortError") return;
    if (error.code === "UNAUTHENTICATED") signOut(explain(error));
    else alertUser(explain(error));
  }
}

function signOut(why = "") {
  token = "";
  sessionStorage.removeItem(TOKEN_KEY);
  show("sign-in");
  alertUser(why);
  say(why ? "" : "Signed out.");
  $("token").focus();
}

async function signIn(event) {
  event.preventDefault();
  const given = $("token").value.trim();
  $("token").value = "";
  token = given;
  say("Signing in…");
  try {
    await api("/api/v1/pipelines?page_size=1"); // the gateway decides whether the token is good
  } catch (error) {
    token = "";
    say("");
    alertUser(explain(error));
    $("token").focus();
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  say("Signed in.");
  await route();
}

async function openHome() {
  show("home");
  say("Loading your pipelines and artifacts…");
  const [pipelines, artifacts] = await Promise.all([api("/api/v1/pipelines"), api("/api/v1/artifacts")]);
  const rows = pipelines.pipelines.map((p) =>
    el(
      "tr",
      {},
      el("td", {}, el("a", { href: `#/pipelines/${p.id}` }, p.name || p.id)),
      el("td", { class: `state state-${pipelineState(p)}` }, pipelineState(p)),
      el("td", {}, when(p.create_time)),
      el("td", {}, el("code", {}, p.id.slice(0, 12))),
    ),
  );
  $("pipelines").tBodies[0].replaceChildren(...rows);
  $("pipelines-empty").hidden = rows.length > 0;

  const listings = artifacts.listings;
  // The listing names no sizes or formats: each manifest is read (the newest first, a bounded number).
  const shown = listings.slice(-100).reverse();
  const manifests = await Promise.all(
    shown.map((l) =>
      api(`/api/v1/artifacts/${l.artifact.id}`)
        .then((reply) => JSON.parse(reply.manifest_json))
        .catch(() => ({})),
    ),
  );
  const artifactRows = shown.map((listing, i) => {
    const manifest = manifests[i];
    const name = manifest.name || listing.artifact.id.slice(0, 12);
    const bytes = (manifest.files || []).reduce((total, f) => total + f.size, 0);
    const madeBy = listing.pipeline_name ? `${(manifest.recipe || {}).stage || ""} in ${listing.pipeline_name}` : "upload";
    return el(
      "tr",
      {},
      el("td", {}, name),
      el("td", {}, listing.artifact.kind),
      el("td", {}, manifest.format || ""),
      el("td", { class: "num" }, size(bytes)),
      el("td", {}, madeBy),
      el("td", {}, when(listing.stored_time)),
      el(
        "td",
        {},
        el(
          "button",
          {
            type: "button",
            class: "link",
            "aria-label": `Download ${name} as a tar file`,
            onclick: () => downloadArchive(listing.artifact.id, name).catch((e) => alertUser(explain(e))),
          },
          "Download",
        ),
      ),
    );
  });
  $("artifacts").tBodies[0].replaceChildren(...artifactRows);
  $("artifacts-empty").hidden = artifactRows.length > 0;
  const count = (n, what) => `${n} ${what}${n === 1 ? "" : "s"}`;
  say(`${count(rows.length, "pipeline")}, ${count(listings.length, "artifact")}.`);
}

async function openPipeline(id) {
  show("pipeline");
  comparison = null;
  $("comparison").hidden = true;
  say("Loading the pipeline…");
  render(await api(`/api/v1/pipelines/${encodeURIComponent(id)}`));
  const controller = new AbortController();
  watching = controller;
  say("Watching live.");
  try {
    await watchPipeline(id, render, controller.signal);
    say("The pipeline has ended.");
  } catch (error) {
    if (error.name === "AbortError") return;
    alertUser(`The live view stopped: ${explain(error)} Reload to watch again.`);
  }
}

function render(p) {
  const state = pipelineState(p);
  $("pipeline-title").textContent = `Pipeline ${p.name || p.id}`;
  const stateBox = $("pipeline-state");
  if (stateBox.textContent !== state) stateBox.textContent = state;
  stateBox.className = `state state-${state}`;
  $("pipeline-id").textContent = p.id;
  $("pipeline-error").hidden = !(p.error && p.error.message);
  $("pipeline-error").textContent = p.error && p.error.message ? `Why: ${p.error.message}` : "";
  const cancel = $("cancel");
  cancel.disabled = TERMINAL.has(state);
  cancel.onclick = () => cancelPipeline(p.id);
  const report = $("report-download");
  report.hidden = !(p.report && p.report.id);
  report.onclick = () => downloadArchive(p.report.id, `${p.name}-report`).catch((e) => alertUser(explain(e)));

  const rows = p.stages.map((s) => {
    const percent = Math.round(s.progress ? s.progress.percent || 0 : 0);
    const said = (s.error && s.error.message) || (s.progress && s.progress.message) || "";
    return el(
      "tr",
      {},
      el("th", { scope: "row" }, s.name),
      el("td", { class: `state state-${stageState(s)}` }, stageState(s) + (s.cached ? " (cached)" : "")),
      el("td", {}, el("progress", { max: 100, value: percent, "aria-label": `${s.name} progress` }), ` ${percent}%`),
      el("td", {}, said),
    );
  });
  $("stages").tBodies[0].replaceChildren(...rows);
  if (state === "succeeded" && p.summary && (p.summary.candidates || []).length && !comparison) showComparison(p.summary);
}

async function cancelPipeline(id) {
  $("cancel").disabled = true;
  try {
    render(await api(`/api/v1/pipelines/${encodeURIComponent(id)}/cancel`, { method: "POST" }));
    say("Cancel requested.");
  } catch (error) {
    alertUser(explain(error));
    $("cancel").disabled = false;
  }
}

// --- the comparison: the report's table (sortable) and a Pareto plot over any two metrics ------
function metricNames(summary) {
  const names = new Set();
  for (const c of summary.candidates) for (const m of Object.keys(c.metrics || {})) names.add(m);
  return [...names];
}

function showComparison(summary) {
  comparison = { summary, sortKey: "", ascending: true, selected: summary.recommended || "" };
  $("comparison").hidden = false;
  $("recommendation").textContent = summary.recommended
    ? `Recommended: ${summary.recommended}. ${summary.rationale || ""}`
    : `No candidate meets every constraint. ${summary.rationale || ""}`;
  const metrics = metricNames(summary);
  for (const [id, preferred] of [
    ["plot-x", ["size_mb", metrics[0]]],
    ["plot-y", ["perplexity", "latency_ms_per_token", metrics[1] || metrics[0]]],
  ]) {
    const select = $(id);
    select.replaceChildren(...metrics.map((m) => el("option", { value: m }, m)));
    select.value = preferred.find((m) => metrics.includes(m)) || metrics[0];
    select.onchange = drawPlot;
  }
  drawTable();
  drawPlot();
}

function drawTable() {
  const { summary, sortKey, ascending, selected } = comparison;
  const metrics = metricNames(summary);
  const columns = [
    ["name", "Candidate"],
    ["method", "Method"],
    ["feasible", "Meets constraints"],
    ["pareto_optimal", "Pareto-optimal"],
    ...metrics.map((m) => [m, m]),
  ];
  const value = (c, key) => (key in (c.metrics || {}) ? c.metrics[key] : c[key]);
  const head = columns.map(([key, label]) =>
    el(
      "th",
      { scope: "col", "aria-sort": key === sortKey ? (ascending ? "ascending" : "descending") : "none" },
      el("button", { type: "button", onclick: () => sortBy(key) }, label),
    ),
  );
  $("candidates").tHead.rows[0].replaceChildren(...head);
  const candidates = [...summary.candidates];
  if (sortKey) {
    candidates.sort((a, b) => {
      const x = value(a, sortKey);
      const y = value(b, sortKey);
      const order = typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y));
      return ascending ? order : -order;
    });
  }
  const rows = candidates.map((c) =>
    el(
      "tr",
      { class: c.name === selected ? "selected" : "", "aria-selected": String(c.name === selected) },
      el(
        "th",
        { scope: "row" },
        el("button", { type: "button", class: "link", onclick: () => select(c.name), "aria-pressed": String(c.name === selected) }, c.name),
      ),
      el("td", {}, c.method || ""),
      el("td", {}, c.feasible ? "yes" : `no: ${(c.violations || []).map((v) => v.metric).join(", ")}`),
      el("td", {}, c.pareto_optimal ? "yes" : "no"),
      ...metrics.map((m) => el("td", { class: "num" }, figure((c.metrics || {})[m]))),
    ),
  );
  $("candidates").tBodies[0].replaceChildren(...rows);
}

function sortBy(key) {
  comparison.ascending = comparison.sortKey === key ? !comparison.ascending : true;
  comparison.sortKey = key;
  drawTable();
  const header = [...$("candidates").tHead.rows[0].cells].find((th) => th.getAttribute("aria-sort") !== "none");
  header?.querySelector("button").focus();
}

function select(name) {
  comparison.selected = name;
  const c = comparison.summary.candidates.find((x) => x.name === name);
  $("selected").textContent = c
    ? `Selected: ${name} — ${Object.entries(c.metrics || {}).map(([k, v]) => `${k} ${figure(v)}`).join(", ")}`
    : "";
  drawTable();
  drawPlot();
}

function cssColor(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

function drawPlot() {
  if (!comparison || typeof Chart === "undefined") return;
  const { summary, selected } = comparison;
  const x = $("plot-x").value;
  const y = $("plot-y").value;
  const points = summary.candidates
    .filter((c) => typeof (c.metrics || {})[x] === "number" && typeof c.metrics[y] === "number")
    .map((c) => ({ x: c.metrics[x], y: c.metrics[y], name: c.name, c }));
  const color = { pareto: cssColor("--pareto"), other: cssColor("--dominated"), bad: cssColor("--bad"), fg: cssColor("--fg"), line: cssColor("--line"), ok: cssColor("--ok") };
  const pointStyle = (p) => (p.c.feasible ? "circle" : "crossRot");
  const datasets = [
    {
      type: "scatter",
      label: "candidates",
      data: points,
      pointStyle: points.map(pointStyle),
      pointRadius: points.map((p) => (p.name === selected ? 9 : 6)),
      pointHoverRadius: 10,
      borderWidth: points.map((p) => (p.name === selected ? 3 : 1.5)),
      borderColor: points.map((p) => (p.name === selected ? color.ok : p.c.feasible ? (p.c.pareto_optimal ? color.pareto : color.other) : color.bad)),
      backgroundColor: points.map((p) => (p.c.pareto_optimal && p.c.feasible ? color.pareto : "transparent")),
    },
  ];
  // Constraint lines on either axis (max_* limits the selector applied), dashed across the plot.
  const xs = points.map((p) => p.x);
  const ys = points.map((p) => p.y);
  for (const limit of summary.constraints || []) {
    if (limit.metric === y && xs.length) {
      datasets.push({ type: "line", label: `limit on ${y}`, data: [{ x: Math.min(...xs), y: limit.value }, { x: Math.max(...xs), y: limit.value }], borderColor: color.bad, borderDash: [6, 4], pointRadius: 0, borderWidth: 1.5 });
    }
    if (limit.metric === x && ys.length) {
      datasets.push({ type: "line", label: `limit on ${x}`, data: [{ x: limit.value, y: Math.min(...ys) }, { x: limit.value, y: Math.max(...ys) }], borderColor: color.bad, borderDash: [6, 4], pointRadius: 0, borderWidth: 1.5 });
    }
  }
  const axis = (title) => ({ title: { display: true, text: title, color: color.fg }, ticks: { color: color.fg }, grid: { color: color.line } });
  const config = {
    data: { datasets },
    options: {
      animation: false,
      maintainAspectRatio: false,
      scales: { x: { type: "linear", ...axis(x) }, y: axis(y) },
      plugins: {
        legend: { display: false },
        tooltip: {
          filter: (item) => item.datasetIndex === 0,
          callbacks: { label: (item) => `${item.raw.name}: ${x} ${figure(item.raw.x)}, ${y} ${figure(item.raw.y)}` },
        },
      },
      onClick: (event, elements) => {
        const hit = elements.find((e) => e.datasetIndex === 0);
        if (hit) select(points[hit.index].name);
      },
    },
  };
  if (chart) chart.destroy();
  chart = new Chart($("pareto"), config);
}

// --- theme: the system's, or the one the switch chose -------------------------------------------
function applyTheme(theme) {
  if (theme === "system") document.documentElement.removeAttribute("data-theme");
  else document.documentElement.setAttribute("data-theme", theme);
  $("theme").textContent = `Theme: ${theme}`;
  drawPlot(); // the plot's colours come from the CSS variables
}

function nextTheme() {
  const now = localStorage.getItem(THEME_KEY) || "system";
  const next = THEMES[(THEMES.indexOf(now) + 1) % THEMES.length];
  localStorage.setItem(THEME_KEY, next);
  applyTheme(next);
  say(`Theme: ${next}.`);
}

document.addEventListener("DOMContentLoaded", () => {
  applyTheme(localStorage.getItem(THEME_KEY) || "system");
  matchMedia("(prefers-color-scheme: dark)").addEventListener("change", drawPlot);
  $("theme").addEventListener("click", nextTheme);
  $("sign-in-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", () => signOut());
  $("refresh").addEventListener("click", () => route());
  $("upload-form").addEventListener("submit", submitUpload);
  $("spec-validate").addEventListener("click", () => sendSpec(true));
  $("spec-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sendSpec(false);
  });
  $("upload-kind").addEventListener("change", (e) => {
    $("upload-format").value = e.target.value === "model" ? "hf-safetensors" : "text";
  });
  window.addEventListener("hashchange", route);
  route();
});
