// The HMI's pages. Each is registerPage({name, label, role, nav, render}).
import { ApiError, api, askReason, can, banner, h, live, registerPage } from "/hmi/app.js";
import { drawTrend } from "/hmi/charts.js";

const fmt = (n) => (n === null || n === undefined ? "-" : typeof n === "number" ? n.toLocaleString("en-US", { maximumFractionDigits: 2 }) : String(n));
const ago = (ts) => {
  if (!ts) return "-";
  const s = Math.max(0, Date.now() / 1000 - ts);
  return s < 60 ? `${s.toFixed(0)} s ago` : s < 3600 ? `${(s / 60).toFixed(0)} min ago` : `${(s / 3600).toFixed(1)} h ago`;
};
const age = (s) => (!s ? "-" : s < 120 ? `${s.toFixed(0)} s` : s < 7200 ? `${(s / 60).toFixed(0)} min` : `${(s / 3600).toFixed(1)} h`);
const when = (ts) => (ts ? new Date(ts * 1000).toISOString().replace("T", " ").slice(0, 19) : "-");

function card(label, id) {
  return h("div", { class: "card" }, h("div", { class: "label" }, label), h("div", { class: "value", id }, "-"));
}

function table(headers, rows, id) {
  return h("table", { id }, h("thead", {}, h("tr", {}, headers.map((x) => h("th", {}, x)))), h("tbody", {}, rows));
}

function setText(id, text, abnormal = false) {
  const el = document.getElementById(id);
  if (!el) return;
  el.textContent = text;
  el.classList.toggle("abnormal", abnormal);
}

// ---- overview ---------------------------------------------------------------
function overviewPage(main) {
  main.append(
    h("h1", {}, "Overview"),
    h("div", { class: "grid" },
      card("Readings in /s", "ov-in"), card("Delivered /s", "ov-out"), card("Pending", "ov-pending"),
      card("Dropped", "ov-dropped"), card("Refused (full)", "ov-rejected"),
      card("Devices connected (MQTT)", "ov-connected"), card("Devices online", "ov-online"),
      card("CPU", "ov-cpu"), card("Memory", "ov-mem"), card("Uptime", "ov-uptime")),
    h("h2", {}, "Sinks"),
    table(["sink", "state", "pending", "oldest pending", "accepted", "delivered", "dropped", "accepted = delivered + pending + dropped", "last error"], [], "ov-sinks"),
  );
  let prev = null;
  const update = (o) => {
    document.getElementById("gateway-id").textContent = o.gateway_id || "";
    let pending = 0;
    const rows = Object.entries(o.sinks).map(([name, s]) => {
      pending += s.pending || 0;
      const balanced = (s.accepted || 0) === (s.delivered || 0) + (s.pending || 0) + (s.dropped || 0);
      return h("tr", {},
        h("td", {}, name),
        h("td", {}, s.connected === false ? h("span", { class: "abnormal" }, "disconnected") : "connected"),
        h("td", { class: "num" }, fmt(s.pending)),
        h("td", { class: "num", "data-oldest": s.oldest_pending_s || 0 }, s.oldest_pending_s > 300 ? h("span", { class: "warning" }, age(s.oldest_pending_s)) : age(s.oldest_pending_s)),
        h("td", { class: "num" }, fmt(s.accepted)),
        h("td", { class: "num" }, fmt(s.delivered)),
        h("td", { class: "num" }, s.dropped ? h("span", { class: "warning" }, fmt(s.dropped)) : "0"),
        h("td", {}, balanced ? "holds" : h("span", { class: "abnormal" }, "does not hold")),
        h("td", {}, s.last_error ? h("span", { class: "warning" }, s.last_error) : ""));
    });
    document.querySelector("#ov-sinks tbody").replaceChildren(...rows);
    if (prev) {
      const dt = o.t - prev.t;
      if (dt > 0) {
        setText("ov-in", fmt((o.readings_in - prev.readings_in) / dt));
        setText("ov-out", fmt((o.readings_out - prev.readings_out) / dt));
        setText("ov-cpu", `${fmt((100 * (o.cpu_seconds - prev.cpu_seconds)) / dt)} %`);
      }
    }
    prev = o;
    setText("ov-pending", fmt(pending));
    setText("ov-dropped", fmt(o.dropped), o.dropped > 0);
    setText("ov-rejected", fmt(o.rejected), o.rejected > 0);
    setText("ov-connected", fmt(o.devices_connected));
    setText("ov-online", `${fmt(o.devices_online)} / ${fmt(o.devices_seen)}`);
    setText("ov-mem", o.memory_bytes ? `${fmt(o.memory_bytes / 1048576)} MiB` : "-");
    const up = o.uptime_s || 0;
    setText("ov-uptime", up < 3600 ? `${Math.floor(up / 60)} min` : up < 172800 ? `${fmt(up / 3600)} h` : `${fmt(up / 86400)} d`);
  };
  return api("/api/overview").then((o) => { update(o); live(null, { overview: update }); });
}

