// The minilm explorer: the next-token distribution through the sampler's stages (POST
// /v1/distribution), generation streamed from POST /v1/completions and coloured by probability or
// by rank (POST /v1/score), and two readings of a selected position: the logit lens (POST
// /v1/lens) and a temperature sweep (POST /v1/temperature_sweep). The sampler's knobs and stage
// orders come from the server (samplerSchema), so a new stage appears here by itself.
// No framework, no build.
"use strict";

const STAGE_LABELS = { raw: "model (T = 1)" };
const TOP_N = 20;    // rows of the next-token table
const LENS_TOP = 8;  // tokens per layer in the lens grid
const SWEEP_T = Array.from({ length: 39 }, (_, i) => Math.round(10 + 5 * i) / 100); // 0.1 .. 2
const RANK_BUCKETS = [ // GLTR's colours: the token is among the model's top 10, 100, 1000, or not
  { max: 10, label: "top 10", colour: "#b9f5a6" },
  { max: 100, label: "top 100", colour: "#ffe98a" },
  { max: 1000, label: "top 1000", colour: "#ffb1a3" },
  { max: Infinity, label: "beyond", colour: "#e3c2ff" },
];

const $ = (selector) => document.querySelector(selector);
const state = {
  schema: null,      // the sampler's description: knobs, stages, orders (samplerSchema)
  values: new Map(), // knob name -> its value on the page
  order: [],         // every stage name, in the order the page sends
  promptIds: null,   // token ids when the prompt was built by clicking tokens; null: the text is the prompt
  table: null,       // the last /v1/distribution answer
  bias: new Map(),   // logit_bias key (token id or text) -> {label, value}
  busy: false, again: false,
  run: null,         // the generation on screen: {base, ids, spans, ranks, controller}
  tips: new Map(),   // alternatives of generated tokens, by position and settings
  selected: null,    // the position the lens and the sweep read: {ids, chosen, label, span}
  lensKey: null,     // the token ids of the lens on screen
  readings: 0,       // the latest readings request (older answers are dropped)
};

// ---------------------------------------------------------------------------------------------
// the sampler's description: the one place that says where the knobs come from

// The knobs and stage orders as the server describes them (GET /v1/sampler_settings: the settings
// dataclass's describe()), so the page holds no copy of them and a new stage appears here by itself.
async function samplerSchema() {
  const response = await fetch("/v1/sampler_settings");
  if (!response.ok) throw new Error(`GET /v1/sampler_settings: ${response.status} ${response.statusText}`);
  return response.json();
}

// Knobs with a control of their own elsewhere: the logit bias editor, the stage order list.
const OWN_CONTROL = ["token_bias", "order"];

// ---------------------------------------------------------------------------------------------
// talking to the server

async function post(path, body, signal) {
  const response = await fetch(path, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body), signal,
  });
  if (!response.ok) {
    const answer = await response.json().catch(() => ({}));
    throw new Error(answer.error ? answer.error.message : `${response.status} ${response.statusText}`);
  }
  return response;
}

async function postJSON(path, body) { return (await post(path, body)).json(); }

function settings() { // the sampler fields of a request: every knob, the order, the logit bias
  const out = {};
  for (const k of knobs()) {
    const value = state.values.get(k.name);
    if (value !== null && value !== "") out[k.name] = value;
  }
  out.order = presetOf(state.order) || state.order;
  out.logit_bias = Object.fromEntries([...state.bias].map(([key, b]) => [key, b.value]));
  return out;
}

async function distribution(prompt, topN) {
  return postJSON("/v1/distribution", { ...settings(), prompt, top_n: topN });
}

// Refresh the bars; while a request is out, later changes wait for it and then go as one.
async function refresh() {
  if (state.busy) { state.again = true; return; }
  state.busy = true;
  $("#dist").dataset.busy = "true"; // settled (false) once the table shows the latest settings
  try {
    do {
      state.again = false;
      const prompt = state.promptIds || $("#prompt").value;
      if (!prompt.length) { showError("Type a prompt: at least one token is needed."); break; }
      try {
        render(await distribution(prompt, TOP_N));
        showError(null);
      } catch (e) {
        showError(e.message);
      }
    } while (state.again);
  } finally {
    state.busy = false;
    $("#dist").dataset.busy = "false";
  }
}

