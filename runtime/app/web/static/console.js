// dmf-run's web console. Every request goes to this console's own REST API (docs/web.md); the page
// loads nothing from anywhere else. Names from the gallery are only ever set as text, never as HTML.
"use strict";

const PAGE = 24;            // classes per gallery page
const COUNTDOWN = 3;        // seconds counted down before a press-and-hold takes shots
const SHOT_EVERY_MS = 400;  // one live shot this often while the button is held
const EVENTS_KEPT = 40;

const $ = (id) => document.getElementById(id);
const state = { offset: 0, total: 0, version: -1, shotsTarget: 5, label: undefined };

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node[key] = value;
  }
  for (const child of children) node.append(child);
  return node;
}

function toast(text, ok = false) {
  const box = $("toast");
  box.textContent = text;
  box.className = ok ? "ok" : "";
  box.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { box.hidden = true; }, 4000);
}

async function api(method, path, body) {
  const options = { method, headers: {}, credentials: "same-origin" };
  if (body instanceof FormData) options.body = body;
  else if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(data.detail || `${response.status} ${response.statusText}`);
    error.name = data.error || "error";
    throw error;
  }
  return { data, response };
}

function barFill(percent) {
  const fill = el("span");
  fill.style.width = `${percent}%`;  // CSSOM, which the console's Content-Security-Policy allows
  return fill;
}

const classPath = (name) => `/api/classes/${encodeURIComponent(name)}`;
const score = (value) => (value === null || value === undefined ? "-" : value.toFixed(3));

// ----- status strip and controls -------------------------------------------------------------------
async function refreshState() {
  let s;
  try {
    s = (await api("GET", "/api/state")).data;
  } catch (error) {
    $("status-live").textContent = "offline";
    $("status-live").className = "pill off";
    return;
  }
  $("status-live").textContent = s.paused ? "paused" : s.source_ended ? "source ended" : "live";
  $("status-live").className = s.paused || s.source_ended ? "pill warn" : "pill";
  $("status-fps").textContent = `${s.fps.toFixed(1)} fps`;
  $("status-classify").textContent = `classify ${s.classify_ms.toFixed(1)} ms`;
  $("status-stream").textContent = s.stream_latency_ms === null ? "view - ms" : `view ${s.stream_latency_ms} ms`;
  $("status-backend").textContent = s.backend;
  $("status-model").textContent = s.model;
  $("status-model").title = s.bundle;
  $("status-gallery").textContent = s.gallery || "";
  $("unsaved").hidden = !s.unsaved;
  $("undo").hidden = !s.can_undo;
  $("pause").setAttribute("aria-pressed", String(s.paused));
  $("pause").textContent = s.paused ? "Resume" : "Pause";
  $("explain").setAttribute("aria-pressed", String(s.explain));
  $("explain").disabled = !s.explain_available;
  const slider = $("sensitivity");
  slider.disabled = s.threshold !== null;
  if (document.activeElement !== slider) slider.value = s.sensitivity;
  $("sensitivity-value").textContent = Number(slider.value).toFixed(2);
  state.shotsTarget = s.shots;
  if (s.version !== state.version) {
    state.version = s.version;
    loadGallery();
  }
}

async function setControl(change) {
  try {
    await api("PATCH", "/api/state", change);
  } catch (error) {
    toast(error.message);
  }
  refreshState();
}

// ----- live recognition (from the event stream) ----------------------------------------------------
let pending = null;
function showPrediction(p) {
  pending = p;
  if (showPrediction.queued) return;
  showPrediction.queued = true;
  requestAnimationFrame(() => {
    showPrediction.queued = false;
    const q = pending;
    const label = $("label");
    const known = q.label !== null;
    label.textContent = known ? q.label : q.top.length ? "unknown" : "no classes yet";
    label.className = known ? "label" : "label unknown";
    $("score").textContent = known ? `score ${score(q.score)}` : "";
    $("reason").textContent = known ? "" : q.reason || "";
    const best = q.top.length ? Math.max(q.top[0][1], 1e-12) : 1;
    const bars = $("top");
    bars.className = known ? "bars" : "bars unknown";
    bars.replaceChildren(...q.top.map(([name, value], i) => {
      const width = Math.max(0, Math.min(1, value / best)) * 100;
      return el("li", { className: i === 0 && known ? "best" : "" },
        el("div", { className: "row" }, el("span", { textContent: name }), el("span", { className: "dim", textContent: score(value) })),
        el("div", { className: "bar" }, barFill(width)));
    }));
    if (q.label !== state.label) {
      if (state.label !== undefined) logEvent({ event: "recognition", label: q.label, score: q.score });
      state.label = q.label;
    }
  });
}

function logEvent(e) {
  const parts = [];
  for (const [key, value] of Object.entries(e)) {
    if (key === "event" || key === "classes") continue;
    const shown = typeof value === "number" && !Number.isInteger(value) ? value.toFixed(3)
      : typeof value === "object" ? JSON.stringify(value) : value;
    parts.push(`${key} ${shown}`);
  }
  const item = el("li", { className: e.event === "error" ? "error" : "" },
    el("span", { className: "kind", textContent: e.event }), parts.join(", "));
  const list = $("events");
  list.prepend(item);
  while (list.children.length > EVENTS_KEPT) list.lastChild.remove();
}

