// The minilm explorer: the next-token distribution through the sampler's stages, from
// POST /v1/distribution; generation streamed from POST /v1/completions. No framework, no build.
"use strict";

const SLIDERS = [ // name (the API field), label, range, default; `off` = the value that disables it
  { name: "temperature", label: "Temperature", min: 0, max: 2, step: 0.01, value: 1, note: "0 = greedy" },
  { name: "top_k", label: "Top-k", min: 0, max: 100, step: 1, value: 0, off: 0 },
  { name: "top_p", label: "Top-p", min: 0.01, max: 1, step: 0.01, value: 1, off: 1 },
  { name: "min_p", label: "Min-p", min: 0, max: 1, step: 0.01, value: 0, off: 0 },
  { name: "typical_p", label: "Typical-p", min: 0.01, max: 1, step: 0.01, value: 1, off: 1 },
  { name: "repetition_penalty", label: "Repetition penalty", min: 0.5, max: 2, step: 0.01, value: 1, off: 1 },
  { name: "presence_penalty", label: "Presence penalty", min: -2, max: 2, step: 0.05, value: 0, off: 0 },
  { name: "frequency_penalty", label: "Frequency penalty", min: -2, max: 2, step: 0.05, value: 0, off: 0 },
];
const ORDERS = { // as minilm.sampling.DEFAULT_ORDER and LLAMA_CPP_ORDER
  "default": ["bias", "repetition", "presence", "frequency", "temperature", "top-k", "top-p", "min-p", "typical"],
  "llama.cpp": ["bias", "repetition", "presence", "frequency", "top-k", "typical", "top-p", "min-p", "temperature"],
};
const STAGE_LABELS = { raw: "model (T = 1)" };
const TOP_N = 20;

const $ = (selector) => document.querySelector(selector);
const state = {
  promptIds: null,   // token ids when the prompt was built by clicking tokens; null: the text is the prompt
  table: null,       // the last /v1/distribution answer
  bias: new Map(),   // logit_bias key (token id or text) -> {label, value}
  busy: false, again: false,
  run: null,         // the generation on screen: {base, ids, controller}
  tips: new Map(),   // alternatives of generated tokens, by position and settings
};

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

function settings() {
  const out = { order: document.querySelector("input[name=order]:checked").value };
  for (const s of SLIDERS) out[s.name] = Number($(`#ctl-${s.name}`).value);
  out.logit_bias = Object.fromEntries([...state.bias].map(([key, b]) => [key, b.value]));
  return out;
}

async function distribution(prompt, topN) {
  const response = await post("/v1/distribution", { ...settings(), prompt, top_n: topN });
  return response.json();
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
// controls

function buildSliders() {
  const box = $("#sliders");
  for (const s of SLIDERS) {
    const div = document.createElement("div");
    div.className = "slider";
    div.innerHTML = `<div class="top"><label for="ctl-${s.name}">${s.label}</label><output id="out-${s.name}"></output></div>` +
      `<input id="ctl-${s.name}" type="range" min="${s.min}" max="${s.max}" step="${s.step}" value="${s.value}">`;
    box.append(div);
    div.querySelector("input").addEventListener("input", () => { showValue(s); refresh(); });
    showValue(s);
  }
}

function showValue(s) {
  const value = Number($(`#ctl-${s.name}`).value);
  const out = $(`#out-${s.name}`);
  const off = s.off !== undefined && value === s.off;
  out.textContent = off ? "off" : (s.step >= 1 ? String(value) : value.toFixed(2)) +
    (s.note && value === 0 ? ` (${s.note})` : "");
  out.className = off ? "off" : "";
}

function showChain() {
  const order = document.querySelector("input[name=order]:checked").value;
  $("#chain").textContent = ORDERS[order].join(" → ") + " → draw";
}

function setBias(key, label, value) {
  if (value === 0) state.bias.delete(key); else state.bias.set(key, { label, value });
  showBias();
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
  for (const s of SLIDERS) { $(`#ctl-${s.name}`).value = s.value; showValue(s); }
  document.querySelector("input[name=order][value=default]").checked = true;
  showChain();
  state.bias.clear();
  showBias();
  refresh();
}

// ---------------------------------------------------------------------------------------------
// generation: streamed tokens, coloured by their probability, alternatives on hover

function colour(p) { // red (unlikely) → amber → green (likely)
  return `hsl(${Math.round(120 * p)} ${80 - 25 * p}% ${84 - 4 * p}%)`;
}

async function generate() {
  stopGeneration();
  if (!state.table) return;
  const base = state.table.prompt_token_ids;
  const controller = new AbortController();
  const run = { base, ids: [], controller };
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
    max_tokens: Number($("#max-tokens").value) || 60, logprobs_mode: $("#logprobs-mode").value,
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
      output.dataset.state = "done";
      $("#generate").disabled = false;
      $("#stop").disabled = true;
    }
  }
}

function addToken(run, choice) {
  const id = choice.token_ids[0];
  const lp = choice.logprobs.token_logprobs[0];
  const p = Math.exp(lp);
  const span = document.createElement("span");
  span.className = "gen";
  span.textContent = choice.logprobs.tokens[0];
  span.style.background = colour(p);
  span.dataset.pos = String(run.ids.length);
  span.dataset.p = String(p);
  run.ids.push(id);
  span.addEventListener("mouseenter", () => showAlternatives(run, span));
  span.addEventListener("mouseleave", hideTooltipSoon);
  $("#output").append(span);
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
  const mode = $("#logprobs-mode").value === "raw" ? "raw (T = 1)" : "as sampled";
  tip.innerHTML = `<div class="head">p = ${fmt(Number(span.dataset.p))} ${mode} · loading alternatives…</div>`;
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
    className: "head",
    textContent: `p = ${fmt(Number(span.dataset.p))} ${mode} · alternatives (click to continue from there):`,
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

async function init() {
  buildSliders();
  showChain();
  $("#prompt").addEventListener("input", () => { state.promptIds = null; refresh(); });
  document.querySelectorAll("input[name=order]").forEach((r) => r.addEventListener("change", () => { showChain(); refresh(); }));
  $("#bias-add").addEventListener("click", addBiasFromEditor);
  $("#bias-token").addEventListener("keydown", (e) => { if (e.key === "Enter") addBiasFromEditor(); });
  $("#reset").addEventListener("click", reset);
  $("#generate").addEventListener("click", generate);
  $("#stop").addEventListener("click", stopGeneration);
  $("#tooltip").addEventListener("mouseenter", () => clearTimeout(hideTimer));
  $("#tooltip").addEventListener("mouseleave", hideTooltipSoon);
  try {
    const models = await (await fetch("/v1/models")).json();
    const m = models.data[0];
    $("#model-info").textContent = `${m.id} · vocabulary ${m.vocab_size} · context ${m.max_model_len}`;
  } catch (e) { /* the table says what matters */ }
  refresh();
}

init();