// ---------------------------------------------------------------------------------------------
// the distribution table

function visible(text) { // whitespace made visible, as in a token inspector
  if (text === "") return "∅";
  return text.replace(/ /g, "␣").replace(/\n/g, "↵").replace(/\t/g, "⇥");
}

function fmt(x, digits = 3) { return x.toFixed(digits); }

function render(table) {
  const promptChanged = !state.table || state.table.prompt_token_ids.join() !== table.prompt_token_ids.join();
  state.table = table;
  if (state.promptIds) $("#prompt").value = table.prompt;
  $("#prompt-info").textContent = `${table.prompt_token_ids.length} tokens`;
  const last = table.stages.length - 1;
  const head = ["<tr><th>token</th><th>id</th><th>logit</th>"];
  table.stages.forEach((s, i) => {
    head.push(`<th class="${i === last ? "final" : ""}"><span class="stage-name">${STAGE_LABELS[s.name] || s.name}</span>` +
      `<span class="stage-stats">${s.kept}/${table.vocab_size} kept · H ${fmt(s.entropy, 2)}</span></th>`);
  });
  $("#dist thead").innerHTML = head.join("") + "</tr>";
  const body = $("#dist tbody");
  body.replaceChildren(...table.tokens.map((t) => row(t, last)));
  $("#bias-choices").replaceChildren(...table.tokens.map((t) => {
    const option = document.createElement("option");
    option.value = String(t.id);
    option.label = `${visible(t.text)} (${t.id})`;
    return option;
  }));
  $("#dist").dataset.version = String(Number($("#dist").dataset.version) + 1);
  if (promptChanged || !state.selected) selectPrompt();
}

function row(t, last) {
  const tr = document.createElement("tr");
  tr.dataset.id = t.id;
  tr.className = (t.kept[last] ? "" : "removed") + (state.bias.has(String(t.id)) ? " biased" : "");
  tr.title = `append ${JSON.stringify(t.text)}`;
  const cells = t.probs.map((p, i) => {
    const removed = !t.kept[i];
    const width = removed ? 0 : Math.max(p * 100, p > 0 ? 0.5 : 0);
    return `<td class="${i === last ? "final" : ""}"><div class="cell${removed ? " removed" : ""}" data-p="${p}">` +
      `<div class="bar"><i style="width:${width}%"></i></div><span class="p">${removed ? "—" : fmt(p)}</span></div></td>`;
  });
  tr.innerHTML = `<td class="token"><span class="tok"></span><button class="ban" type="button" title="ban this token (bias -100)">⊘</button></td>` +
    `<td class="num">${t.id}</td><td class="num">${fmt(t.logit, 2)}</td>` + cells.join("");
  tr.querySelector(".tok").textContent = visible(t.text);
  tr.querySelector(".ban").addEventListener("click", (event) => {
    event.stopPropagation();
    setBias(String(t.id), visible(t.text), -100);
  });
  tr.addEventListener("click", () => appendToken(t.id));
  return tr;
}

function appendToken(id) {
  state.promptIds = state.table.prompt_token_ids.concat([id]);
  refresh();
}

function showError(message) {
  $("#error").hidden = !message;
  $("#error").textContent = message || "";
}

// ---------------------------------------------------------------------------------------------
// the knobs: one control per knob of the schema, grouped by stage (a stage's parameters show
// while its switch is on)

function label(name) { // top_k -> Top-k, dry_base -> DRY base
  const text = name.replace(/_([a-z])$/, "-$1").replace(/_/g, " ").replace(/\b(dry|xtc)\b/g, (s) => s.toUpperCase());
  return text[0].toUpperCase() + text.slice(1);
}

function isOn(k, value) { // whether this switch knob's value turns its stage on
  if (!k.off) return value !== null && value !== undefined && value !== "";
  if (k.off.at_most !== undefined && k.off.at_most !== null) return value > k.off.at_most;
  return JSON.stringify(value) !== JSON.stringify(k.off.equals);
}

