// relprop explorer: every text from the user or the model is set with textContent, never parsed as HTML
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, model: null, image: null, text: null, target: null, classes: [], maps: [],
                row: 0, seq: {} };

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function status(message) { $("status").textContent = message; }

// A request whose answer is dropped when a newer one of the same kind was sent since.
async function call(kind, path, body, raw) {
  const seq = (state.seq[kind] || 0) + 1;
  state.seq[kind] = seq;
  status("working…");
  busy(+1);
  try {
    return await answer(kind, seq, path, body, raw);
  } finally {
    busy(-1);
  }
}

// How many requests are on their way (body[data-busy]; the browser test and benchmark wait for 0).
function busy(change) {
  state.inflight = (state.inflight || 0) + change;
  document.body.dataset.busy = String(state.inflight);
}

async function answer(kind, seq, path, body, raw) {
  let response;
  try {
    response = await fetch(path, raw ? { method: "POST", body: body, headers: { "content-type": "application/octet-stream" } }
                                     : { method: body === undefined ? "GET" : "POST", body: body === undefined ? undefined : JSON.stringify(body),
                                         headers: { "content-type": "application/json" } });
  } catch (error) {
    status("");
    showError("the server cannot be reached: " + error);
    throw error;
  }
  const stale = state.seq[kind] !== seq;
  const isJson = (response.headers.get("content-type") || "").includes("json");
  const data = isJson ? await response.json() : await response.blob();
  if (stale) throw new Error("stale");
  status("");
  if (!response.ok) {
    showError((data && data.error) || ("request failed: " + response.status));
    throw new Error("failed");
  }
  showError("");
  return data;
}

function ignore(error) { if (!["stale", "failed"].includes(error.message)) console.error(error); }
function api(path) { return "/api/" + encodeURIComponent(state.model.name) + path; }
function source() { return state.model.kind === "image" ? { image: state.image } : { text: state.text }; }
function checkedMethods() {
  return [...document.querySelectorAll("#method-choices input:checked")].map((box) => box.value);
}

function fillSelect(select, values, chosen) {
  clear(select);
  for (const [value, label] of values) {
    const option = el("option", { value: String(value) }, label);
    if (String(value) === String(chosen)) option.selected = true;
    select.appendChild(option);
  }
}

// ------------------------------------------------------------------------------------ setup
async function start() {
  state.info = await call("models", "/api/models");
  fillSelect($("model"), state.info.models.map((m) => [m.name, m.name + " (" + m.kind + ")"]));
  const choices = $("method-choices");
  for (const method of state.info.methods) {
    const label = el("label");
    const box = el("input", { type: "checkbox", value: method });
    box.checked = state.info.default_methods.includes(method);
    box.addEventListener("change", () => { fillMethodSelects(); explain(); });
    label.appendChild(box);
    label.appendChild(document.createTextNode(" " + method));
    choices.appendChild(label);
  }
  fillSelect($("generate-method"), state.info.methods.map((m) => [m, m]), "attnlrp");
  $("percent").max = 90;
  $("percent").step = state.info.whatif_step;
  $("new-tokens").max = state.info.max_new_tokens;
  $("model").addEventListener("change", chooseModel);
  $("upload").addEventListener("change", upload);
  $("canvas").addEventListener("change", pickCanvas);
  $("explain-text").addEventListener("click", explainText);
  $("generate").addEventListener("click", generate);
  $("class-select").addEventListener("change", () => chooseClass(Number($("class-select").value)));
  $("block").addEventListener("input", () => { $("block-value").textContent = $("block").value; inside(); });
  $("head").addEventListener("change", inside);
  $("inside-method").addEventListener("change", inside);
  $("row-cls").addEventListener("click", () => { state.row = 0; inside(); });
  $("percent").addEventListener("input", () => { $("percent-value").textContent = $("percent").value + "%"; whatif(); });
  $("whatif-method").addEventListener("change", whatif);
  for (const radio of document.querySelectorAll("input[name=mode]")) radio.addEventListener("change", whatif);
  for (const kind of ["png", "npy", "json", "html"]) $("export-" + kind).addEventListener("click", () => download(kind));
  const canvases = await call("canvases", "/api/canvases");
  for (const c of canvases.canvases) $("canvas").appendChild(el("option", { value: String(c.index) }, "canvas " + c.index + " (" + c.label + ")"));
  if (canvases.note) { $("canvas-note").textContent = canvases.note; $("canvas-note").hidden = false; }
  chooseModel();
  // set up: an interaction before this would be reset by chooseModel (the browser test waits for it)
  document.body.dataset.ready = "true";
}

