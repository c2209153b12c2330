// The HMI shell: session, API client, router, live channel. Pages register
// themselves (pages.js; devices, alarms, rules pages add one registerPage call).
import { registerCorePages } from "/hmi/pages.js";

export const ROLES = ["viewer", "operator", "engineer", "admin"];
/** Page modules beyond the core ones: each exports register() (see models.js). */
const PAGE_MODULES = ["/hmi/registry.js", "/hmi/alarms.js", "/hmi/models.js", "/hmi/firmware.js"];
export const state = { user: null, role: null, csrf: null, login: true };
const pages = [];

/** Build an element: h("td", {class: "num"}, "42"). Text is never parsed as HTML. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

export function can(role) {
  return state.role !== null && ROLES.indexOf(state.role) >= ROLES.indexOf(role);
}

export class ApiError extends Error {
  constructor(status, body) {
    super(body && body.message ? body.message : `HTTP ${status}`);
    this.status = status;
    this.code = body && body.error;
    this.body = body;
  }
}

/** Call the admin API; JSON in and out; errors are {error, message}.
 *  reason: why (a change's X-Edgeway-Reason, percent-encoded; kept in the audit). */
export async function api(path, { method = "GET", body, text, headers: extra, reason } = {}) {
  const headers = { ...(extra || {}) };
  if (method !== "GET" && state.csrf) headers["X-CSRF-Token"] = state.csrf;
  if (reason) headers["X-Edgeway-Reason"] = encodeURIComponent(reason.slice(0, 500));
  let payload;
  if (text !== undefined) { headers["Content-Type"] = "application/yaml"; payload = text; }
  else if (body !== undefined) { headers["Content-Type"] = "application/json"; payload = JSON.stringify(body); }
  const resp = await fetch(path, { method, headers, body: payload, credentials: "same-origin" });
  let doc = null;
  try { doc = await resp.json(); } catch { doc = null; }
  if (resp.status === 401 && path !== "/api/login") { showLogin(); }
  if (!resp.ok) throw new ApiError(resp.status, doc);
  return doc;
}

export function registerPage(page) {
  // page: {name, label, role, nav: bool, order (place in the menu), render(main, params) -> cleanup?}
  // A page module may replace a core page of the same name (registry.js: devices).
  const i = pages.findIndex((p) => p.name === page.name);
  if (i >= 0) pages[i] = page; else pages.push(page);
}

export function banner(text) {
  const b = document.getElementById("banner");
  b.textContent = text || "";
  b.classList.toggle("hidden", !text);
}

export function confirmDialog(text) {
  return askReason(text, false).then((r) => r !== null);
}

/** A confirmation that also asks why: resolves to the reason typed ("" if
 *  none) or null when cancelled. The reason goes into the audit log. */
export function askReason(text, withReason = true) {
  const dlg = document.getElementById("confirm");
  const field = document.getElementById("confirm-reason");
  document.getElementById("confirm-text").textContent = text;
  document.getElementById("confirm-reason-label").classList.toggle("hidden", !withReason);
  field.value = "";
  dlg.returnValue = "";
  // Enter in the reason confirms (the form's first button, which Enter
  // would press, is Cancel).
  field.onkeydown = (e) => { if (e.key === "Enter") { e.preventDefault(); dlg.close("ok"); } };
  return new Promise((resolve) => {
    dlg.addEventListener("close", () => resolve(dlg.returnValue === "ok" ? field.value.trim() : null), { once: true });
    dlg.showModal();
    if (withReason) field.focus();
  });
}

// ---- live channel: one EventSource for the page shown -------------------
let source = null;
const listeners = new Map();

/** The alarm summary in the header, on every page (ISA-101: alarms are
 *  never more than a glance away): red while any is unacknowledged. */
function showAlarms(o) {
  const el = document.getElementById("alarm-indicator");
  const a = o.alarms;
  if (!a || (!a.unacked && !a.active)) { el.classList.add("hidden"); return; }
  el.classList.remove("hidden");
  el.className = a.unacked ? "abnormal" : "muted";
  el.textContent = a.unacked ? `${a.unacked} unacknowledged alarm${a.unacked === 1 ? "" : "s"}` : `${a.active} active alarm${a.active === 1 ? "" : "s"}`;
}