function knobs() { return state.schema.knobs.filter((k) => !OWN_CONTROL.includes(k.type)); }

function stagesInUse() {
  const used = new Set(state.bias.size ? ["logit_bias"] : []);
  for (const k of knobs()) if (k.switch && isOn(k, state.values.get(k.name))) used.add(k.stage);
  return used;
}

function buildKnobs() {
  const box = $("#knobs");
  box.replaceChildren();
  const groups = new Map(); // stage -> its knobs, switch first
  for (const k of knobs()) {
    if (!groups.has(k.stage)) groups.set(k.stage, []);
    groups.get(k.stage)[k.switch ? "unshift" : "push"](k);
  }
  for (const [stage, knobs] of groups) {
    const group = document.createElement("div");
    group.className = "knob-group";
    group.dataset.stage = stage;
    for (const k of knobs) group.append(knobControl(k));
    box.append(group);
  }
  box.dataset.ready = "true";
  showKnobs();
}

function knobControl(k) {
  const div = document.createElement("div");
  div.className = "knob" + (k.switch ? "" : " param");
  div.dataset.knob = k.name;
  div.title = k.help || "";
  const id = `ctl-${k.name}`;
  div.innerHTML = `<label for="${id}">${label(k.name)}</label>`;
  let input;
  if ((k.type === "number" || k.type === "integer") && k.ui) {
    input = Object.assign(document.createElement("input"), { type: "range", min: k.ui.min, max: k.ui.max, step: k.ui.step });
  } else if (k.type === "choice") {
    input = document.createElement("select");
    for (const c of k.choices) input.append(new Option(String(c), String(c)));
  } else {
    input = Object.assign(document.createElement("input"), { type: k.type === "number" || k.type === "integer" ? "number" : "text" });
    if (k.type === "texts") input.placeholder = 'JSON list, e.g. ["\\n", ":"]';
    if (k.type === "prompt") input.placeholder = "text (empty: the default)";
  }
  input.id = id;
  input.value = shownValue(k, k.default);
  state.values.set(k.name, k.default);
  div.append(input, Object.assign(document.createElement("output"), { id: `out-${k.name}` }));
  input.addEventListener(input.tagName === "SELECT" ? "change" : "input", () => {
    try {
      state.values.set(k.name, readValue(k, input.value));
      input.classList.remove("invalid");
    } catch (e) {
      input.classList.add("invalid");
      return showError(`${k.name}: ${e.message}`);
    }
    showKnobs();
    if (k.name === "temperature") refreshReadings();
    refresh();
  });
  return div;
}

function shownValue(k, value) {
  if (k.type === "texts") return JSON.stringify(value || []);
  return value === null || value === undefined ? "" : String(value);
}

function readValue(k, raw) { // an input's text as the knob's JSON value
  if (k.type === "number" || k.type === "integer" || k.type === "choice") return Number(raw);
  if (k.type === "texts") {
    const list = JSON.parse(raw || "[]");
    if (!Array.isArray(list)) throw new Error("must be a JSON list of strings");
    return list;
  }
  return raw === "" ? null : raw;
}

function setKnob(k, value) {
  state.values.set(k.name, value);
  $(`#ctl-${k.name}`).value = shownValue(k, value);
}

function showKnobs() { // each knob's value, "off" on a switch at its no-op value, the parameters of the stages in use
  const used = stagesInUse();
  for (const k of knobs()) {
    const value = state.values.get(k.name);
    const out = $(`#out-${k.name}`);
    const off = k.switch && !isOn(k, value);
    out.textContent = off ? "off" : k.name === "temperature" && value === 0 ? "greedy" :
      k.type === "number" && k.ui ? value.toFixed(Math.max(0, -Math.floor(Math.log10(k.ui.step)))) :
      k.type === "texts" || k.type === "prompt" ? "" : String(value);
    out.className = off ? "off" : "";
    if (!k.switch) document.querySelector(`[data-knob="${k.name}"]`).hidden = !used.has(k.stage);
  }
  showOrder();
}

// ---------------------------------------------------------------------------------------------
// the stage order: a list to drag (as Artefact2's sampling visualiser), a preset in one click

