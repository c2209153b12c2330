// The models page (edge ML, /api/models): what runs, how it does, versions.
// A page module: app.js imports it and calls register(); alarms, rules and
// devices pages plug in the same way.
import { api, can, confirmDialog, h, registerPage } from "/hmi/app.js";

const when = (ts) => (ts ? new Date(ts * 1000).toISOString().replace("T", " ").slice(0, 19) : "-");
const num = (x) => (x === null || x === undefined ? "-" : String(x));

async function modelsPage(main) {
  main.append(h("h1", {}, "Models"));
  let doc;
  try {
    doc = await api("/api/models");
  } catch (e) {
    main.append(h("p", { class: "muted", id: "models-off" }, e.message));
    return;
  }
  const msg = h("pre", { class: "result hidden", id: "models-result" });
  const act = (name, what, path, body) => h("button", { type: "button", onclick: async () => {
    if (!(await confirmDialog(`${what} model ${name}?`))) return;
    try { await api(path, { method: "POST", body }); main.replaceChildren(); await modelsPage(main); }
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
        m.previous ? act(name, "Roll back", `/api/models/${encodeURIComponent(name)}/rollback`, { reason: "from the HMI" }) : "",
      ] : ""));
  });
  main.append(
    h("table", { id: "models" }, h("thead", {}, h("tr", {}, ["model", "active", "candidate", "calls", "errors", "p50 / p99 ms", "state", ""].map((x) => h("th", {}, x)))), h("tbody", {}, rows)),
    msg,
    h("p", { class: "muted" }, `queue ${doc.queue} of ${doc.queue_max}, jobs ${doc.jobs}, dropped ${doc.dropped}`),
    h("h2", {}, "Versions"),
    h("table", { id: "model-versions" }, h("thead", {}, h("tr", {}, ["model", "version", "state", "signed by", "uploaded", "note"].map((x) => h("th", {}, x)))),
      h("tbody", {}, doc.versions.map((v) => h("tr", {}, h("td", {}, v.name), h("td", {}, v.version), h("td", {}, v.state),
        h("td", {}, v.signed_by || "unsigned"), h("td", {}, when(v.created_at)), h("td", {}, v.note || "")))))
  );
}

export function register() {
  registerPage({ name: "models", label: "Models", role: "viewer", nav: true, render: modelsPage });
}
