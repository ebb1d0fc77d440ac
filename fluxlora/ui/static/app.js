// fluxlora ui: a small hand-written front-end (no build step). Pages: datasets, new run, runs (and one run's live
// page), outputs. Every state change goes through the JSON API with the CSRF header; nothing here builds a command
// line to run: the server turns form values into an argv list and the trainer's own parser checks it.
"use strict";

const state = { info: null, flags: null, models: null, form: null, datasetFolder: "", datasetToml: "",
                timer: null, chart: null, events: { offset: 0, steps: [], validation: [], commands: [] } };

// ---- helpers -------------------------------------------------------------------------------------------------------
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "value") el.value = v;
    else if (k === "checked") el.checked = !!v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

async function api(method, url, body, raw) {
  const opts = { method, headers: {} };
  if (method !== "GET") opts.headers["X-CSRF-Token"] = state.info ? state.info.csrf : "";
  if (raw !== undefined) opts.body = raw;
  else if (body !== undefined) { opts.body = JSON.stringify(body); opts.headers["Content-Type"] = "application/json"; }
  const res = await fetch(url, opts);
  let data = null;
  try { data = await res.json(); } catch (e) { data = { error: `${res.status} ${res.statusText}` }; }
  if (!res.ok) { const err = new Error(data.error || res.statusText); err.data = data; err.status = res.status; throw err; }
  return data;
}

const q = (params) => new URLSearchParams(params).toString();
const fileUrl = (path) => `/api/file?${q({ path })}`;
const fmt = (v, digits = 4) => (v === null || v === undefined || Number.isNaN(v)) ? "–" : Number(v).toPrecision(digits);
function duration(s) {
  if (s === null || s === undefined) return "–";
  s = Math.round(s);
  const m = Math.floor(s / 60), hh = Math.floor(m / 60);
  return hh ? `${hh} h ${m % 60} min` : m ? `${m} min ${s % 60} s` : `${s} s`;
}
function notice(text, kind) { return h("div", { class: `notice ${kind || ""}` }, text); }
function copyButton(getText) {
  return h("button", { class: "copy secondary", onclick: () => navigator.clipboard && navigator.clipboard.writeText(getText()) }, "copy");
}
function setPage(...children) { const page = document.getElementById("page"); page.replaceChildren(...children); }
function stopTimer() { if (state.timer) { clearTimeout(state.timer); state.timer = null; } }

// ---- folder picker -------------------------------------------------------------------------------------------------
function folderPicker(input, { files = false, onpick } = {}) {
  const box = h("div", { class: "browser", hidden: true });
  async function show(path) {
    try {
      const data = await api("GET", `/api/browse?${q(path ? { path } : {})}`);
      const rows = [];
      if (data.parent) rows.push(h("div", { onclick: () => show(data.parent) }, "↑ .."));
      if (data.path) rows.push(h("div", { onclick: () => { input.value = data.path; box.hidden = true; onpick && onpick(data.path); } },
                                 h("b", {}, "✓ use this folder")));
      for (const e of data.entries) {
        if (!e.dir && !files) continue;
        rows.push(h("div", { onclick: () => {
          if (e.dir) show(e.path); else { input.value = e.path; box.hidden = true; onpick && onpick(e.path); }
        } }, e.dir ? `📁 ${e.name}` : e.name));
      }
      box.replaceChildren(...rows);
      box.hidden = false;
    } catch (err) { box.replaceChildren(h("div", { class: "bad" }, err.message)); box.hidden = false; }
  }
  const button = h("button", { class: "secondary", type: "button", onclick: () => (box.hidden ? show(input.value || "") : (box.hidden = true)) }, "Browse");
  return { button, box };
}

// ---- datasets ------------------------------------------------------------------------------------------------------
function datasetSettings() {
  const v = (id) => document.getElementById(id);
  return { path: v("ds-folder").value.trim(), caption_extension: v("ds-ext").value.trim() || ".txt",
           resolution: v("ds-res").value.trim() || "1024", enable_bucket: v("ds-bucket").checked ? "1" : "0" };
}