function presetOf(order) {
  return Object.keys(state.schema.orders).find((name) => state.schema.orders[name].join() === order.join());
}

function pinned(stage) { // stages that the sampler runs first or last whatever the order
  return stage === state.schema.first_stage || stage === state.schema.last_stage;
}

function buildOrder() {
  const presets = $("#order-presets");
  presets.replaceChildren(...Object.keys(state.schema.orders).map((name) => {
    const button = Object.assign(document.createElement("button"),
      { type: "button", className: "secondary preset", textContent: name });
    button.dataset.order = name;
    button.addEventListener("click", () => { setOrder(state.schema.orders[name]); refresh(); });
    return button;
  }));
  const list = $("#stage-order");
  list.addEventListener("dragover", (event) => {
    const dragged = list.querySelector(".dragging");
    if (!dragged) return;
    event.preventDefault();
    const after = [...list.querySelectorAll("li:not(.dragging)")].find((li) => {
      const box = li.getBoundingClientRect();
      return event.clientY < box.top + box.height / 2;
    });
    if (after !== dragged.nextSibling) list.insertBefore(dragged, after || null);
  });
  list.addEventListener("drop", (event) => event.preventDefault());
  setOrder(state.schema.orders.default);
}

function setOrder(order) {
  const first = state.schema.first_stage, last = state.schema.last_stage;
  state.order = [...(order.includes(first) ? [first] : []),
    ...order.filter((s) => !pinned(s)), ...(order.includes(last) ? [last] : [])];
  const list = $("#stage-order");
  list.replaceChildren(...state.order.map((stage) => {
    const li = document.createElement("li");
    li.dataset.stage = stage;
    li.textContent = stage;
    li.tabIndex = 0;
    li.draggable = !pinned(stage);
    if (pinned(stage)) {
      li.dataset.pin = stage === first ? "first" : "last";
      li.title = `${stage} always runs ${li.dataset.pin}`;
    }
    li.addEventListener("dragstart", (event) => {
      li.classList.add("dragging");
      event.dataTransfer.effectAllowed = "move";
      event.dataTransfer.setData("text/plain", stage);
    });
    li.addEventListener("dragend", () => { li.classList.remove("dragging"); orderFromList(); });
    li.addEventListener("keydown", (event) => { // Alt + arrow keys move a stage without a mouse
      if (!event.altKey || pinned(stage) || !["ArrowUp", "ArrowDown"].includes(event.key)) return;
      event.preventDefault();
      const i = state.order.indexOf(stage), j = i + (event.key === "ArrowUp" ? -1 : 1);
      if (j < 0 || j >= state.order.length || pinned(state.order[j])) return;
      const order = [...state.order];
      [order[i], order[j]] = [order[j], order[i]];
      setOrder(order);
      $(`#stage-order li[data-stage="${stage}"]`).focus();
      refresh();
    });
    return li;
  }));
  showOrder();
}

function orderFromList() {
  const order = [...$("#stage-order").children].map((li) => li.dataset.stage);
  const changed = order.join() !== state.order.join();
  setOrder(order);
  if (changed) refresh();
}

function showOrder() {
  const used = stagesInUse();
  for (const li of $("#stage-order").children) li.classList.toggle("used", used.has(li.dataset.stage));
  const preset = presetOf(state.order);
  for (const b of document.querySelectorAll("#order-presets button")) b.classList.toggle("active", b.dataset.order === preset);
  $("#stage-order").dataset.preset = preset || "custom";
  const chain = state.order.filter((s) => used.has(s));
  $("#chain").textContent = (chain.length ? chain.join(" → ") : "model") + " → draw";
}

// ---------------------------------------------------------------------------------------------
// the logit bias

function setBias(key, label, value) {
  if (value === 0) state.bias.delete(key); else state.bias.set(key, { label, value });
  showBias();
  showOrder();
  refresh();
}