// ---- devices seen (without a registry; registry.js has the registry's page) ----
export async function liveDevicesPage(main, _arg, query) {
  const PAGE = 100;
  let offset = Number(query.get("offset") || 0);
  const search = h("input", { id: "dev-search", type: "search", placeholder: "search device id", value: query.get("q") || "" });
  const adapter = h("select", { id: "dev-adapter" }, h("option", { value: "" }, "all adapters"));
  const status = h("select", { id: "dev-status" }, h("option", { value: "" }, "any status"),
    h("option", { value: "online" }, "online"), h("option", { value: "stale" }, "stale"));
  const prev = h("button", { id: "dev-prev", type: "button" }, "Previous");
  const next = h("button", { id: "dev-next", type: "button" }, "Next");
  const info = h("span", { id: "dev-info", class: "muted" });
  const body = h("tbody", {});
  main.append(h("h1", {}, "Devices"),
    h("div", { class: "toolbar" }, search, adapter, status, h("span", { class: "grow" }), info, prev, next),
    h("table", { id: "devices" }, h("thead", {}, h("tr", {},
      ["device", "adapter", "status", "last seen", "readings", "metrics"].map((x) => h("th", {}, x)))), body));
  let seq = 0;
  const load = async () => {
    const mine = ++seq;
    const params = new URLSearchParams({ offset, limit: PAGE, q: search.value, adapter: adapter.value, status: status.value });
    const doc = await api(`/api/live/devices?${params}`);
    if (mine !== seq) return; // a newer search answered first
    if (adapter.options.length === 1) {
      for (const a of doc.adapters) adapter.append(h("option", { value: a }, a));
    }
    body.replaceChildren(...doc.devices.map((d) => h("tr", { class: "clickable", "data-device": d.device_id,
      onclick: () => { location.hash = `#/device/${encodeURIComponent(d.device_id)}`; } },
      h("td", {}, d.device_id), h("td", {}, d.adapter),
      h("td", {}, d.online ? "online" : h("span", { class: "warning" }, "stale")),
      h("td", {}, ago(d.last_seen)), h("td", { class: "num" }, fmt(d.readings)), h("td", { class: "num" }, d.metrics))));
    info.textContent = doc.total ? `${offset + 1}-${offset + doc.devices.length} of ${fmt(doc.total)}` : "no devices";
    prev.disabled = offset === 0;
    next.disabled = offset + PAGE >= doc.total;
  };
  let timer = null;
  const reset = () => { offset = 0; clearTimeout(timer); timer = setTimeout(load, 200); };
  search.addEventListener("input", reset);
  adapter.addEventListener("change", reset);
  status.addEventListener("change", reset);
  prev.addEventListener("click", () => { offset = Math.max(0, offset - PAGE); load(); });
  next.addEventListener("click", () => { offset += PAGE; load(); });
  await load();
  const refresh = setInterval(load, 5000);
  return () => { clearInterval(refresh); clearTimeout(timer); };
}

// ---- device detail --------------------------------------------------------------
const RANGES = [["5 min", 300], ["1 h", 3600], ["24 h", 86400], ["7 days", 604800], ["all", 0]];