function renderDatasets() {
  const folder = h("input", { type: "text", id: "ds-folder", value: state.datasetFolder, placeholder: "image folder inside a root" });
  const picker = folderPicker(folder, { onpick: () => loadDataset() });
  const upload = h("input", { type: "file", id: "ds-upload", multiple: true, accept: ".png,.jpg,.jpeg,.webp,.bmp,.txt,.caption" });
  upload.addEventListener("change", () => uploadFiles(upload.files));
  const tomlPath = h("input", { type: "text", id: "ds-toml-path", value: state.datasetFolder ? `${state.datasetFolder}.toml` : "" });
  setPage(
    h("h2", {}, "Datasets"),
    h("div", { class: "panel" },
      h("div", { class: "row" },
        h("label", { class: "field wide" }, "Image folder", folder),
        picker.button,
        h("button", { id: "ds-open", onclick: () => loadDataset() }, "Open"),
        h("button", { class: "secondary", id: "ds-mkdir", onclick: makeFolder }, "Create folder")),
      picker.box,
      h("div", { class: "row", style: "margin-top:10px" },
        h("label", { class: "field" }, "Caption extension", h("input", { type: "text", id: "ds-ext", value: ".txt" })),
        h("label", { class: "field" }, "Resolution", h("input", { type: "text", id: "ds-res", value: "1024" })),
        h("label", { class: "check" }, h("input", { type: "checkbox", id: "ds-bucket", checked: true }), "aspect-ratio buckets"),
        h("label", { class: "field" }, "Upload images and captions", upload))),
    h("div", { id: "ds-body" }),
    h("div", { class: "panel" },
      h("h3", {}, "Dataset config (TOML)"),
      h("div", { class: "row" },
        h("label", { class: "field wide" }, "Write to", tomlPath),
        h("label", { class: "field" }, "Repeats", h("input", { type: "number", id: "ds-repeats", value: "1", min: "1" })),
        h("label", { class: "field" }, "Batch size", h("input", { type: "number", id: "ds-batch", value: "1", min: "1" })),
        h("label", { class: "field" }, "Class tokens", h("input", { type: "text", id: "ds-class", value: "" })),
        h("button", { id: "ds-write-toml", onclick: writeToml }, "Write TOML")),
      h("div", { id: "ds-toml-out" })));
  if (state.datasetFolder) loadDataset();
}

async function makeFolder() {
  const path = document.getElementById("ds-folder").value.trim();
  try { await api("POST", "/api/mkdir", { path }); await loadDataset(); }
  catch (err) { document.getElementById("ds-body").replaceChildren(notice(err.message, "error")); }
}

async function loadDataset() {
  const s = datasetSettings();
  const body = document.getElementById("ds-body");
  if (!s.path) return;
  state.datasetFolder = s.path;
  const tomlPath = document.getElementById("ds-toml-path");
  if (tomlPath && !tomlPath.value) tomlPath.value = `${s.path.replace(/\/+$/, "")}.toml`;
  // uploads, "Create folder" and "Open" may each ask at once: only the newest answer may draw the page
  const ticket = state.datasetTicket = (state.datasetTicket || 0) + 1;
  let data;
  try { data = await api("GET", `/api/dataset?${q(s)}`); }
  catch (err) { if (ticket === state.datasetTicket) body.replaceChildren(notice(err.message, "error")); return; }
  if (ticket !== state.datasetTicket) return;
  const buckets = Object.entries(data.buckets).map(([b, n]) => `${b}: ${n}`).join(", ");
  const cards = data.images.map((img) => imageCard(img, data.caption_extension));
  body.replaceChildren(
    h("div", { class: "panel" },
      h("div", { id: "ds-summary" }, `${data.images.length} images`, data.bad ? h("span", { class: "bad" }, ` · ${data.bad} with problems`) : "",
        buckets ? h("span", { class: "muted" }, ` · buckets ${buckets}`) : ""),
      data.problems.length ? h("ul", { id: "ds-problems", class: "bad" }, data.problems.map((p) => h("li", {}, p))) : ""),
    h("div", { class: "grid", id: "ds-grid" }, cards));
}