function showBias() {
  const list = $("#bias-list");
  list.replaceChildren(...[...state.bias].map(([k, b]) => {
    const li = document.createElement("li");
    li.textContent = `${b.label}${/^\d+$/.test(k) ? ` (${k})` : ""}: ${b.value}`;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "✕";
    remove.title = "remove";
    remove.addEventListener("click", () => setBias(k, b.label, 0));
    li.append(remove);
    return li;
  }));
}

function addBiasFromEditor() {
  const raw = $("#bias-token").value;
  if (!raw) return;
  const value = Math.max(-100, Math.min(100, Number($("#bias-value").value) || 0));
  const known = state.table && state.table.tokens.find((t) => String(t.id) === raw);
  setBias(raw, known ? visible(known.text) : (/^\d+$/.test(raw) ? `#${raw}` : visible(raw)), value);
  $("#bias-token").value = "";
}

function reset() {
  for (const k of knobs()) setKnob(k, k.default);
  setOrder(state.schema.orders.default);
  state.bias.clear();
  showBias();
  showKnobs();
  refreshReadings();
  refresh();
}

// ---------------------------------------------------------------------------------------------
// generation: streamed tokens, coloured by their probability or their rank, alternatives on hover

function colour(p) { // red (unlikely) → amber → green (likely)
  return `hsl(${Math.round(120 * p)} ${80 - 25 * p}% ${84 - 4 * p}%)`;
}

function rankBucket(rank) { return RANK_BUCKETS.find((b) => rank <= b.max); }

async function generate() {
  stopGeneration();
  if (!state.table) return;
  const base = state.table.prompt_token_ids;
  const controller = new AbortController();
  const run = { base, ids: [], spans: [], ranks: null, controller };
  state.run = run;
  state.tips.clear();
  const output = $("#output");
  output.replaceChildren(Object.assign(document.createElement("span"),
    { className: "prompt-text", textContent: state.table.prompt }));
  output.dataset.state = "running";
  $("#generate").disabled = true;
  $("#stop").disabled = false;
  const body = {
    ...settings(), prompt: base, stream: true, logprobs: 0, return_token_ids: true,
    max_tokens: Number($("#max-tokens").value) || 60,
    logprobs_mode: $("#colour-mode").value === "processed" ? "processed" : "raw",
  };
  if ($("#seed").value !== "") body.seed = Number($("#seed").value);
  try {
    const response = await post("/v1/completions", body, controller.signal);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        if (!event.startsWith("data: ") || event === "data: [DONE]") continue;
        const chunk = JSON.parse(event.slice(6));
        if (chunk.error) throw new Error(chunk.error.message);
        for (const choice of chunk.choices) addToken(run, choice);
      }
    }
    showError(null);
  } catch (e) {
    if (e.name !== "AbortError") showError(e.message);
  } finally {
    if (state.run === run) {
      if ($("#colour-mode").value === "rank") await colourRun(run);
      output.dataset.state = "done";
      $("#generate").disabled = false;
      $("#stop").disabled = true;
    }
  }
}

function addToken(run, choice) {
  const p = Math.exp(choice.logprobs.token_logprobs[0]);
  const span = document.createElement("span");
  span.className = "gen";
  span.textContent = choice.logprobs.tokens[0];
  span.dataset.pos = String(run.ids.length);
  span.dataset.p = String(p);
  run.ids.push(choice.token_ids[0]);
  run.spans.push(span);
  paint(span);
  span.addEventListener("mouseenter", () => showAlternatives(run, span));
  span.addEventListener("mouseleave", hideTooltipSoon);
  span.addEventListener("click", () => selectGenerated(run, span));
  $("#output").append(span);
}

function paint(span) { // the span's background in the current colour mode
  if ($("#colour-mode").value !== "rank") {
    span.style.background = colour(Number(span.dataset.p));
  } else {
    span.style.background = span.dataset.rank ? rankBucket(Number(span.dataset.rank)).colour : "#eef0f4";
  }
}

// The rank of each generated token in the model's distribution (T = 1) it was drawn from, as GLTR
// shows it: POST /v1/score reads each token with the window generation read it with.
async function colourRun(run) {
  if (!run.ranks && run.ids.length) {
    try {
      const scores = await postJSON("/v1/score", { prompt: run.base.concat(run.ids) });
      run.ranks = scores.tokens.slice(run.base.length - 1).map((t) => t.rank);
    } catch (e) {
      showError(e.message);
      return;
    }
  }
  run.spans.forEach((span, i) => { if (run.ranks) span.dataset.rank = String(run.ranks[i]); paint(span); });
}

