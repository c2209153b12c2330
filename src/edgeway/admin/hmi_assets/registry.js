// The devices page on the device registry (/api/devices): status, groups,
// tags, type, last seen; filters and paging run on the server (keyset paging
// by id), so 10,000 devices cost one page of 100 rows. Without a registry
// (devices.enabled: false) it falls back to the devices seen (pages.js).
// Also the registry part of the device page, with disable/enable.
import { ApiError, api, askReason, can, h, registerPage } from "/hmi/app.js";

const PAGE = 100;
const STATUSES = ["online", "offline", "disabled", "unregistered"];
const fmt = (n) => (n === null || n === undefined ? "-" : n.toLocaleString("en-US"));
const when = (ts) => (ts ? new Date(ts * 1000).toISOString().replace("T", " ").slice(0, 19) : "-");
export function ago(ts) {
  if (!ts) return "never";
  const s = Math.max(0, Date.now() / 1000 - ts);
  return s < 60 ? `${s.toFixed(0)} s ago` : s < 3600 ? `${(s / 60).toFixed(0)} min ago` : s < 172800 ? `${(s / 3600).toFixed(1)} h ago` : `${(s / 86400).toFixed(0)} d ago`;
}

/** A registry status as ISA-101 wants it: grey when normal, colour when not. */
export function statusBadge(status) {
  if (status === "online") return h("span", { "data-status": status }, "online");
  if (status === "disabled") return h("span", { class: "muted", "data-status": status }, "disabled");
  // offline and unregistered need someone's attention
  return h("span", { class: status === "offline" ? "warning" : "abnormal", "data-status": status }, status);
}

async function devicesPage(main, arg, query) {
  // The first page is read at once: it also tells whether there is a registry.
  let first = null;
  const initial = new URLSearchParams({ limit: PAGE });
  for (const k of ["status", "group", "tag", "type"]) if (query.get(k)) initial.set(k, query.get(k));
  if (query.get("q")) initial.set("prefix", query.get("q"));
  try {
    first = await api(`/api/devices?${initial}`);
  } catch (e) {
    if (e instanceof ApiError && e.status === 503) {
      const live = await import("/hmi/pages.js");
      return live.liveDevicesPage(main, arg, query);
    }
    throw e;
  }
  const search = h("input", { id: "reg-search", type: "search", placeholder: "device id starts with", value: query.get("q") || "" });
  const status = h("select", { id: "reg-status" }, h("option", { value: "" }, "any status"), STATUSES.map((s) => h("option", { value: s }, s)));
  status.value = query.get("status") || "";
  const group = h("input", { id: "reg-group", placeholder: "group", value: query.get("group") || "" });
  const tag = h("input", { id: "reg-tag", placeholder: "tag", value: query.get("tag") || "" });
  const type = h("input", { id: "reg-type", placeholder: "type", value: query.get("type") || "" });
  const prev = h("button", { id: "reg-prev", type: "button" }, "Previous");
  const next = h("button", { id: "reg-next", type: "button" }, "Next");
  const info = h("span", { id: "reg-info", class: "muted" });
  const timing = h("span", { id: "reg-ms", class: "muted" });
  const body = h("tbody", {});
  main.append(h("h1", {}, "Devices"),
    h("div", { class: "toolbar filters" }, search, status, group, tag, type, h("span", { class: "grow" }), info, prev, next),
    h("table", { id: "registry" }, h("thead", {}, h("tr", {},
      ["device", "name", "type", "status", "groups", "tags", "last seen"].map((x) => h("th", {}, x)))), body),
    h("p", { class: "muted" }, "Filters and paging run on the gateway. ", timing));
  // Keyset paging: the first id of each page seen, so Previous goes back.
  let afters = [null];
  let total = null;
  let seq = 0;
  const load = async () => {
    const mine = ++seq;
    const t0 = performance.now();
    const params = new URLSearchParams({ limit: PAGE });
    const after = afters[afters.length - 1];
    if (after !== null) params.set("after", after);
    if (search.value.trim()) params.set("prefix", search.value.trim());
    for (const [k, el] of [["status", status], ["group", group], ["tag", tag], ["type", type]]) {
      if (el.value.trim()) params.set(k, el.value.trim());
    }
    const doc = first || await api(`/api/devices?${params}`);
    first = null;
    if (mine !== seq) return; // a newer filter answered first
    if (doc.total !== null && doc.total !== undefined) total = doc.total;
    body.replaceChildren(...doc.devices.map((d) => h("tr", { class: "clickable", "data-device": d.id,
      onclick: () => { location.hash = `#/device/${encodeURIComponent(d.id)}`; } },
      h("td", {}, d.id), h("td", {}, d.name || ""), h("td", {}, d.type || ""), h("td", {}, statusBadge(d.status)),
      h("td", {}, d.groups.join(", ")), h("td", {}, d.tags.join(", ")), h("td", {}, ago(d.last_seen)))));
    const start = (afters.length - 1) * PAGE;
    info.textContent = doc.devices.length ? `${fmt(start + 1)}-${fmt(start + doc.devices.length)} of ${fmt(total)}` : "no devices match";
    prev.disabled = afters.length === 1;
    next.disabled = doc.next_after === null;
    next.dataset.after = doc.next_after || "";
    timing.textContent = `page answered in ${(performance.now() - t0).toFixed(0)} ms`;
  };
  let timer = null;
  const reset = () => { afters = [null]; total = null; clearTimeout(timer); timer = setTimeout(load, 250); };
  for (const el of [search, group, tag, type]) el.addEventListener("input", reset);
  status.addEventListener("change", reset);
  prev.addEventListener("click", () => { if (afters.length > 1) { afters.pop(); load(); } });
  next.addEventListener("click", () => { if (next.dataset.after) { afters.push(next.dataset.after); load(); } });
  await load();
  const refresh = setInterval(load, 5000);
  return () => { clearInterval(refresh); clearTimeout(timer); };
}