function imageCard(img, ext) {
  const text = h("textarea", { "data-caption-for": img.name, placeholder: "no caption" });
  text.value = img.caption || "";
  const status = h("span", { class: "meta" });
  const save = h("button", { class: "secondary", "data-save-for": img.name, onclick: async () => {
    try {
      const res = await api("PUT", "/api/caption", { path: img.path, caption: text.value, caption_extension: ext });
      status.textContent = "saved"; status.className = "meta good"; text.value = res.caption;
    } catch (err) { status.textContent = err.message; status.className = "meta bad"; }
  } }, "Save caption");
  return h("div", { class: `card ${img.problems.length ? "has-problem" : ""}`, "data-image": img.name },
    h("img", { src: `/api/thumb?${q({ path: img.path })}`, alt: img.name, loading: "lazy" }),
    h("div", { class: "name" }, img.name),
    h("div", { class: "meta" }, img.size ? `${img.size[0]}×${img.size[1]}` : "size ?",
      img.bucket ? ` → bucket ${img.bucket[0]}×${img.bucket[1]}` : ""),
    img.problems.length ? h("div", { class: "meta bad" }, img.problems.join("; ")) : "",
    text, h("div", { class: "row" }, save, status));
}

async function uploadFiles(files) {
  const s = datasetSettings();
  const body = document.getElementById("ds-body");
  const messages = [];
  for (const file of files) {
    try {
      await api("PUT", `/api/upload?${q({ dir: s.path, name: file.name })}`, undefined, file);
    } catch (err) { messages.push(`${file.name}: ${err.message}`); }
  }
  await loadDataset();
  if (messages.length) body.prepend(notice(messages.join("\n"), "error"));
}

async function writeToml() {
  const s = datasetSettings();
  const out = document.getElementById("ds-toml-out");
  const payload = {
    path: document.getElementById("ds-toml-path").value.trim(), resolution: s.resolution,
    caption_extension: s.caption_extension, enable_bucket: s.enable_bucket === "1",
    batch_size: document.getElementById("ds-batch").value,
    subsets: [{ image_dir: s.path, num_repeats: document.getElementById("ds-repeats").value,
                class_tokens: document.getElementById("ds-class").value }] };
  try {
    const res = await api("POST", "/api/dataset/toml", payload);
    state.datasetToml = res.path;
    out.replaceChildren(notice(`wrote ${res.path}`, "ok"), h("pre", { id: "ds-toml-text" }, res.toml),
      h("a", { href: "#/new", id: "ds-use" }, "use it in a new run →"));
  } catch (err) { out.replaceChildren(notice(err.message, "error")); }
}

// ---- new run -------------------------------------------------------------------------------------------------------
function formValue(spec) {
  const el = document.querySelector(`[data-flag="${spec.name}"]`);
  if (!el) return undefined;
  return spec.kind === "bool" ? el.checked : el.value;
}

function collectForm() {
  const values = {};
  for (const spec of state.flags.flags) {
    const v = formValue(spec);
    if (v === undefined || v === "" || v === false) continue;
    values[spec.name] = v;
  }
  const prompts = document.getElementById("run-prompts");
  if (prompts && prompts.value.trim()) values.sample_prompts_text = prompts.value;
  state.form = values;
  return values;
}

function flagInput(spec, value) {
  const attrs = { "data-flag": spec.name, id: `flag-${spec.name}`, title: spec.help };
  if (spec.kind === "bool") return h("input", { type: "checkbox", ...attrs, checked: !!value });
  if (spec.kind === "choice") {
    return h("select", attrs, h("option", { value: "" }, `(default${spec.default !== null && spec.default !== undefined ? ": " + spec.default : ""})`),
      spec.choices.map((c) => h("option", { value: c, selected: String(value) === c }, c)));
  }
  return h("input", { type: "text", ...attrs, value: value ?? "", placeholder: spec.default !== null && spec.default !== undefined && spec.default !== false ? String(spec.default) : "" });
}

function flagField(spec, value, wide) {
  const input = flagInput(spec, value);
  const error = h("div", { class: "field-error", "data-error-for": spec.name });
  if (spec.kind === "bool") return h("div", { class: "field", "data-field": spec.name }, h("label", { class: "check" }, input, `--${spec.name}`), error);
  return h("label", { class: `field ${wide ? "wide" : ""}`, "data-field": spec.name }, `--${spec.name}`, input, error);
}