async function colourModeChanged() {
  showLegend();
  const run = state.run;
  if (!run) return;
  if ($("#colour-mode").value === "rank" && $("#output").dataset.state === "done") {
    $("#output").dataset.state = "colouring";
    await colourRun(run);
    $("#output").dataset.state = "done";
  } else {
    run.spans.forEach(paint);
  }
}

function showLegend() {
  const legend = $("#legend");
  const hint = `<span class="muted">· hover a token for its alternatives, click one to continue from there; click a token for its lens</span>`;
  if ($("#colour-mode").value === "rank") {
    legend.innerHTML = RANK_BUCKETS.map((b) => `<span class="swatch" style="background:${b.colour}">${b.label}</span>`).join("") +
      `<span class="muted">rank at T = 1 (GLTR)</span>` + hint;
  } else {
    legend.innerHTML = `<span>p = 0</span><i class="gradient"></i><span>1</span>` + hint;
  }
}

function stopGeneration() {
  if (state.run) state.run.controller.abort();
}

let hideTimer = null;
function hideTooltipSoon() { hideTimer = setTimeout(() => { $("#tooltip").hidden = true; }, 250); }

async function showAlternatives(run, span) {
  clearTimeout(hideTimer);
  const pos = Number(span.dataset.pos);
  const tip = $("#tooltip");
  const box = span.getBoundingClientRect();
  tip.style.left = `${window.scrollX + box.left}px`;
  tip.style.top = `${window.scrollY + box.bottom + 6}px`;
  tip.hidden = false;
  const mode = $("#colour-mode").value === "processed" ? "as sampled" : "raw (T = 1)";
  const rank = span.dataset.rank ? ` · rank ${span.dataset.rank}` : "";
  const head = `p = ${fmt(Number(span.dataset.p))} ${mode}${rank}`;
  tip.innerHTML = `<div class="head">${head} · loading alternatives…</div>`;
  const key = `${pos} ${JSON.stringify(settings())}`;
  try {
    if (!state.tips.has(key)) state.tips.set(key, await distribution(run.base.concat(run.ids.slice(0, pos)), 8));
  } catch (e) {
    tip.replaceChildren(Object.assign(document.createElement("div"), { className: "head error", textContent: e.message }));
    return;
  }
  if (tip.hidden) return;
  const table = state.tips.get(key);
  const last = table.stages.length - 1;
  tip.replaceChildren(Object.assign(document.createElement("div"), {
    className: "head", textContent: `${head} · alternatives (click to continue from there):`,
  }));
  for (const t of table.tokens) {
    const alt = document.createElement("div");
    alt.className = "alt" + (t.id === run.ids[pos] ? " chosen" : "") + (t.kept[last] ? "" : " removed");
    alt.innerHTML = `<span class="tok"></span><div class="bar"><i style="width:${t.probs[last] * 100}%"></i></div>` +
      `<span>${t.kept[last] ? fmt(t.probs[last]) : "—"}</span><span class="muted">raw ${fmt(t.probs[0])}</span>`;
    alt.querySelector(".tok").textContent = visible(t.text);
    alt.addEventListener("click", () => continueFrom(run, pos, t.id));
    tip.append(alt);
  }
}

async function continueFrom(run, pos, id) {
  $("#tooltip").hidden = true;
  stopGeneration();
  state.promptIds = run.base.concat(run.ids.slice(0, pos), [id]);
  await refresh();
  generate();
}

// ---------------------------------------------------------------------------------------------
// the selected position: the prompt's next token, or a clicked generated token (the distribution
// it was drawn from); its logit lens and its temperature sweep

function selectPrompt() {
  if (state.selected && state.selected.span) state.selected.span.classList.remove("selected");
  state.selected = { ids: state.table.prompt_token_ids, chosen: null, span: null, label: "the prompt's next token" };
  refreshReadings();
}