export function live(device, handlers) {
  closeLive();
  const url = device ? `/api/events?device=${encodeURIComponent(device)}` : "/api/events";
  source = new EventSource(url);
  source.addEventListener("overview", (e) => showAlarms(JSON.parse(e.data)));
  for (const [name, fn] of Object.entries(handlers)) {
    const wrapped = (e) => fn(JSON.parse(e.data));
    listeners.set(name, wrapped);
    source.addEventListener(name, wrapped);
  }
  source.addEventListener("ended", () => { closeLive(); showLogin(); });
}

export function closeLive() {
  if (source) source.close();
  source = null;
  listeners.clear();
}

// ---- router ---------------------------------------------------------------
let cleanup = null;

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, "");
  const [path, query = ""] = raw.split("?");
  const parts = path.split("/").map(decodeURIComponent);
  return { name: parts[0] || "overview", arg: parts.slice(1).join("/"), query: new URLSearchParams(query) };
}

function renderNav(active) {
  const nav = document.getElementById("nav");
  nav.replaceChildren(
    ...pages.filter((p) => p.nav && can(p.role)).sort((a, b) => (a.order ?? 100) - (b.order ?? 100)).map((p) =>
      h("a", { href: `#/${p.name}`, class: p.name === active ? "active" : null, "data-page": p.name }, p.label)),
    h("a", { href: "/api/docs", target: "_blank" }, "API"),
  );
  const who = document.getElementById("who");
  who.textContent = state.user ? `${state.user} (${state.role})` : state.role ? `(${state.role})` : "";
  document.getElementById("logout").classList.toggle("hidden", !(state.login && state.user));
}

export async function route() {
  if (cleanup) { try { cleanup(); } catch { /* page gone */ } cleanup = null; }
  closeLive();
  banner("");
  const main = document.getElementById("main");
  if (state.role === null) { showLogin(); return; }
  const { name, arg, query } = parseHash();
  const page = pages.find((p) => p.name === name) || pages[0];
  renderNav(page.name);
  main.replaceChildren();
  if (!can(page.role)) {
    main.append(h("p", {}, `This page needs role ${page.role}.`));
    return;
  }
  try {
    cleanup = (await page.render(main, arg, query)) || null;
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 401)) banner(e.message);
  }
  // Pages without live data of their own still get the overview events
  // (one shared snapshot a second) for the alarm summary.
  if (source === null && state.role !== null) live(null, {});
}

// ---- log-in ---------------------------------------------------------------
export function showLogin(message) {
  closeLive();
  document.getElementById("alarm-indicator").classList.add("hidden");
  state.role = null; state.user = null; state.csrf = null;
  renderNav("");
  const main = document.getElementById("main");
  const user = h("input", { id: "login-user", autocomplete: "username", placeholder: "user", required: true });
  const pw = h("input", { id: "login-password", type: "password", autocomplete: "current-password", placeholder: "password", required: true });
  const msg = h("p", { id: "login-message", class: "muted" }, message || "");
  const form = h("form", { class: "login", onsubmit: async (e) => {
    e.preventDefault();
    try {
      const doc = await api("/api/login", { method: "POST", body: { user: user.value, password: pw.value } });
      Object.assign(state, { user: doc.user, role: doc.role, csrf: doc.csrf });
      route();
    } catch (err) {
      msg.textContent = err.message;
      msg.className = "abnormal";
    }
  } },
    h("h1", {}, "Log in"), user, pw, h("button", { class: "primary", type: "submit", id: "login-submit" }, "Log in"), msg);
  main.replaceChildren(form);
  if (state.usersExist === false) {
    msg.textContent = "No users yet: on the gateway run 'edgeway users add NAME --role admin'.";
  }
}

async function start() {
  registerCorePages();
  // Fetched in parallel (one round trip, not one per module), registered in order.
  for (const m of await Promise.all(PAGE_MODULES.map((u) => import(u)))) m.register();
  document.getElementById("logout").addEventListener("click", async () => {
    try { await api("/api/logout", { method: "POST" }); } catch { /* already out */ }
    showLogin();
  });
  const doc = await api("/api/session");
  Object.assign(state, { user: doc.user, role: doc.role, csrf: doc.csrf || null, login: doc.login,
    usersExist: doc.users_exist });
  window.addEventListener("hashchange", route);
  route();
}

start();