function modelSelect(spec, kinds, value) {
  const files = (state.models || []).filter((f) => kinds.includes(f.kind));
  const select = h("select", { "data-flag": spec.name, id: `flag-${spec.name}` },
    h("option", { value: "" }, files.length ? "(choose)" : "(no such file under the roots)"),
    files.map((f) => h("option", { value: f.path, selected: value === f.path },
      `${f.name} — ${f.kind}${f.variant ? " " + f.variant : ""}, ${f.dtype || "?"}, ${(f.size / 1e9).toFixed(2)} GB`)));
  if (!value && files.length === 1) select.value = files[0].path;
  return h("label", { class: "field wide", "data-field": spec.name }, `--${spec.name}`, select,
    h("div", { class: "field-error", "data-error-for": spec.name }));
}

async function renderNewRun() {
  if (!state.flags) state.flags = await api("GET", "/api/flags");
  state.models = (await api("GET", "/api/models")).files;
  const specs = Object.fromEntries(state.flags.flags.map((s) => [s.name, s]));
  const values = { ...state.flags.defaults, ...(state.form || {}) };
  if (state.datasetToml && !values.dataset_config) values.dataset_config = state.datasetToml;
  if (!values.output_dir && state.info.roots.length) values.output_dir = `${state.info.roots[0]}/outputs`;
  if (!values.output_name) values.output_name = "my_lora";
  // a run is only resumable with the seed it started with: pick one now, shown and editable like any flag
  if (!values.seed) values.seed = String(Math.floor(Math.random() * 2 ** 31));
  const kinds = { pretrained_model_name_or_path: ["flux", "flux-diffusers"], clip_l: ["clip_l"], t5xxl: ["t5xxl"], ae: ["ae"] };
  const common = state.flags.common.filter((n) => specs[n]).map((n) => kinds[n]
    ? modelSelect(specs[n], kinds[n], values[n])
    : flagField(specs[n], values[n], ["dataset_config", "output_dir"].includes(n)));
  const groups = {};
  for (const spec of state.flags.flags) {
    if (state.flags.common.includes(spec.name)) continue;
    (groups[spec.group] = groups[spec.group] || []).push(spec);
  }
  const all = Object.entries(groups).map(([group, list]) => h("div", { class: "flag-group" }, h("h4", {}, group),
    h("div", { class: "row" }, list.map((s) => flagField(s, values[s.name])))));
  const presetSelect = h("select", { id: "preset-gb" }, state.flags.presets_gb.map((g) => h("option", { value: g, selected: g === 24 }, `${g} GB`)));
  setPage(
    h("h2", {}, "New run"),
    h("div", { class: "panel" },
      h("div", { class: "row" }, h("label", { class: "field" }, "GPU memory preset", presetSelect),
        h("button", { class: "secondary", id: "preset-get", onclick: getPreset }, "Get preset"),
        h("span", { class: "muted" }, "the planner's answer for that GPU (same as fluxlora check --vram GB)")),
      h("div", { id: "preset-out" }),
      h("div", { class: "field-error", "data-error-for": "" })),
    h("div", { class: "panel" }, h("div", { class: "row" }, common),
      h("h3", {}, "Sample prompts (one per line, sd-scripts options like --w 512 --h 512 --s 20 --d 42)"),
      h("textarea", { id: "run-prompts", rows: 3 }, (state.form && state.form.sample_prompts_text) || "")),
    h("div", { class: "panel" }, h("details", { id: "all-flags" }, h("summary", {}, "All flags"), all)),
    h("div", { class: "row" },
      h("button", { class: "secondary", id: "run-check", onclick: () => checkRun(false) }, "Check"),
      h("button", { id: "run-start", onclick: () => checkRun(true) }, "Start run")),
    h("div", { id: "plan-out", style: "margin-top:12px" }));
}

function showFieldErrors(errors) {
  document.querySelectorAll("[data-error-for]").forEach((el) => { el.textContent = ""; });
  document.querySelectorAll(".field.has-error").forEach((el) => el.classList.remove("has-error"));
  const general = [];
  for (const e of errors || []) {
    const slot = document.querySelector(`[data-error-for="${e.field}"]`);
    if (e.field && slot) {
      slot.textContent = slot.textContent ? `${slot.textContent}; ${e.message}` : e.message;
      const field = document.querySelector(`[data-field="${e.field}"]`);
      if (field) field.classList.add("has-error");
      const details = slot.closest("details");
      if (details) details.open = true;
    } else general.push(e.message);
  }
  return general;
}