/** The registry's record of one device, with disable/enable (and why). */
export async function registrySection(section, deviceId) {
  const url = `/api/devices/${encodeURIComponent(deviceId)}`;
  let d;
  try {
    d = (await api(url)).device;
  } catch (e) {
    if (e instanceof ApiError && (e.status === 503 || e.status === 404)) {
      section.append(h("p", { class: "muted", id: "reg-none" }, e.status === 404 ? "Not in the device registry." : "No device registry on this gateway."));
      return;
    }
    throw e;
  }
  const msg = h("span", { id: "reg-message", class: "muted" });
  const render = (dev) => {
    const row = (label, value, id) => h("tr", {}, h("th", {}, label), h("td", id ? { id } : {}, value));
    const rows = [
      row("status", statusBadge(dev.status), "reg-status-cell"),
      row("name", dev.name || "-"), row("type", dev.type || "-"),
      row("groups", dev.groups.join(", ") || "-"), row("tags", dev.tags.join(", ") || "-"),
      row("protocols", dev.protocols.join(", ") || "-"), row("firmware", dev.firmware || "-"),
      row("last seen", `${ago(dev.last_seen)} (${when(dev.last_seen)})`),
      row("last connect / disconnect", `${when(dev.last_connect)} / ${when(dev.last_disconnect)}${dev.disconnect_reason ? " (" + dev.disconnect_reason + ")" : ""}`),
      row("last error", dev.last_error ? h("span", { class: "warning" }, `${dev.last_error} (${when(dev.last_error_at)})`) : "-"),
      row("registered", dev.registered ? `yes, since ${when(dev.created)}` : "no (seen, not registered)"),
    ];
    const actions = [];
    if (can("operator") && dev.registered) {
      const verb = dev.enabled ? "Disable" : "Enable";
      actions.push(h("button", { id: "reg-toggle", type: "button", class: dev.enabled ? null : "primary", onclick: async () => {
        const why = await askReason(dev.enabled
          ? `Disable ${deviceId}? It is refused from now on and its connections end.`
          : `Enable ${deviceId} again?`);
        if (why === null) return;
        try {
          const answer = await api(`${url}/${dev.enabled ? "disable" : "enable"}`, { method: "POST", reason: why });
          render(answer.device);
          msg.textContent = answer.device.enabled ? "enabled" : "disabled";
        } catch (err) { msg.textContent = err.message; }
      } }, verb));
    }
    section.replaceChildren(h("h2", {}, "Registry"), h("table", { id: "reg-detail", class: "fields" }, h("tbody", {}, rows)),
      h("div", { class: "toolbar" }, ...actions, msg));
  };
  render(d);
}

export function register() {
  registerPage({ name: "devices", label: "Devices", role: "viewer", nav: true, order: 20, render: devicesPage });
}
