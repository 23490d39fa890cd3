// The search page: pick or drop an image, POST it to /search, show the hits as cards.
// No framework and no external resources, so the page works offline. Server data is inserted
// with textContent only (never innerHTML).
// A server started with an API key answers 401 to clients without it (its own machine's too, unless
// started with --allow-loopback-without-key): the page then asks for the key, keeps it for this tab
// only (sessionStorage) and sends it as X-API-Key, loading the gallery pictures through fetch as well.
"use strict";

const $ = (id) => document.getElementById(id);
let limits = { max_upload_bytes: Infinity, metric: "cosine" };
let lastFile = null;

function apiKey() {
  return sessionStorage.getItem("deepmetric-api-key") || "";
}

function api(url, options = {}) {
  const key = apiKey();
  const headers = key ? { ...(options.headers || {}), "X-API-Key": key } : options.headers;
  return fetch(url, { ...options, headers });
}

function askForKey() {
  const form = $("key-form");
  form.hidden = false;
  form.onsubmit = (e) => {
    e.preventDefault();
    sessionStorage.setItem("deepmetric-api-key", $("key").value);
    form.hidden = true;
    loadHealth();
  };
}

async function showImage(img, url) {
  if (!apiKey()) {
    img.src = url;
    return;
  }
  const res = await api(url);
  if (res.ok) img.src = URL.createObjectURL(await res.blob());
}

function setStatus(text, isError) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", Boolean(isError));
}

async function loadHealth() {
  try {
    const res = await api("/health");
    if (res.status === 401) {
      $("index-info").textContent = "this server needs an API key";
      askForKey();
      return;
    }
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
    showImage(img, hit.image_url);
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
    const res = await api(`/search?top_k=${encodeURIComponent($("topk").value)}`, { method: "POST", body });
    if (res.status === 401) askForKey();
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