function chooseModel() {
  state.model = state.info.models.find((m) => m.name === $("model").value);
  state.image = state.text = state.target = null;
  const kind = state.model.kind;
  $("image-input").hidden = kind !== "image";
  $("text-input").hidden = kind !== "text";
  $("generate-input").hidden = kind !== "generate";
  for (const id of ["classes-panel", "methods-panel", "inside-panel", "whatif-panel", "generation-panel"]) $(id).hidden = true;
  for (const id of ["classes", "maps", "inside", "curve", "generation"]) clear($(id));
  for (const id of ["input-image", "whatif-image", "kept-text"]) $(id).hidden = true;
  for (const id of ["prediction", "explained", "inside-note", "row-value"]) $(id).textContent = "";
  for (const kind of Object.keys(state.seq)) state.seq[kind] += 1;          // answers still on their way are dropped
  $("canvas").value = "";
  $("upload").value = "";
  $("percent").value = 0;
  $("percent-value").textContent = "0%";
  $("export-png").hidden = kind !== "image";
  fillSelect($("class-select"), state.model.labels.map((label, i) => [i, i + ": " + label]));
  const block = $("block");
  block.max = Math.max(0, state.model.blocks - 1);
  block.value = Math.max(0, state.model.blocks - 1);
  $("block-value").textContent = block.value;
  fillSelect($("head"), [["mean", "mean of heads"]].concat([...Array(state.model.heads).keys()].map((h) => [h, "head " + h])), "mean");
  fillMethodSelects();
  showError("");
}

function fillMethodSelects() {
  const methods = checkedMethods();
  const all = state.info.methods;
  const keep = (select, fallback) => {
    const current = select.value || fallback;
    fillSelect(select, (methods.length ? methods : all).map((m) => [m, m]), (methods.includes(current) ? current : methods[0]) || fallback);
  };
  keep($("inside-method"), "transformer_attribution");
  keep($("whatif-method"), "transformer_attribution");
  keep($("export-method"), "transformer_attribution");
}

// ------------------------------------------------------------------------------------ inputs
async function upload() {
  const file = $("upload").files[0];
  if (!file) return;
  if (file.size > state.info.max_upload_bytes) {
    showError("the file has " + file.size + " bytes, over this server's limit of " + state.info.max_upload_bytes);
    return;
  }
  try { newImage(await call("input", api("/upload"), file, true)); } catch (error) { ignore(error); }
}

async function pickCanvas() {
  const index = $("canvas").value;
  if (index === "") return;
  try { newImage(await call("input", api("/canvas/" + Number(index)), {})); } catch (error) { ignore(error); }
}

function newImage(data) {
  state.image = data.id;
  state.target = data.classes[0].index;
  state.row = 0;
  $("input-image").src = data.image;
  $("input-image").hidden = false;
  showClasses(data.classes);
  explain();
}

function explainText() {
  state.text = $("text").value;
  state.target = null;
  state.row = 0;
  explain();
}