function selectGenerated(run, span) {
  if (state.selected && state.selected.span) state.selected.span.classList.remove("selected");
  const pos = Number(span.dataset.pos);
  span.classList.add("selected");
  state.selected = {
    ids: run.base.concat(run.ids.slice(0, pos)), chosen: run.ids[pos], span,
    label: `generated token ${pos + 1} (${visible(span.textContent)}): the distribution it was drawn from`,
  };
  refreshReadings();
}

async function refreshReadings() {
  const selected = state.selected;
  if (!selected) return;
  const request = ++state.readings;
  const key = selected.ids.join();
  const lensNeeded = key !== state.lensKey || $("#lens").dataset.chosen !== String(selected.chosen);
  for (const el of [$("#lens"), $("#sweep")]) el.dataset.busy = "true";
  const temperature = state.values.get("temperature");
  try {
    const [lens, sweep] = await Promise.all([
      lensNeeded ? postJSON("/v1/lens", { prompt: selected.ids, top_n: LENS_TOP }) : null,
      postJSON("/v1/temperature_sweep", { prompt: selected.ids, temperatures: SWEEP_T.concat(temperature >= 0.01 ? [temperature] : []) }),
    ]);
    if (request !== state.readings) return; // a newer selection or temperature is on its way
    if (lens) renderLens(lens, selected);
    renderSweep(sweep, temperature);
  } catch (e) {
    if (request === state.readings) showError(e.message);
  } finally {
    if (request === state.readings) for (const el of [$("#lens"), $("#sweep")]) el.dataset.busy = "false";
  }
}

function heat(p) { // a cell's background: white (p = 0) to the accent (p = 1)
  return `hsl(243 75% ${Math.round(97 - 42 * Math.sqrt(p))}%)`;
}

function renderLens(lens, selected) {
  state.lensKey = selected.ids.join();
  const table = $("#lens");
  table.dataset.chosen = String(selected.chosen);
  $("#lens-where").textContent = `${selected.label} · position ${lens.position} (${visible(lens.token.token)})`;
  if (selected.span) {
    const back = Object.assign(document.createElement("button"), { type: "button", className: "link", textContent: "back to the prompt" });
    back.addEventListener("click", selectPrompt);
    $("#lens-where").append(" · ", back);
  }
  const n = lens.layers[0].top.length;
  $("#lens thead").innerHTML = `<tr><th>layer</th><th class="num">H</th><th class="num" title="rank of the model's choice ${JSON.stringify(lens.choice.token)} at this layer">rank</th>` +
    Array.from({ length: n }, (_, i) => `<th>${i + 1}</th>`).join("") + "</tr>";
  $("#lens tbody").replaceChildren(...lens.layers.map((layer) => {
    const tr = document.createElement("tr");
    tr.dataset.layer = String(layer.layer);
    tr.innerHTML = `<th>${layer.name}</th><td class="num">${fmt(layer.entropy, 2)}</td><td class="num">${layer.rank}</td>`;
    for (const t of layer.top) {
      const p = Math.exp(t.logprob);
      const td = document.createElement("td");
      td.className = "lens-cell" + (t.id === lens.choice.id ? " choice" : "") + (t.id === selected.chosen ? " chosen" : "");
      td.dataset.id = String(t.id);
      td.dataset.p = String(p);
      td.style.background = heat(p);
      td.style.color = p > 0.45 ? "#fff" : "";
      td.title = `${JSON.stringify(t.token)} p = ${fmt(p, 4)}`;
      td.innerHTML = `<span class="tok"></span><span class="p">${fmt(p, 2)}</span>`;
      td.querySelector(".tok").textContent = visible(t.token);
      tr.append(td);
    }
    return tr;
  }));
  table.dataset.version = String(Number(table.dataset.version) + 1);
}

const SWEEP_BOX = { left: 36, right: 284, top: 12, bottom: 168 }; // the plot inside the 320 x 200 view