async function devicePage(main, deviceId) {
  let dev = null;
  try {
    dev = await api(`/api/live/devices/${encodeURIComponent(deviceId)}`);
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 404)) throw e;
  }
  const registry = h("section", { id: "registry-section" });
  const twin = h("section", { id: "twin" });
  const section = h("section", {});
  if (!dev) {
    main.append(h("h1", {}, `Device ${deviceId}`), h("p", { class: "muted", id: "no-readings" }, "No readings from this device since the gateway started."), registry, twin, section);
    await (await import("/hmi/registry.js")).registrySection(registry, deviceId);
    await twinSection(twin, deviceId);
    await commandsSection(section, deviceId);
    return null;
  }
  const values = h("tbody", {});
  const metric = h("select", { id: "trend-metric" }, dev.trended.map((m) => h("option", { value: m }, m)));
  const range = h("select", { id: "trend-range" }, RANGES.map(([l, s]) => h("option", { value: s }, l)));
  range.value = "0";
  const canvas = h("canvas", { class: "trend", id: "trend" });
  const trendInfo = h("span", { id: "trend-info", class: "muted" });
  main.append(h("h1", {}, `Device ${deviceId}`),
    h("p", { class: "muted" }, `via ${dev.adapter}, first seen ${when(dev.first_seen)}, last seen `, h("span", { id: "dev-last-seen" }, ago(dev.last_seen))),
    h("div", { class: "cols" },
      h("section", {}, h("h2", {}, "Live values"),
        h("table", { id: "live-values" }, h("thead", {}, h("tr", {}, h("th", {}, "metric"), h("th", {}, "value"))), values)),
      h("section", {}, h("h2", {}, "Trend"), h("div", { class: "toolbar" }, metric, range, trendInfo), canvas)));
  const showValues = (latest) => {
    values.replaceChildren(...Object.entries(latest).map(([k, v]) =>
      h("tr", {}, h("td", {}, k), h("td", { class: "num", "data-metric": k }, fmt(v)))));
  };
  showValues(dev.latest);
  const loadTrend = async () => {
    if (!metric.value) { trendInfo.textContent = "no numeric metric"; return; }
    const span = Number(range.value);
    const since = span ? Date.now() / 1000 - span : 0;
    const t0 = performance.now();
    const tr = await api(`/api/live/devices/${encodeURIComponent(deviceId)}/trend?metric=${encodeURIComponent(metric.value)}&since=${since}&points=2000`);
    const n = drawTrend(canvas, tr.t, tr.v);
    trendInfo.textContent = `${fmt(n)} points drawn of ${fmt(tr.total)} stored, ${(performance.now() - t0).toFixed(0)} ms`;
    canvas.dataset.points = String(n);
  };
  metric.addEventListener("change", loadTrend);
  range.addEventListener("change", loadTrend);
  await loadTrend();
  live(deviceId, { device: (d) => { showValues(d.latest); document.getElementById("dev-last-seen").textContent = ago(d.last_seen); } });
  const trendTimer = setInterval(loadTrend, 5000);
  main.append(registry, twin, section);
  await (await import("/hmi/registry.js")).registrySection(registry, deviceId);
  await twinSection(twin, deviceId);
  await commandsSection(section, deviceId);
  return () => clearInterval(trendTimer);
}

// The device's twin (/api/devices/{id}/twin): desired, reported, what differs.
async function twinSection(section, deviceId) {
  const url = `/api/devices/${encodeURIComponent(deviceId)}/twin`;
  let tw;
  try { tw = await api(url); } catch (e) { section.append(h("h2", {}, "Twin"), h("p", { class: "muted" }, e.message)); return; }
  const show = (label, id, doc) => h("div", {}, h("div", { class: "muted" }, label), h("pre", { class: "result", id }, JSON.stringify(doc, null, 1)));
  const body = h("div", { class: "grid" });
  const render = (t) => {
    tw = t;
    const delta = t.delta && Object.keys(t.delta).length;
    body.replaceChildren(show(`desired (version ${t.desired_version})`, "twin-desired", t.desired),
      show(`reported (version ${t.reported_version})`, "twin-reported", t.reported),
      h("div", {}, h("div", { class: "muted" }, "not yet reported"),
        h("pre", { class: delta ? "result warning" : "result", id: "twin-delta" }, JSON.stringify(t.delta || {}, null, 1))));
  };
  section.append(h("h2", {}, "Twin"), body);
  render(tw);
  if (!can("operator")) return;
  const patch = h("input", { id: "twin-patch", placeholder: 'desired change as JSON, e.g. {"setpoint": 50}', size: 40 });
  const msg = h("span", { id: "twin-message", class: "muted" });
  section.append(h("form", { class: "toolbar", onsubmit: async (e) => {
    e.preventDefault();
    let doc;
    try { doc = JSON.parse(patch.value); } catch { msg.textContent = "not JSON"; return; }
    const why = await askReason(`Change the desired state of ${deviceId}: ${patch.value}?`);
    if (why === null) return;
    try {
      const answer = await api(url + "/desired", { method: "PATCH", body: doc, headers: { "If-Match": String(tw.desired_version) }, reason: why });
      render(answer.twin);
      msg.textContent = "desired state changed";
    } catch (err) { msg.textContent = err.message; }
  } }, patch, h("button", { id: "twin-send", class: "primary", type: "submit" }, "Set desired"), msg));
}