// ------------------------------------------------------------------------------------ classes and maps
function showClasses(classes) {
  state.classes = classes;
  const box = $("classes");
  clear(box);
  for (const c of classes) {
    const button = el("button", { type: "button", "data-class": String(c.index) });
    if (c.index === state.target) button.classList.add("chosen");
    button.appendChild(el("span", {}, c.label));
    const bar = el("span", { class: "bar" });
    bar.style.width = Math.max(1, Math.round(100 * c.probability)) + "%";
    button.appendChild(bar);
    button.appendChild(el("span", {}, c.probability.toFixed(3)));
    button.addEventListener("click", () => chooseClass(c.index));
    box.appendChild(button);
  }
  $("class-select").value = String(state.target);
  $("classes-panel").hidden = false;
}

function chooseClass(index) {
  state.target = index;
  showClasses(state.classes);
  explain();
}

// Busy from the request until the inside view and what-if requests it triggers are on their way.
async function explain() {
  busy(+1);
  try { await explainNow(); } finally { busy(-1); }
}

async function explainNow() {
  if (!state.model || (state.image === null && state.text === null)) return;
  const methods = checkedMethods();
  if (!methods.length) { showError("choose at least one method"); return; }
  const started = performance.now();
  let data;
  try {
    data = await call("explain", api("/explain"), Object.assign(source(), { target: state.target, methods: methods }));
  } catch (error) { ignore(error); return; }
  state.target = data.target;
  showClasses(data.classes);
  $("explained").textContent = "explaining " + data.label + " · " + methods.length + " methods in "
    + Math.round(1000 * data.seconds) + " ms, on screen in " + Math.round(performance.now() - started) + " ms";
  const grid = $("maps");
  clear(grid);
  for (const entry of data.maps) {
    const figure = el("figure", { "data-method": entry.method });
    if (entry.overlay) {
      figure.appendChild(el("img", { src: entry.overlay, alt: entry.method + " map" }));
    } else {
      figure.appendChild(words(data.text, entry.words));
    }
    const flat = entry.finite !== false && entry.flat ? " (flat: all scores equal)" : "";
    figure.appendChild(el("figcaption", {}, entry.method + (entry.finite === false ? " (non-finite)" : flat)));
    grid.appendChild(figure);
  }
  $("word-score").hidden = state.model.kind !== "text";
  $("methods-panel").hidden = false;
  $("inside-panel").hidden = false;
  $("whatif-panel").hidden = false;
  document.body.dataset.rendered = String((Number(document.body.dataset.rendered) || 0) + 1);
  inside();
  whatif();
}

// The text with each word's background by its score (red positive, blue negative); hover shows it.
function words(text, list) {
  const box = el("p", { class: "words" });
  const peak = Math.max(1e-12, ...list.map((w) => Math.abs(w.relevance || 0)));
  let cursor = 0;
  for (const w of list) {
    box.appendChild(document.createTextNode(text.slice(cursor, w.start)));
    const span = el("span", { class: "w", title: w.relevance === null ? "n/a" : w.relevance.toPrecision(4) }, w.text);
    span.style.background = shade((w.relevance || 0) / peak);
    span.addEventListener("mouseenter", () => { $("word-score").textContent = w.text + ": " + span.title; });
    box.appendChild(span);
    cursor = w.end;
  }
  box.appendChild(document.createTextNode(text.slice(cursor)));
  return box;
}

function shade(value) {
  const fade = Math.round(255 * (1 - Math.min(1, Math.abs(value))));
  return value >= 0 ? "rgb(255," + fade + "," + fade + ")" : "rgb(" + fade + "," + fade + ",255)";
}

