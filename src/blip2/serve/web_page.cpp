#include "blip2/serve/web_page.h"

namespace blip2::serve {

const std::string& index_html() {
  static const std::string page = R"HTML(<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>blip2 serve</title>
<style>
  :root { --fg: #1d232b; --muted: #5b6573; --line: #d5dae1; --accent: #2f6fde; --bg: #f5f6f8; --err: #b3261e; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg); background: var(--bg); }
  header { display: flex; flex-wrap: wrap; gap: .5rem 1.5rem; align-items: baseline; padding: .8rem 1.5rem;
           background: #fff; border-bottom: 1px solid var(--line); }
  header h1 { margin: 0; font-size: 1.2rem; }
  #status { color: var(--muted); font-size: .9rem; flex: 1; }
  .key { display: flex; gap: .4rem; align-items: center; font-size: .9rem; }
  .key input { width: 14rem; }
  main { display: grid; grid-template-columns: minmax(260px, 380px) 1fr; gap: 1.5rem; max-width: 1200px;
         margin: 0 auto; padding: 1.5rem; }
  @media (max-width: 760px) { main { grid-template-columns: 1fr; } }
  section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 1rem; margin-bottom: 1rem; }
  h2 { margin: 0 0 .6rem; font-size: 1rem; }
  label { display: block; margin: .5rem 0 .2rem; font-size: .9rem; font-weight: 600; }
  input, textarea { width: 100%; padding: .45rem .55rem; border: 1px solid var(--line); border-radius: 6px; font: inherit; }
  textarea { resize: vertical; }
  button { margin-top: .6rem; padding: .45rem 1rem; border: 0; border-radius: 6px; background: var(--accent);
           color: #fff; font: inherit; cursor: pointer; }
  button:disabled { opacity: .55; cursor: progress; }
  .row { display: flex; gap: .6rem; align-items: flex-end; }
  .row > :first-child { flex: 1; }
  .row .narrow { width: 6rem; }
  #drop { border: 2px dashed var(--line); border-radius: 8px; padding: 1rem; text-align: center; color: var(--muted); }
  #drop.over { border-color: var(--accent); background: #eef3fd; }
  #drop input { border: 0; padding: .3rem 0; }
  #preview { display: block; width: 100%; height: 320px; object-fit: contain; margin: .8rem auto 0; }
  #preview:not([src]) { display: none; }
  .out { margin-top: .8rem; min-height: 1.5rem; }
  #answer { padding: .6rem; background: var(--bg); border-radius: 6px; white-space: pre-wrap; }
  #answer[data-state=idle] { color: var(--muted); }
  [data-state=error] { color: var(--err); }
  .bar { display: grid; grid-template-columns: minmax(5rem, 10rem) 1fr 4.5rem; gap: .5rem; align-items: center; margin: .3rem 0; }
  .bar .name { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
  .track { height: 1.1rem; background: var(--bg); border-radius: 4px; overflow: hidden; }
  .fill { height: 100%; background: var(--accent); }
  .num { text-align: right; font-variant-numeric: tabular-nums; }
  table { width: 100%; border-collapse: collapse; }
  caption { caption-side: bottom; text-align: left; padding-top: .4rem; }
  th, td { padding: .3rem .5rem; border-bottom: 1px solid var(--line); text-align: left; }
</style>
</head>
<body>
<header>
  <h1>blip2 serve</h1>
  <div id="status" role="status" data-state="loading">server: checking…</div>
  <div class="key"><label for="api-key">API key</label>
    <input id="api-key" type="password" autocomplete="off" placeholder="optional"></div>
</header>
<main>
  <div>
    <section>
      <h2>Image</h2>
      <div id="drop">
        <label for="file">Choose an image or drop one here</label>
        <input id="file" type="file" accept="image/*">
        <img id="preview" alt="">
      </div>
    </section>
  </div>
  <div>
    <section>
      <h2>Caption or question</h2>
      <form id="caption-form">
        <div class="row">
          <div><label for="prompt">Prompt (empty: plain caption)</label>
            <input id="prompt" type="text" placeholder="Question: what is in the picture? Answer:"></div>
          <div class="narrow"><label for="max-tokens">Max tokens</label>
            <input id="max-tokens" type="number" value="30" min="1" max="512"></div>
        </div>
        <button id="caption-btn" type="submit">Caption</button>
      </form>
      <div id="answer" class="out" data-state="idle" aria-live="polite">The answer appears here.</div>
    </section>
    <section>
      <h2>Zero-shot classification</h2>
      <form id="classify-form">
        <label for="labels">Labels (comma-separated)</label>
        <input id="labels" type="text" value="cat, dog, car">
        <button id="classify-btn" type="submit">Classify</button>
      </form>
      <div id="bars" class="out" data-state="idle" aria-live="polite"></div>
    </section>
    <section>
      <h2>Image–text match</h2>
      <form id="match-form">
        <label for="texts">Texts (one per line)</label>
        <textarea id="texts" rows="3">a photo of a cat
a photo of a dog</textarea>
        <button id="match-btn" type="submit">Match</button>
      </form>
      <table id="matches" class="out" data-state="idle">
        <thead><tr><th scope="col">Text</th><th scope="col" class="num">ITM</th><th scope="col" class="num">ITC</th></tr></thead>
        <tbody></tbody>
        <caption aria-live="polite"></caption>
      </table>
    </section>
  </div>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let imageUrl = "";  // the chosen image as a data: URL

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

// The error message of a failed response: error.message from its JSON body, else the status.
async function failure(res) {
  const text = await res.text();
  try {
    const j = JSON.parse(text);
    if (j && j.error && j.error.message) return new Error(j.error.message);
  } catch (e) { /* not JSON */ }
  return new Error("HTTP " + res.status + (res.statusText ? " " + res.statusText : ""));
}

async function postJson(path, body) {
  const res = await fetch(path, { method: "POST", headers: headers(true), body: JSON.stringify(body) });
  if (!res.ok) throw await failure(res);
  return res.json();
}

function setState(el, state, text) {
  el.dataset.state = state;
  if (text !== undefined) el.textContent = text;
}

// Runs task() with the button disabled; a second press while it runs does nothing.
async function busy(button, task) {
  if (button.disabled) return;
  button.disabled = true;
  try { await task(); } finally { button.disabled = false; }
}

// ---- status line ----
async function refreshStatus() {
  const el = $("status");
  try {
    const h = await fetch("/health", { headers: headers(false) });
    if (h.status === 503) {
      setState(el, "loading", "GET /health: loading the models…");
      setTimeout(refreshStatus, 1000);
      return;
    }
    if (!h.ok) throw await failure(h);
    const health = (await h.json()).status || "ok";
    const models = await fetch("/v1/models", { headers: headers(false) });
    if (!models.ok) throw await failure(models);
    const ids = ((await models.json()).data || []).map((m) => m.id);
    setState(el, "ok", "GET /health: " + health + " · models: " + (ids.join(", ") || "none"));
  } catch (e) {
    setState(el, "error", "server: " + e.message);
  }
}

// ---- image ----
function loadFile(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    alert(file.name + " is not an image");
    return;
  }
  const reader = new FileReader();
  reader.onload = () => {
    imageUrl = reader.result;
    $("preview").alt = "the chosen image, " + file.name;
    $("preview").src = imageUrl;
  };
  reader.onerror = () => alert("cannot read " + file.name);
  reader.readAsDataURL(file);
}

function needImage(out) {
  if (imageUrl) return true;
  setState(out, "error", "Choose an image first.");
  return false;
}

// ---- caption: the chat endpoint, streamed ----
async function caption() {
  const out = $("answer");
  if (!needImage(out)) return;
  const body = {
    messages: [{ role: "user", content: [
      { type: "text", text: $("prompt").value },
      { type: "image_url", image_url: { url: imageUrl } }] }],
    stream: true,
  };
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (Number.isFinite(maxTokens)) body.max_tokens = maxTokens;
  setState(out, "streaming", "");
  out.dataset.events = "0";
  try {
    const res = await fetch("/v1/chat/completions", { method: "POST", headers: headers(true), body: JSON.stringify(body) });
    if (!res.ok) throw await failure(res);
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "", finished = false;
    while (!finished) {
      const { value, done } = await reader.read();
      buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
      let nl;
      while (!finished && (nl = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, nl).replace(/\r$/, "");
        buffer = buffer.slice(nl + 1);
        if (!line.startsWith("data:")) continue;  // blank separators, comments, other fields
        const data = line.slice(5).replace(/^ /, "");
        if (data === "[DONE]") { finished = true; break; }
        const chunk = JSON.parse(data);
        out.dataset.events = String(Number(out.dataset.events || 0) + 1);  // server-sent events read
        if (chunk.error) throw new Error(chunk.error.message || "the stream failed");
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) out.textContent += delta.content;
      }
      if (done) break;
    }
    if (!finished) throw new Error("the stream ended without [DONE]");
    reader.cancel().catch(() => {});
    out.dataset.state = "done";
  } catch (e) {
    setState(out, "error", e.message);
  }
}

// ---- zero-shot classification ----
async function classify() {
  const out = $("bars");
  if (!needImage(out)) return;
  const labels = $("labels").value.split(",").map((s) => s.trim()).filter((s) => s);
  if (!labels.length) { setState(out, "error", "Type at least one label."); return; }
  setState(out, "loading", "Classifying…");
  try {
    const j = await postJson("/v1/classify", { image: imageUrl, candidate_labels: labels });
    out.textContent = "";
    for (const r of j.results) {
      const pct = Math.min(100, Math.max(0, r.score * 100));
      const bar = document.createElement("div");
      bar.className = "bar";
      bar.dataset.label = r.label;
      bar.dataset.score = String(r.score);
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = r.label;
      name.title = r.label;
      const track = document.createElement("div");
      track.className = "track";
      track.setAttribute("aria-hidden", "true");
      const fill = document.createElement("div");
      fill.className = "fill";
      fill.style.width = pct + "%";
      track.append(fill);
      const value = document.createElement("span");
      value.className = "num";
      value.textContent = pct.toFixed(1) + "%";
      bar.append(name, track, value);
      out.append(bar);
    }
    out.dataset.state = "done";
  } catch (e) {
    setState(out, "error", e.message);
  }
}

// ---- image-text matching ----
async function match() {
  const table = $("matches"), rows = table.tBodies[0], note = table.caption;
  rows.textContent = "";
  note.textContent = "";
  if (!imageUrl) { setState(table, "error"); note.textContent = "Choose an image first."; return; }
  const texts = $("texts").value.split("\n").map((s) => s.trim()).filter((s) => s);
  if (!texts.length) { setState(table, "error"); note.textContent = "Type at least one text."; return; }
  setState(table, "loading");
  note.textContent = "Matching…";
  try {
    const j = await postJson("/v1/match", { image: imageUrl, texts: texts });
    for (const r of j.results) {
      const tr = rows.insertRow();
      tr.className = "match";
      tr.dataset.text = r.text;
      tr.dataset.itm = String(r.itm_score);
      tr.dataset.itc = String(r.itc_score);
      tr.insertCell().textContent = r.text;
      const itm = tr.insertCell(), itc = tr.insertCell();
      itm.className = itc.className = "num";
      itm.textContent = r.itm_score.toFixed(3);
      itc.textContent = r.itc_score.toFixed(3);
    }
    note.textContent = "ITM: probability that the text matches; ITC: best query–text cosine.";
    table.dataset.state = "done";
  } catch (e) {
    setState(table, "error");
    note.textContent = e.message;
  }
}

// ---- wiring ----
$("file").addEventListener("change", (e) => loadFile(e.target.files[0]));
const drop = $("drop");
for (const type of ["dragenter", "dragover"])
  drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  loadFile(e.dataTransfer.files[0]);
});
function onSubmit(form, button, task) {
  $(form).addEventListener("submit", (e) => { e.preventDefault(); busy($(button), task); });
}
onSubmit("caption-form", "caption-btn", caption);
onSubmit("classify-form", "classify-btn", classify);
onSubmit("match-form", "match-btn", match);
$("api-key").addEventListener("change", refreshStatus);
refreshStatus();
</script>
</body>
</html>
)HTML";
  return page;
}

}  // namespace blip2::serve