async function commandsSection(section, deviceId) {
  const list = h("tbody", {});
  const result = h("pre", { class: "result hidden", id: "cmd-result" });
  section.append(h("h2", {}, "Commands"));
  if (can("operator")) {
    const name = h("input", { id: "cmd-name", placeholder: "command name (e.g. set_speed)", required: true });
    const params = h("input", { id: "cmd-params", placeholder: 'params as JSON, e.g. {"rpm": 1200}', size: 40 });
    const send = h("button", { id: "cmd-send", class: "primary", type: "submit" }, "Send");
    section.append(h("form", { class: "toolbar", onsubmit: async (e) => {
      e.preventDefault();
      let p = null;
      try { p = params.value.trim() ? JSON.parse(params.value) : null; } catch { banner("params: not JSON"); return; }
      const why = await askReason(`Send '${name.value}' to ${deviceId}?`);
      if (why === null) return;
      send.disabled = true;
      result.classList.remove("hidden");
      result.textContent = "sending...";
      try {
        const doc = await api(`/api/devices/${encodeURIComponent(deviceId)}/commands?wait=15`, { method: "POST", body: { name: name.value, params: p }, reason: why });
        const c = doc.command;
        result.textContent = `${c.state}${c.result ? " " + JSON.stringify(c.result) : ""}${c.error ? " " + c.error : ""}`;
        result.dataset.state = c.state;
      } catch (err) {
        result.textContent = `refused: ${err.message}`;
      } finally { send.disabled = false; refresh(); }
    } }, name, params, send));
  }
  section.append(result, table(["when", "command", "state", "result", "source"], [], "cmd-list"));
  section.querySelector("#cmd-list tbody").replaceWith(list);
  const refresh = async () => {
    try {
      const doc = await api(`/api/devices/${encodeURIComponent(deviceId)}/commands?limit=20`);
      list.replaceChildren(...doc.commands.map(commandRow));
    } catch (e) { list.replaceChildren(h("tr", {}, h("td", { colspan: 5 }, e.message))); }
  };
  await refresh();
}

function commandRow(c) {
  return h("tr", {}, h("td", {}, when(c.created_at)), h("td", {}, c.name),
    h("td", {}, h("span", { class: `state-${c.state}` }, c.state)),
    h("td", {}, c.result ? JSON.stringify(c.result) : c.error || ""), h("td", {}, c.source || ""));
}

// ---- commands ---------------------------------------------------------------------
async function commandsPage(main) {
  main.append(h("h1", {}, "Commands"), table(["when", "device", "command", "state", "result", "source"], [], "commands"));
  const body = main.querySelector("#commands tbody");
  const load = async () => {
    try {
      const doc = await api("/api/commands?limit=200");
      body.replaceChildren(...doc.commands.map((c) => {
        const row = commandRow(c);
        row.insertBefore(h("td", {}, h("a", { href: `#/device/${encodeURIComponent(c.device_id)}` }, c.device_id)), row.children[1]);
        return row;
      }));
    } catch (e) { body.replaceChildren(h("tr", {}, h("td", { colspan: 6 }, e.message))); }
  };
  await load();
  const t = setInterval(load, 3000);
  return () => clearInterval(t);
}

