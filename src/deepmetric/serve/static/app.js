// The search page: pick or drop an image, POST it to /search, show the hits as cards.
// No framework and no external resources, so the page works offline. Server data is inserted
// with textContent only (never innerHTML).
"use strict";

const $ = (id) => document.getElementById(id);
let limits = { max_upload_bytes: Infinity, metric: "cosine" };
let lastFile = null;

function setStatus(text, isError) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", Boolean(isError));
}

async function loadHealth() {
  try {
    const res = await fetch("/health");
    const h = await res.json();
    limits = { max_upload_bytes: h.max_upload_bytes, metric: h.index.metric };
    const mode = h.index.mode === "centroids" ? " class centroids" : " images";
    $("index-info").textContent =
      `${h.index.count}${mode} · ${h.index.backend} · ${h.index.metric} · model ${h.runtime}, ${h.embedding_dim}-d`;
  } catch (err) {
    $("index-info").textContent = "service not reachable";
  }
}

function card(hit, metric) {
  const div = document.createElement("div");
  div.className = "result-card";
  div.dataset.id = hit.id;
  if (hit.image_url) {
    const img = document.createElement("img");
    img.src = hit.image_url;
    img.alt = hit.name || `item ${hit.id}`;
    img.loading = "lazy";
    div.appendChild(img);
  }
  const meta = document.createElement("div");
  meta.className = "meta";
  const label = document.createElement("div");
  label.className = "label";
  label.textContent = `#${hit.rank} ${hit.label_name ?? (hit.label >= 0 ? `label ${hit.label}` : "unlabelled")}`;
  const score = document.createElement("div");
  score.className = "score";
  score.textContent = `${metric === "cosine" ? "similarity" : "distance"} ${hit.score.toFixed(4)}`;
  const name = document.createElement("div");
  name.className = "name";
  name.textContent = hit.name || "";
  meta.append(label, score, name);
  div.appendChild(meta);
  return div;
}

async function search(file) {
  const results = $("results");
  if (!file) return;
  lastFile = file;
  if (file.size > limits.max_upload_bytes) {
    setStatus(`${file.name} is ${file.size} bytes, above the upload limit of ${limits.max_upload_bytes}`, true);
    return;
  }
  const preview = $("query-preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  setStatus(`searching for ${file.name}…`);
  const body = new FormData();
  body.append("file", file, file.name);
  try {
    const res = await fetch(`/search?top_k=${encodeURIComponent($("topk").value)}`, { method: "POST", body });
    const data = await res.json().catch(() => ({ detail: res.statusText }));
    if (!res.ok) {
      results.replaceChildren();
      setStatus(`error ${res.status}: ${data.detail}`, true);
      return;
    }
    results.replaceChildren(...data.hits.map((h) => card(h, data.metric)));
    setStatus(`${data.hits.length} results (${data.score_meaning}) in ${data.took_ms.toFixed(1)} ms`);
  } catch (err) {
    setStatus(`request failed: ${err}`, true);
  }
}

const drop = $("drop");
["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => {
  e.preventDefault();
  drop.classList.add("over");
}));
["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (e) => {
  e.preventDefault();
  drop.classList.remove("over");
}));
drop.addEventListener("drop", (e) => search(e.dataTransfer.files[0]));
$("file").addEventListener("change", (e) => search(e.target.files[0]));
$("topk").addEventListener("change", () => search(lastFile));
loadHealth();