// ------------------------------------------------------------------------------------ inside the model
async function inside() {
  if (state.model.kind === "generate") return;
  const head = $("head").value;
  let data;
  try {
    data = await call("inside", api("/inside"), Object.assign(source(), {
      target: state.target, method: $("inside-method").value, block: Number($("block").value),
      head: head === "mean" ? "mean" : Number(head), row: state.row }));
  } catch (error) { ignore(error); return; }
  $("inside-note").textContent = data.note || "";
  $("row-value").textContent = "row: " + rowName(data)
    + (state.model.kind === "image" ? " · click a map to pick a patch's row" : " · click a token to pick its row");
  const box = $("inside");
  clear(box);
  for (const panel of data.panels) {
    const figure = el("figure", { class: "inside-figure", "data-panel": panel.name });
    if (panel.missing) {
      figure.appendChild(el("div", { class: "missing" }, panel.missing));
    } else if (panel.overlay) {
      const img = el("img", { src: panel.overlay, alt: panel.name + " row" });
      img.addEventListener("click", (event) => pickPatch(event, img, data));
      figure.appendChild(img);
    } else if (data.token_names) {
      figure.appendChild(tokenRow(data.token_names, panel.row));
    }
    if (panel.matrix) {
      const matrix = el("img", { src: panel.matrix, alt: panel.name + " matrix", class: "matrix" });
      matrix.style.width = "192px";
      figure.appendChild(matrix);
    }
    figure.appendChild(el("figcaption", {}, panel.name + " · block " + data.block + " · " + (data.head === "mean" ? "head mean" : "head " + data.head)));
    box.appendChild(figure);
  }
  document.body.dataset.inside = String((Number(document.body.dataset.inside) || 0) + 1);
}

// The token whose row the panels show: a text token, [CLS] (a prefix token), or a patch of the grid.
function rowName(data) {
  if (data.token_names) return data.token_names[data.row];
  const prefix = data.grid ? data.tokens - data.grid[0] * data.grid[1] : -1;
  if (prefix < 0) return "token " + data.row;                 // a coarser grid (Swin's later stages)
  return data.row < prefix ? "[CLS]" : "patch " + (data.row - prefix);
}

function tokenRow(names, values) {
  const row = el("div", { class: "tokens" });
  const peak = Math.max(1e-12, ...values.map((v) => Math.abs(v || 0)));
  names.forEach((name, index) => {
    const span = el("span", { title: values[index] === null ? "n/a" : values[index].toPrecision(4) }, name);
    span.style.background = shade((values[index] || 0) / peak);
    if (index === state.row) span.classList.add("row");
    span.addEventListener("click", () => { state.row = index; inside(); });
    row.appendChild(span);
  });
  return row;
}

function pickPatch(event, img, data) {
  const rect = img.getBoundingClientRect();
  const [h, w] = data.grid;
  const col = Math.min(w - 1, Math.floor((event.clientX - rect.left) / rect.width * w));
  const line = Math.min(h - 1, Math.floor((event.clientY - rect.top) / rect.height * h));
  state.row = data.tokens - h * w + line * w + col;
  inside();
}

// ------------------------------------------------------------------------------------ what-if
async function whatif() {
  if (state.model.kind === "generate") return;
  const mode = document.querySelector("input[name=mode]:checked").value;
  let data;
  try {
    data = await call("whatif", api("/whatif"), Object.assign(source(), {
      target: state.target, method: $("whatif-method").value, percent: Number($("percent").value), mode: mode }));
  } catch (error) { ignore(error); return; }
  const last = data.curve[data.curve.length - 1];
  $("prediction").textContent = (data.percent ? data.percent + "% removed: " : "nothing removed: ") + "predicts " + last.label
    + " (p=" + last.probability.toFixed(3) + "); p(" + data.label + ") = " + last.target_probability.toFixed(3);
  if (data.image) { $("whatif-image").src = data.image; $("whatif-image").hidden = false; $("kept-text").hidden = true; }
  if (data.kept_text !== undefined) { $("kept-text").textContent = data.kept_text; $("kept-text").hidden = false; $("whatif-image").hidden = true; }
  drawCurve(data);
  document.body.dataset.whatif = String((Number(document.body.dataset.whatif) || 0) + 1);
}

