// The rules and models page: each rule's state, last firing and cooldown
// (/api/rules); each model's active version, candidate (shadow or canary),
// figures, versions and lifecycle history with rollbacks (/api/models).
// A page module: app.js imports it and calls register().
import { api, askReason, can, h, registerPage } from "/hmi/app.js";

const when = (ts) => (ts ? new Date(ts * 1000).toISOString().replace("T", " ").slice(0, 19) : "-");
const num = (x) => (x === null || x === undefined ? "-" : String(x));

const dur = (s) => (!s ? "-" : s < 120 ? `${s} s` : s < 7200 ? `${(s / 60).toFixed(0)} min` : `${(s / 3600).toFixed(1)} h`);

/** The document at path, or null after saying in main why not (a part that is off). */
async function loadOrSay(main, path, id) {
  try {
    return await api(path);
  } catch (e) {
    main.append(h("p", { class: "muted", id }, e.message));
    return null;
  }
}

async function rulesSection(main) {
  main.append(h("h1", {}, "Rules"));
  const doc = await loadOrSay(main, "/api/rules", "rules-off");
  if (!doc) return;
  main.append(h("table", { id: "rules" }, h("thead", {}, h("tr", {}, ["rule", "state", "condition", "for", "cooldown", "devices active", "pending", "cooling down", "last fired"].map((x) => h("th", {}, x)))),
    h("tbody", {}, doc.rules.map((r) => h("tr", { "data-rule": r.name }, h("td", {}, r.name),
      h("td", {}, r.state === "active" ? h("span", { class: "warning" }, "active") : r.state === "disabled" ? h("span", { class: "muted" }, "disabled") : r.state),
      h("td", {}, r.when + (r.clear ? ` (clears: ${r.clear})` : "")), h("td", {}, dur(r.for)), h("td", {}, dur(r.cooldown)),
      h("td", { class: "num" }, r.active_devices), h("td", { class: "num" }, r.pending_devices), h("td", { class: "num" }, r.cooling_down_devices),
      h("td", {}, r.last_fired ? `${when(r.last_fired.at)} (${r.last_fired.device_id})` : "never"))))));
}

async function modelsPage(main) {
  await rulesSection(main);
  main.append(h("h1", {}, "Models"));
  const doc = await loadOrSay(main, "/api/models", "models-off");
  if (!doc) return;
  const msg = h("pre", { class: "result hidden", id: "models-result" });
  const act = (name, what, path, withReason) => h("button", { type: "button", "data-action": what, onclick: async () => {
    const why = await askReason(`${what} model ${name}?`);
    if (why === null) return;
    try { await api(path, { method: "POST", body: withReason ? { reason: why || "from the HMI" } : undefined, reason: why }); main.replaceChildren(); await modelsPage(main); }
    catch (e) { msg.textContent = e.message; msg.classList.remove("hidden"); }
  } }, what);
  const rows = Object.entries(doc.models).map(([name, m]) => {
    const s = m.active_stats || {};
    return h("tr", { "data-model": name }, h("td", {}, name), h("td", {}, num(m.active)),
      h("td", {}, m.candidate ? `${m.candidate} (${m.mode}${m.mode === "canary" ? " " + m.share : ""})` : "-"),
      h("td", { class: "num" }, num(s.calls)), h("td", { class: "num" }, s.errors ? h("span", { class: "warning" }, s.errors) : num(s.errors)),
      h("td", { class: "num" }, `${num(s.latency_p50_ms)} / ${num(s.latency_p99_ms)}`),
      h("td", {}, s.out_of_service ? h("span", { class: "abnormal" }, "out of service") : m.active ? "in service" : "-"),
      h("td", {}, can("engineer") ? [
        m.candidate ? act(name, "Promote", `/api/models/${encodeURIComponent(name)}/promote`) : "",
        m.previous ? act(name, "Roll back", `/api/models/${encodeURIComponent(name)}/rollback`, true) : "",
      ] : ""));
  });
  main.append(
    h("table", { id: "models" }, h("thead", {}, h("tr", {}, ["model", "active", "candidate", "calls", "errors", "p50 / p99 ms", "state", ""].map((x) => h("th", {}, x)))), h("tbody", {}, rows)),
    msg,
    h("p", { class: "muted" }, `queue ${doc.queue} of ${doc.queue_max}, jobs ${doc.jobs}, dropped ${doc.dropped}`),
    h("h2", {}, "Versions"),
    h("table", { id: "model-versions" }, h("thead", {}, h("tr", {}, ["model", "version", "state", "signed by", "uploaded", "note"].map((x) => h("th", {}, x)))),
      h("tbody", {}, doc.versions.map((v) => h("tr", {}, h("td", {}, v.name), h("td", {}, v.version), h("td", {}, v.state),
        h("td", {}, v.signed_by || "unsigned"), h("td", {}, when(v.created_at)), h("td", {}, v.note || ""))))),
    h("h2", {}, "History (activations, promotions, rollbacks)"),
    h("table", { id: "model-events" }, h("thead", {}, h("tr", {}, ["when", "model", "version", "what", "by", "detail"].map((x) => h("th", {}, x)))),
      h("tbody", {}, (doc.events || []).map((e) => h("tr", {}, h("td", {}, when(e.ts)), h("td", {}, e.name), h("td", {}, e.version || ""),
        h("td", {}, e.what === "rolled_back" ? h("span", { class: "warning" }, "rolled back") : e.what), h("td", {}, e.by || ""), h("td", {}, e.detail || "")))))
  );
}

export function register() {
  registerPage({ name: "models", label: "Rules and models", role: "viewer", nav: true, order: 45, render: modelsPage });
}