function listen() {
  const source = new EventSource("/api/events");
  source.onmessage = (message) => {
    const e = JSON.parse(message.data);
    if (!("event" in e)) { showPrediction(e); return; }
    logEvent(e);
    if (["enrolled", "removed", "renamed", "restored", "saved"].includes(e.event)) refreshState();
  };
}

// ----- the live view (MJPEG: an <img>; reconnects if the stream ends) ------------------------------
function watchLive() {
  const image = $("live");
  image.addEventListener("error", () => {
    setTimeout(() => { image.src = `/stream.mjpg?t=${Date.now()}`; }, 2000);
  });
}

// ----- enrol: press and hold, or upload ------------------------------------------------------------
function enrolName() {
  const name = $("enrol-name").value.trim();
  if (!name) { toast("Type a class name first."); $("enrol-name").focus(); }
  return name;
}

function addShot(src) {
  const shots = $("shots");
  shots.append(el("img", { src, alt: "shot" }));
  while (shots.children.length > 12) shots.firstChild.remove();
}

function setupHold() {
  const button = $("hold");
  const idle = button.textContent;
  let holding = false;
  let timer = null;

  async function takeShots(name, taken) {
    if (!holding) return;
    if (taken >= state.shotsTarget) { stop(`${taken} shots of ${name}`); return; }
    button.textContent = `Taking shots... ${taken}/${state.shotsTarget}`;
    try {
      const { data } = await api("POST", `${classPath(name)}/snap`);
      addShot(data.shot);
      taken += 1;
    } catch (error) {
      stop(null);
      toast(error.message);
      return;
    }
    timer = setTimeout(() => takeShots(name, taken), SHOT_EVERY_MS);
  }

  function countdown(name, left) {
    if (!holding) return;
    if (left === 0) { $("shots").replaceChildren(); takeShots(name, 0); return; }
    button.textContent = `Hold still... ${left}`;
    timer = setTimeout(() => countdown(name, left - 1), 1000);
  }

  function stop(message) {
    holding = false;
    clearTimeout(timer);
    button.classList.remove("holding");
    button.textContent = idle;
    if (message) toast(message, true);
  }

  button.addEventListener("pointerdown", (event) => {
    const name = enrolName();
    if (!name) return;
    button.setPointerCapture(event.pointerId);
    holding = true;
    button.classList.add("holding");
    countdown(name, COUNTDOWN);
  });
  for (const kind of ["pointerup", "pointercancel"]) button.addEventListener(kind, () => { if (holding) stop(null); });
}

async function upload() {
  const name = enrolName();
  const files = $("upload-input").files;
  if (!name) return;
  if (!files.length) { toast("Choose one or more images first."); return; }
  const form = new FormData();
  for (const file of files) form.append("image", file);
  try {
    const { data } = await api("POST", `${classPath(name)}/shots`, form);
    toast(`${data.name} now has ${data.shots} shot${data.shots === 1 ? "" : "s"}`, true);
    $("upload-input").value = "";
  } catch (error) {
    toast(error.message);
  }
  refreshState();
}

// ----- the gallery ---------------------------------------------------------------------------------
async function loadGallery() {
  let data, response;
  try {
    ({ data, response } = await api("GET", `/api/classes?offset=${state.offset}&limit=${PAGE}`));
  } catch (error) {
    return;
  }
  state.total = Number(response.headers.get("X-Total-Count") || data.length);
  if (!data.length && state.offset > 0) {
    state.offset = Math.max(0, state.offset - PAGE);
    return loadGallery();
  }
  $("class-count").textContent = state.total;
  const pages = Math.max(1, Math.ceil(state.total / PAGE));
  $("page").textContent = `page ${Math.floor(state.offset / PAGE) + 1} of ${pages}`;
  $("prev").disabled = state.offset === 0;
  $("next").disabled = state.offset + PAGE >= state.total;
  const grid = $("gallery");
  if (!data.length) {
    grid.replaceChildren(el("div", { className: "empty", textContent: "No classes yet: enrol one from the live view or an upload." }));
  } else {
    grid.replaceChildren(...data.map(classCard));
  }
  $("class-names").replaceChildren(...data.map((c) => el("option", { value: c.name })));
}

function classCard(c) {
  const name = el("div", { className: "name", textContent: c.name });
  const card = el("div", { className: "class-card", dataset: { name: c.name } },
    el("img", { src: c.thumbnail, alt: c.name, loading: "lazy" }),
    name,
    el("div", { className: "dim small shots-count", textContent: `${c.shots} shot${c.shots === 1 ? "" : "s"}` }));
  const actions = el("div", { className: "actions" },
    el("button", { type: "button", className: "rename-button", textContent: "Rename", onclick: () => startRename(card, c.name) }),
    el("button", { type: "button", className: "delete-button danger", textContent: "Delete", onclick: () => remove(c.name) }));
  card.append(actions);
  return card;
}