// ---- sinks and outbox ------------------------------------------------------------------
async function sinksPage(main) {
  main.append(h("h1", {}, "Sinks and outbox"),
    table(["sink", "state", "pending", "oldest pending", "accepted", "delivered", "dropped (age)", "dropped (size)", "dead letters", "batches", "last success", "last error"], [], "sinks"),
    h("h2", {}, "Dead letters"), h("p", { class: "muted" }, "Records a sink refused for good. Replayed ones go to the end of their sink's queue with their record id (a cloud that has them drops the duplicate)."));
  const update = (o) => {
    main.querySelector("#sinks tbody").replaceChildren(...Object.entries(o.sinks).map(([n, s]) => h("tr", {},
      h("td", {}, n), h("td", {}, s.connected === false ? h("span", { class: "abnormal" }, "disconnected") : "connected"),
      h("td", { class: "num" }, fmt(s.pending)), h("td", { class: "num" }, age(s.oldest_pending_s)),
      h("td", { class: "num" }, fmt(s.accepted)), h("td", { class: "num" }, fmt(s.delivered)),
      h("td", { class: "num" }, fmt(s.dropped_max_age)), h("td", { class: "num" }, fmt(s.dropped_max_bytes)),
      h("td", { class: "num" }, fmt(s.dropped_dead_letter)), h("td", { class: "num" }, fmt(s.batches_sent)),
      h("td", {}, when(s.last_success_at)), h("td", {}, s.last_error || ""))));
  };
  update(await api("/api/overview"));
  live(null, { overview: update });
  const msg = h("span", { id: "dl-message", class: "muted" });
  const body = h("tbody", {});
  const all = h("input", { type: "checkbox", id: "dl-all", title: "select all shown" });
  const replaySel = h("button", { id: "dl-replay", type: "button", disabled: true }, "Replay selected");
  const replayAll = h("button", { id: "dl-replay-all", type: "button" }, "Replay all");
  if (can("operator")) main.append(h("div", { class: "toolbar" }, replaySel, replayAll, msg));
  main.append(h("table", { id: "deadletters" }, h("thead", {}, h("tr", {},
    h("th", {}, can("operator") ? all : ""), ...["id", "sink", "device", "time", "error", "metrics"].map((x) => h("th", {}, x)))), body));
  const chosen = () => [...body.querySelectorAll("input[data-id]:checked")].map((c) => Number(c.dataset.id));
  const load = async () => {
    try {
      const dl = await api("/api/deadletters");
      body.replaceChildren(...dl.deadletters.map((d) => h("tr", { "data-dl": d.id },
        h("td", {}, can("operator") ? h("input", { type: "checkbox", "data-id": d.id, onchange: () => { replaySel.disabled = !chosen().length; } }) : ""),
        h("td", {}, d.id), h("td", {}, d.sink), h("td", {}, d.device_id), h("td", {}, when(d.ts)),
        h("td", {}, d.error), h("td", {}, JSON.stringify(d.metrics)))));
      replayAll.disabled = !dl.deadletters.length;
      replaySel.disabled = true;
      all.checked = false;
    } catch (e) { body.replaceChildren(h("tr", {}, h("td", { colspan: 7 }, e.message))); }
  };
  all.addEventListener("change", () => {
    for (const c of body.querySelectorAll("input[data-id]")) c.checked = all.checked;
    replaySel.disabled = !chosen().length;
  });
  const replay = async (doc, what) => {
    const why = await askReason(`Replay ${what}? They are sent again to their sinks.`);
    if (why === null) return;
    try {
      const r = await api("/api/deadletters/replay", { method: "POST", body: doc, reason: why });
      msg.textContent = `${fmt(r.replayed)} replayed, ${fmt(r.left)} left`;
    } catch (e) { msg.textContent = e.message; }
    await load();
  };
  replaySel.addEventListener("click", () => { const ids = chosen(); replay({ ids }, `${ids.length} dead letter(s)`); });
  replayAll.addEventListener("click", () => replay({ all: true }, "every dead letter"));
  await load();
}