function planView(plan) {
  return h("div", {},
    plan.summary ? h("div", { class: "panel", id: "plan-summary" }, h("b", {}, "Preflight: "), plan.summary) : "",
    plan.memory && plan.memory.length ? h("div", { class: "panel" }, h("h3", {}, "Memory plan"), h("pre", { id: "plan-memory" }, plan.memory.join("\n"))) : "",
    h("div", { class: "panel" }, h("h3", {}, "Command line", copyButton(() => plan.command_line)), h("pre", { id: "plan-command" }, plan.command_line),
      plan.config_toml ? h("h3", {}, "--config_file TOML", copyButton(() => plan.config_toml)) : "",
      plan.config_toml ? h("pre", { id: "plan-toml" }, plan.config_toml) : ""));
}

async function checkRun(start) {
  const out = document.getElementById("plan-out");
  const values = collectForm();
  out.replaceChildren(h("p", { class: "muted" }, start ? "checking and starting…" : "checking…"));
  try {
    if (start) {
      const job = await api("POST", "/api/jobs", { values });
      showFieldErrors([]);
      location.hash = `#/runs/${job.id}`;
      return;
    }
    const plan = await api("POST", "/api/plan", { values });
    const general = showFieldErrors(plan.errors);
    out.replaceChildren(plan.ok ? notice("all checks passed", "ok") : notice(`${plan.errors.length} problem(s): see the fields marked in red`, "error"),
      ...general.map((g) => notice(g, "error")), planView(plan));
  } catch (err) {
    const general = showFieldErrors((err.data && err.data.errors) || []);
    out.replaceChildren(notice(err.message, "error"), ...general.map((g) => notice(g, "error")));
  }
}

function applySettings(settings) {
  for (const [name, value] of Object.entries(settings)) {
    const el = document.querySelector(`[data-flag="${name}"]`);
    if (!el) continue;
    if (el.type === "checkbox") el.checked = value === true; else el.value = String(value);
  }
}

async function getPreset() {
  const out = document.getElementById("preset-out");
  const gb = Number(document.getElementById("preset-gb").value);
  out.replaceChildren(h("p", { class: "muted" }, "asking the planner…"));
  try {
    const res = await api("POST", "/api/presets", { values: collectForm(), sizes: [gb] });
    const general = showFieldErrors(res.plan.errors);
    if (!res.presets.length) { out.replaceChildren(notice("fix the problems marked in red first", "error"), ...general.map((g) => notice(g, "error"))); return; }
    const p = res.presets[0];
    if (p.fits) applySettings(p.settings);
    out.replaceChildren(h("div", { id: "preset-result", class: `notice ${p.fits ? "ok" : "error"}` },
      p.fits ? (p.flags.length ? `${gb} GB: applied ${p.flags.join(" ")}` : `${gb} GB: fits as given`) : `${gb} GB: does not fit — ${p.advice}`),
      h("pre", {}, p.plan.join("\n")));
  } catch (err) { out.replaceChildren(notice(err.message, "error")); }
}

// ---- runs ----------------------------------------------------------------------------------------------------------
async function renderRuns() {
  const data = await api("GET", "/api/jobs");
  const rows = data.jobs.map((j) => h("tr", { class: "link", "data-job": j.id, onclick: () => { location.hash = j.kind === "train" ? `#/runs/${j.id}` : "#/outputs"; } },
    h("td", {}, j.id), h("td", {}, j.name), h("td", {}, j.kind), h("td", {}, h("span", { class: `badge ${j.status}` }, j.status)),
    h("td", {}, j.device || "–"), h("td", {}, j.started ? new Date(j.started * 1000).toLocaleString() : "–"),
    h("td", { class: "bad" }, j.error || "")));
  setPage(h("h2", {}, "Runs"), h("div", { class: "panel" }, rows.length
    ? h("table", { id: "runs-table" }, h("tr", {}, ["#", "name", "kind", "status", "device", "started", ""].map((t) => h("th", {}, t))), rows)
    : h("p", { class: "muted" }, "no runs yet: start one from New run")));
  state.timer = setTimeout(() => route(), 3000);
}