function renderSweep(sweep, temperature) {
  const svg = $("#sweep");
  const n = SWEEP_T.length; // the curve; a last point, if any, is the current temperature
  const ts = sweep.temperatures.slice(0, n), hs = sweep.entropy.slice(0, n), ps = sweep.top_prob.slice(0, n);
  const hMax = Math.max(0.5, Math.ceil(Math.max(...hs) * 2) / 2);
  const { left, right, top, bottom } = SWEEP_BOX;
  const x = (t) => left + (right - left) * t / 2;
  const y = (v, max) => bottom - (bottom - top) * v / max;
  const line = (vs, max) => vs.map((v, i) => `${x(ts[i]).toFixed(1)},${y(v, max).toFixed(1)}`).join(" ");
  const parts = [];
  for (const t of [0, 0.5, 1, 1.5, 2]) {
    parts.push(`<line class="grid" x1="${x(t)}" x2="${x(t)}" y1="${top}" y2="${bottom}"/>`,
      `<text class="tick" x="${x(t)}" y="${bottom + 14}" text-anchor="middle">${t}</text>`);
  }
  for (const f of [0, 0.5, 1]) {
    parts.push(`<text class="tick entropy" x="${left - 5}" y="${y(f * hMax, 1 * hMax) + 4}" text-anchor="end">${(f * hMax).toFixed(1)}</text>`,
      `<text class="tick top" x="${right + 5}" y="${y(f, 1) + 4}">${f}</text>`);
  }
  parts.push(`<text class="axis" x="${(left + right) / 2}" y="${bottom + 28}" text-anchor="middle">temperature T</text>`,
    `<polyline class="entropy" points="${line(hs, hMax)}"/>`, `<polyline class="top" points="${line(ps, 1)}"/>`);
  ts.forEach((t, i) => parts.push(
    `<circle class="pt entropy" r="1.6" cx="${x(t).toFixed(1)}" cy="${y(hs[i], hMax).toFixed(1)}" data-t="${t}" data-v="${hs[i]}"/>`,
    `<circle class="pt top" r="1.6" cx="${x(t).toFixed(1)}" cy="${y(ps[i], 1).toFixed(1)}" data-t="${t}" data-v="${ps[i]}"/>`));
  if (temperature <= 2) parts.push(`<line class="now" x1="${x(temperature)}" x2="${x(temperature)}" y1="${top}" y2="${bottom}"/>`);
  svg.innerHTML = parts.join("");
  svg.dataset.hMax = String(hMax);
  svg.dataset.version = String(Number(svg.dataset.version) + 1);
  const top1 = visible(sweep.top_token.token);
  $("#sweep-readout").innerHTML = `<span class="key entropy">entropy (nats)</span> <span class="key top">p of the top token ${top1}</span><br>` +
    (sweep.temperatures.length > n
      ? `at T = ${temperature.toFixed(2)}: H = <b>${fmt(sweep.entropy[n])}</b> nats, top p = <b>${fmt(sweep.top_prob[n])}</b>`
      : `at T = 0 (greedy): the top token ${top1} always, H = 0`);
}

// ---------------------------------------------------------------------------------------------

async function init() {
  $("#prompt").addEventListener("input", () => { state.promptIds = null; refresh(); });
  $("#bias-add").addEventListener("click", addBiasFromEditor);
  $("#bias-token").addEventListener("keydown", (e) => { if (e.key === "Enter") addBiasFromEditor(); });
  $("#reset").addEventListener("click", reset);
  $("#generate").addEventListener("click", generate);
  $("#stop").addEventListener("click", stopGeneration);
  $("#colour-mode").addEventListener("change", colourModeChanged);
  $("#tooltip").addEventListener("mouseenter", () => clearTimeout(hideTimer));
  $("#tooltip").addEventListener("mouseleave", hideTooltipSoon);
  showLegend();
  try {
    state.schema = await samplerSchema();
  } catch (e) {
    return showError(`cannot read the sampler's settings: ${e.message}`);
  }
  buildKnobs();
  buildOrder();
  try {
    const models = await (await fetch("/v1/models")).json();
    const m = models.data[0];
    $("#model-info").textContent = `${m.id} · vocabulary ${m.vocab_size} · context ${m.max_model_len}`;
  } catch (e) { /* the table says what matters */ }
  refresh();
}

init();