// ---- configuration -----------------------------------------------------------------------
async function configPage(main) {
  main.append(h("h1", {}, "Configuration"));
  const msg = h("pre", { class: "result hidden", id: "config-result" });
  const say = (text) => { msg.textContent = text; msg.classList.remove("hidden"); };
  if (can("engineer")) {
    const cur = await api("/api/config");
    const area = h("textarea", { id: "config-text", spellcheck: "false" });
    area.value = cur.text || "# this gateway was started without a configuration file";
    const validate = h("button", { id: "config-validate", type: "button", onclick: async () => {
      try { await api("/api/config/validate", { method: "POST", text: area.value }); say("valid"); }
      catch (e) { say(`${e.message}\n${(e.body && e.body.issues || []).join("\n")}`); }
    } }, "Validate");
    const apply = h("button", { id: "config-apply", class: "primary", type: "button", onclick: async () => {
      const why = await askReason("Apply this configuration to the running gateway? It is rolled back if it fails.");
      if (why === null) return;
      try { const r = await api("/api/config", { method: "POST", text: area.value, reason: why }); say(`applied: ${r.changes.join(", ") || "no change"}`); loadHistory(); }
      catch (e) { say(`${e.code}: ${e.message}\n${(e.body && e.body.issues || []).join("\n")}`); }
    } }, "Apply");
    main.append(h("p", { class: "muted" }, `source ${cur.source}, sha256 ${(cur.sha256 || "").slice(0, 12)}`),
      area, h("div", { class: "toolbar" }, validate, apply), msg);
  }
  main.append(h("h2", {}, "History"), table(["#", "applied", "source", "sha256", ""], [], "config-history"));
  const loadHistory = async () => {
    const doc = await api("/api/config/history");
    main.querySelector("#config-history tbody").replaceChildren(...doc.history.map((e) => h("tr", {},
      h("td", {}, e.number), h("td", {}, when(e.applied_at)), h("td", {}, e.source),
      h("td", {}, (e.sha256 || "").slice(0, 12)),
      h("td", {}, can("engineer") ? h("button", { type: "button", onclick: async () => {
        const why = await askReason(`Roll back to configuration #${e.number}?`);
        if (why === null) return;
        try { const r = await api("/api/config/rollback", { method: "POST", body: { number: e.number }, reason: why }); say(`rolled back: ${r.changes.join(", ")}`); loadHistory(); }
        catch (err) { say(err.message); }
      } }, "Roll back") : ""))));
  };
  await loadHistory();
}

// ---- logs ------------------------------------------------------------------------------
async function logsPage(main) {
  const level = h("select", { id: "log-level" }, ["", "info", "warning", "error"].map((l) => h("option", { value: l }, l || "all levels")));
  main.append(h("h1", {}, "Recent logs"), h("div", { class: "toolbar" }, level), table(["time", "level", "logger", "message"], [], "logs"));
  const load = async () => {
    const doc = await api(`/api/logs?level=${level.value}`);
    main.querySelector("#logs tbody").replaceChildren(...doc.lines.slice().reverse().map((l) => h("tr", {},
      h("td", {}, when(l.ts)), h("td", {}, l.level === "error" ? h("span", { class: "abnormal" }, l.level) : l.level === "warning" ? h("span", { class: "warning" }, l.level) : l.level),
      h("td", {}, l.logger), h("td", {}, l.message))));
  };
  level.addEventListener("change", load);
  await load();
  const t = setInterval(load, 5000);
  return () => clearInterval(t);
}

export function registerCorePages() {
  registerPage({ name: "overview", label: "Overview", role: "viewer", nav: true, order: 10, render: overviewPage });
  registerPage({ name: "devices", label: "Devices", role: "viewer", nav: true, order: 20, render: liveDevicesPage });
  registerPage({ name: "device", label: "Device", role: "viewer", nav: false, render: devicePage });
  registerPage({ name: "commands", label: "Commands", role: "viewer", nav: true, order: 30, render: commandsPage });
  registerPage({ name: "sinks", label: "Sinks", role: "viewer", nav: true, order: 40, render: sinksPage });
  registerPage({ name: "config", label: "Configuration", role: "viewer", nav: true, order: 60, render: configPage });
  registerPage({ name: "logs", label: "Logs", role: "operator", nav: true, order: 70, render: logsPage });
}