function drawCurve(data) {
  const svg = $("curve");
  clear(svg);
  const ns = "http://www.w3.org/2000/svg";
  const W = 360, H = 180, left = 34, bottom = 24, top = 10, right = 10;
  const x = (p) => left + (W - left - right) * p / 90;
  const y = (v) => top + (H - top - bottom) * (1 - v);
  const line = (x1, y1, x2, y2) => { const l = document.createElementNS(ns, "line");
    Object.entries({ x1, y1, x2, y2, stroke: "#999" }).forEach(([k, v]) => l.setAttribute(k, v)); svg.appendChild(l); };
  const label = (tx, ty, text) => { const t = document.createElementNS(ns, "text"); t.setAttribute("x", tx);
    t.setAttribute("y", ty); t.setAttribute("font-size", "11"); t.textContent = text; svg.appendChild(t); };
  line(left, y(0), W - right, y(0)); line(left, y(0), left, y(1));
  label(2, y(1) + 4, "1.0"); label(2, y(0) + 4, "0.0"); label(x(0), H - 6, "0%"); label(x(90) - 20, H - 6, "90%");
  label(x(30), H - 6, "removed (" + data.mode + ")");
  const poly = document.createElementNS(ns, "polyline");
  poly.setAttribute("points", data.curve.map((p) => x(p.percent) + "," + y(p.target_probability)).join(" "));
  poly.setAttribute("fill", "none"); poly.setAttribute("stroke", "#c0392b"); poly.setAttribute("stroke-width", "2");
  svg.appendChild(poly);
  label(W - 150, top + 12, "p(" + data.label + ") as parts go");
}

// ------------------------------------------------------------------------------------ export
async function download(kind) {
  const body = Object.assign(source(), { target: state.target, method: $("export-method").value, methods: checkedMethods(),
    inside: { method: $("inside-method").value, block: Number($("block").value),
              head: $("head").value === "mean" ? "mean" : Number($("head").value), row: state.row },
    whatif: { method: $("whatif-method").value, percent: Number($("percent").value),
              mode: document.querySelector("input[name=mode]:checked").value } });
  let blob;
  try { blob = await call("export", api("/export/" + kind), body); } catch (error) { ignore(error); return; }
  const link = el("a", { href: URL.createObjectURL(blob),
    download: kind === "html" ? "relprop-report.html" : "relprop_" + $("export-method").value + "_class" + state.target + "." + kind });
  document.body.appendChild(link);
  link.click();
  link.remove();
}

// ------------------------------------------------------------------------------------ generation
async function generate() {
  let data;
  try {
    data = await call("generate", api("/explain"), { text: $("prompt").value, method: $("generate-method").value,
                                                     max_new_tokens: Number($("new-tokens").value) });
  } catch (error) { ignore(error); return; }
  $("generation-summary").textContent = data.method + " · " + data.seconds.toFixed(2) + " s";
  const table = $("generation");
  clear(table);
  const context = data.prompt_tokens.concat(data.generated_tokens.slice(0, -1)).map((t) => t.token);
  const head = el("tr");
  head.appendChild(el("th"));
  for (const token of context) head.appendChild(el("th", { class: "c" }, visible(token)));
  table.appendChild(head);
  data.generated_tokens.forEach((token, t) => {
    const row = el("tr");
    row.appendChild(el("th", {}, visible(token.token)));
    const values = data.matrix[t];
    const peak = Math.max(1e-12, ...values.map((v) => Math.abs(v || 0)));
    values.forEach((v, i) => {
      const cell = el("td", v === null ? { class: "out" } : { title: context[i] + ": " + v.toPrecision(4) });
      if (v !== null) cell.style.background = shade(v / peak);
      row.appendChild(cell);
    });
    table.appendChild(row);
  });
  $("generation-panel").hidden = false;
  document.body.dataset.rendered = String((Number(document.body.dataset.rendered) || 0) + 1);
}

function visible(token) { return token.trim() ? token : JSON.stringify(token); }

start().catch(ignore);