function stat(k, v, id) { return h("div", { class: "stat" }, h("div", { class: "k" }, k), h("div", { class: "v", id }, v)); }

function makeChart(el) {
  if (!window.uPlot) return null;
  const opts = { width: Math.max(300, el.clientWidth - 10), height: 260, scales: { x: { time: false } },
    series: [{ label: "step" }, { label: "loss", stroke: "#9ab", width: 1 }, { label: "avg loss", stroke: "#036", width: 2 },
             { label: "validation", stroke: "#c40", width: 0, points: { show: true, size: 7, fill: "#c40" } }],
    axes: [{ label: "step" }, { label: "loss" }] };
  return new uPlot(opts, [[], [], [], []], el);
}

function chartData() {
  const ev = state.events;
  const steps = ev.steps.map((e) => e.step);
  const val = new Map(ev.validation.map((e) => [e.step, e.loss]));
  return [steps, ev.steps.map((e) => e.loss), ev.steps.map((e) => e.avg_loss), steps.map((s) => (val.has(s) ? val.get(s) : null))];
}

async function renderRun(id) {
  state.events = { offset: 0, steps: [], validation: [], commands: [] };
  const chartBox = h("div", { id: "loss-chart" });
  setPage(
    h("div", { class: "row" }, h("h2", { id: "run-title" }, `Run #${id}`), h("span", { id: "run-status" })),
    h("div", { id: "run-error" }),
    h("div", { class: "panel" },
      h("div", { class: "row", style: "margin-bottom:10px" },
        h("button", { id: "btn-sample", onclick: () => command(id, "sample") }, "Sample now"),
        h("button", { id: "btn-save", onclick: () => command(id, "save") }, "Save now"),
        h("button", { id: "btn-stop", class: "danger", onclick: () => command(id, "stop") }, "Stop"),
        h("button", { id: "btn-resume", class: "secondary", onclick: () => resume(id) }, "Resume"),
        h("span", { id: "cmd-out", class: "muted" })),
      h("div", { class: "stats" }, stat("step", "–", "st-step"), stat("loss", "–", "st-loss"), stat("avg loss", "–", "st-avg"),
        stat("learning rate", "–", "st-lr"), stat("s / step", "–", "st-speed"), stat("ETA", "–", "st-eta"),
        stat("memory", "–", "st-mem"), stat("validation loss", "–", "st-val"))),
    h("div", { class: "panel" }, h("h3", {}, "Loss"), chartBox),
    h("div", { class: "panel" }, h("h3", {}, "Samples"), h("div", { class: "samples", id: "run-samples" })),
    h("div", { class: "panel" }, h("h3", {}, "Files"), h("ul", { id: "run-files" })),
    h("div", { class: "panel" }, h("h3", {}, "Log"), h("pre", { id: "run-log" })));
  state.chart = makeChart(chartBox);
  await pollRun(id);
}

async function pollRun(id) {
  if (!location.hash.startsWith(`#/runs/${id}`)) return;
  try {
    let more = true;
    while (more) {
      const ev = await api("GET", `/api/jobs/${id}/events?${q({ offset: state.events.offset })}`);
      for (const e of ev.events) {
        if (e.event === "step") state.events.steps.push(e);
        else if (e.event === "validation") state.events.validation.push(e);
        else if (e.event === "command") state.events.commands.push(e);
        else if (e.event === "training") {
          // a resumed run starts again at its state's step: drop the steps it will redo
          state.events.steps = state.events.steps.filter((s) => s.step <= e.step);
          state.events.trainingAt = e.t;
        }
      }
      state.events.offset = ev.offset;
      more = ev.more;
    }
    const job = await api("GET", `/api/jobs/${id}?log=80`);
    showRun(job);
    const active = ["queued", "starting", "training"].includes(job.status);
    state.timer = setTimeout(() => pollRun(id), active ? 1000 : 4000);
  } catch (err) {
    document.getElementById("run-error").replaceChildren(notice(err.message, "error"));
    state.timer = setTimeout(() => pollRun(id), 4000);
  }
}