function startRename(card, old) {
  const input = el("input", { className: "rename-input", value: old, maxLength: 64 });
  const name = card.querySelector(".name");
  name.replaceWith(input);
  input.focus();
  input.select();
  input.addEventListener("keydown", async (event) => {
    if (event.key === "Escape") { input.replaceWith(name); return; }
    if (event.key !== "Enter") return;
    const wanted = input.value.trim();
    if (!wanted || wanted === old) { input.replaceWith(name); return; }
    try {
      await api("PATCH", classPath(old), { name: wanted });
      toast(`renamed ${old} to ${wanted}`, true);
    } catch (error) {
      toast(error.message);
    }
    refreshState();
  });
}

async function remove(name) {
  try {
    await api("DELETE", classPath(name));
    toast(`deleted ${name}: Undo puts it back until you save`, true);
  } catch (error) {
    toast(error.message);
  }
  refreshState();
}

// ----- the unknown inbox ---------------------------------------------------------------------------
async function loadUnknowns() {
  let data;
  try {
    data = (await api("GET", "/api/unknowns")).data;
  } catch (error) {
    return;
  }
  $("unknown-count").textContent = data.length;
  if ($("panel-unknown").hidden) return;
  const grid = $("unknowns");
  const shown = new Set([...grid.querySelectorAll(".unknown-card")].map((n) => Number(n.dataset.id)));
  if (data.length === shown.size && data.every((u) => shown.has(u.id))) return;
  if (grid.contains(document.activeElement)) return;  // someone is typing a name: do not redraw
  grid.replaceChildren(...(data.length ? data.map(unknownCard) : [el("div", { className: "empty", textContent: "No unknown frames lately." })]));
}

function unknownCard(u) {
  const input = el("input", { placeholder: "class name", maxLength: 64 });
  input.setAttribute("list", "class-names");
  const card = el("div", { className: "unknown-card", dataset: { id: u.id } },
    el("img", { src: `/api/unknowns/${u.id}/image`, alt: "unknown frame", loading: "lazy" }),
    el("div", { className: "dim small", textContent: new Date(u.time * 1000).toLocaleTimeString() }),
    input,
    el("div", { className: "actions" },
      el("button", { type: "button", textContent: "Assign", onclick: () => assign(u.id, input.value.trim()) }),
      el("button", { type: "button", textContent: "Dismiss", onclick: () => dismiss(u.id) })));
  return card;
}

async function assign(id, name) {
  if (!name) { toast("Type the class this frame shows."); return; }
  try {
    const { data } = await api("POST", `/api/unknowns/${id}/assign`, { name });
    toast(`${data.name} now has ${data.shots} shot${data.shots === 1 ? "" : "s"}`, true);
  } catch (error) {
    toast(error.message);
  }
  $("unknowns").replaceChildren();
  loadUnknowns();
  refreshState();
}

async function dismiss(id) {
  try { await api("DELETE", `/api/unknowns/${id}`); } catch (error) { toast(error.message); }
  $("unknowns").replaceChildren();
  loadUnknowns();
}

function showTab(which) {
  for (const tab of ["gallery", "unknown"]) {
    $(`tab-${tab}`).setAttribute("aria-selected", String(tab === which));
    $(`panel-${tab}`).hidden = tab !== which;
  }
  if (which === "unknown") loadUnknowns();
}

// ----- start ---------------------------------------------------------------------------------------
function start() {
  $("save").addEventListener("click", async () => {
    try {
      const { data } = await api("POST", "/api/save");
      toast(`saved ${data.classes} classes to ${data.path}`, true);
    } catch (error) { toast(error.message); }
    refreshState();
  });
  $("undo").addEventListener("click", async () => {
    try {
      const { data } = await api("POST", "/api/undo");
      toast(`restored ${data.name}`, true);
    } catch (error) { toast(error.message); }
    refreshState();
  });
  $("pause").addEventListener("click", () => setControl({ paused: $("pause").getAttribute("aria-pressed") !== "true" }));
  $("explain").addEventListener("click", () => setControl({ explain: $("explain").getAttribute("aria-pressed") !== "true" }));
  $("sensitivity").addEventListener("input", () => { $("sensitivity-value").textContent = Number($("sensitivity").value).toFixed(2); });
  $("sensitivity").addEventListener("change", () => setControl({ sensitivity: Number($("sensitivity").value) }));
  $("upload-button").addEventListener("click", upload);
  $("prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - PAGE); loadGallery(); });
  $("next").addEventListener("click", () => { state.offset += PAGE; loadGallery(); });
  $("tab-gallery").addEventListener("click", () => showTab("gallery"));
  $("tab-unknown").addEventListener("click", () => showTab("unknown"));
  setupHold();
  watchLive();
  listen();
  refreshState();
  loadUnknowns();
  setInterval(refreshState, 1000);
  setInterval(loadUnknowns, 3000);
}

document.addEventListener("DOMContentLoaded", start);