function showRun(job) {
  const set = (id, v) => { const el = document.getElementById(id); if (el) el.textContent = v; };
  set("run-title", `Run #${job.id}: ${job.name}`);
  document.getElementById("run-status").replaceChildren(h("span", { class: `badge ${job.status}`, "data-status": job.status }, job.status),
    job.exit_code !== null && job.exit_code !== undefined ? h("span", { class: "muted" }, ` exit code ${job.exit_code}`) : "");
  const failed = ["failed", "lost"].includes(job.status);
  document.getElementById("run-error").replaceChildren(job.error && (failed || job.status === "stopped")
    ? h("div", { class: `notice ${failed ? "error" : ""}`, id: "run-error-line" }, job.error) : "");
  const last = state.events.steps[state.events.steps.length - 1];
  if (last) {
    set("st-step", `${last.step} / ${last.max_steps}`); set("st-loss", fmt(last.loss)); set("st-avg", fmt(last.avg_loss));
    set("st-lr", fmt(last.lr, 3)); set("st-speed", fmt(last.s_per_step, 3)); set("st-eta", job.status === "training" ? duration(last.eta_s) : "–");
    set("st-mem", last.device_gb !== undefined ? `${last.device_gb.toFixed(2)} GB (peak ${last.device_peak_gb.toFixed(2)})` : `RAM ${last.ram_gb.toFixed(2)} GB`);
  }
  const val = state.events.validation[state.events.validation.length - 1];
  if (val) set("st-val", `${fmt(val.loss)} @ ${val.step}`);
  if (state.chart) state.chart.setData(chartData());
  const active = ["starting", "training"].includes(job.status);
  document.getElementById("btn-sample").disabled = job.status !== "training";
  document.getElementById("btn-save").disabled = job.status !== "training";
  document.getElementById("btn-stop").disabled = !(active || job.status === "queued");
  document.getElementById("btn-resume").disabled = !job.resumable;
  const samples = (job.samples || []).filter((s) => !s.includes("_grid"));
  const box = document.getElementById("run-samples");
  if (box.childElementCount !== samples.length) {
    box.replaceChildren(...samples.map((s) => h("figure", { "data-sample": s }, h("img", { src: fileUrl(`${job.output_dir}/${s}`), alt: s }),
      h("figcaption", {}, s.replace("sample/", "")))));
  }
  document.getElementById("run-files").replaceChildren(...(job.files || []).filter((f) => !f.startsWith("sample/")).map((f) =>
    h("li", { "data-file": f }, f.endsWith(".safetensors") ? h("a", { href: `${fileUrl(`${job.output_dir}/${f}`)}&download=1` }, f) : f)));
  const cmd = state.events.commands[state.events.commands.length - 1];
  if (cmd && cmd.t >= (state.events.trainingAt || 0)) set("cmd-out", `${cmd.command} at step ${cmd.step ?? "?"}: ${cmd.message || (cmd.files || []).join(", ") || "done"}`);
  const log = document.getElementById("run-log");
  const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
  log.textContent = (job.log || []).join("\n");
  if (atBottom) log.scrollTop = log.scrollHeight;
}

async function command(id, name) {
  const out = document.getElementById("cmd-out");
  try { const res = await api("POST", `/api/jobs/${id}/command`, { command: name }); out.textContent = res.message; }
  catch (err) { out.textContent = err.message; }
}

async function resume(id) {
  const out = document.getElementById("cmd-out");
  try { await api("POST", `/api/jobs/${id}/resume`); out.textContent = "resuming from the last saved state"; }
  catch (err) { out.textContent = err.message; }
}

// ---- outputs -------------------------------------------------------------------------------------------------------
async function renderOutputs() {
  const data = await api("GET", "/api/outputs");
  const loraOptions = [];
  const runs = data.runs.map((r) => {
    r.loras.forEach((l) => loraOptions.push({ run: r, lora: l }));
    return h("div", { class: "panel", "data-run": r.job },
      h("h3", {}, `#${r.job} ${r.name} `, h("span", { class: `badge ${r.status}` }, r.status)),
      h("div", { class: "muted" }, r.output_dir),
      r.loras.length ? h("table", {}, h("tr", {}, ["file", "steps", "rank / alpha", "size", ""].map((t) => h("th", {}, t))),
        r.loras.map((l) => h("tr", { "data-lora": l.name }, h("td", {}, l.name),
          h("td", {}, (l.metadata || {}).ss_steps || "–"),
          h("td", {}, `${(l.metadata || {}).ss_network_dim || "?"} / ${(l.metadata || {}).ss_network_alpha || "?"}`),
          h("td", {}, `${(l.size / 1e6).toFixed(2)} MB`),
          h("td", {}, h("a", { href: `${fileUrl(l.path)}&download=1` }, "download")))))
        : h("p", { class: "muted" }, "no LoRA files yet"));
  });
  const select = h("select", { id: "gen-lora" }, loraOptions.map((o, i) => h("option", { value: i }, `#${o.run.job} ${o.lora.name}`)));
  const gen = h("div", { class: "panel" }, h("h3", {}, "Generate with a LoRA"),
    loraOptions.length ? h("div", {},
      h("div", { class: "row" }, h("label", { class: "field wide" }, "LoRA", select),
        h("label", { class: "field wide" }, "Prompt", h("input", { type: "text", id: "gen-prompt", value: "" })),
        h("label", { class: "field" }, "Width", h("input", { type: "text", id: "gen-width", value: "512" })),
        h("label", { class: "field" }, "Height", h("input", { type: "text", id: "gen-height", value: "512" })),
        h("label", { class: "field" }, "Steps", h("input", { type: "text", id: "gen-steps", value: "20" })),
        h("label", { class: "field" }, "Seed", h("input", { type: "text", id: "gen-seed", value: "42" })),
        h("button", { id: "gen-start", onclick: async () => {
          const o = loraOptions[Number(select.value)];
          const v = (id) => document.getElementById(id).value;
          const body = { lora_weights: o.lora.path, ckpt_path: o.run.models.pretrained_model_name_or_path, clip_l: o.run.models.clip_l,
                         t5xxl: o.run.models.t5xxl, ae: o.run.models.ae, prompt: v("gen-prompt"), width: v("gen-width"),
                         height: v("gen-height"), steps: v("gen-steps"), seed: v("gen-seed") };
          try { await api("POST", "/api/generate", body); route(); }
          catch (err) { document.getElementById("gen-out").replaceChildren(notice(err.message, "error")); }
        } }, "Generate")),
      h("div", { id: "gen-out" }))
      : h("p", { class: "muted" }, "train a LoRA first"));
  const generated = data.generated.map((j) => h("div", { class: "panel", "data-generate": j.id },
    h("div", {}, `#${j.id} ${j.name} `, h("span", { class: `badge ${j.status}` }, j.status), j.error ? h("span", { class: "bad" }, ` ${j.error}`) : ""),
    h("div", { class: "samples" }, (j.images || []).map((n) => h("img", { src: fileUrl(`${j.output_dir}/${n}`), alt: n })))));
  setPage(h("h2", {}, "Outputs"), gen, ...generated, ...runs);
  if (data.generated.some((j) => ["queued", "starting", "training"].includes(j.status))) state.timer = setTimeout(() => route(), 2000);
}

// ---- router --------------------------------------------------------------------------------------------------------
async function route() {
  stopTimer();
  const hash = location.hash || "#/datasets";
  const [, tab, id] = hash.split("/");
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.tab === tab));
  try {
    if (tab === "new") await renderNewRun();
    else if (tab === "runs" && id) await renderRun(Number(id));
    else if (tab === "runs") await renderRuns();
    else if (tab === "outputs") await renderOutputs();
    else renderDatasets();
  } catch (err) { setPage(notice(err.message, "error")); }
}

window.addEventListener("hashchange", () => {
  if (location.hash.startsWith("#/new") === false && document.getElementById("run-prompts")) collectForm();
  route();
});
(async () => {
  try {
    state.info = await api("GET", "/api/info");
    document.getElementById("status-line").textContent = `roots: ${state.info.roots.join(", ")}`;
  } catch (err) { setPage(notice(err.message, "error")); return; }
  route();
})();
