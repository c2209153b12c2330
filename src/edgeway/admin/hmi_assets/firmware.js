// The firmware page (/api/firmware): images, campaigns with per-wave progress
// and per-device states; pause, resume and abort for engineers (the API
// refuses anyone else), each asking why. Read every 3 s while shown.
import { api, askReason, can, h, registerPage } from "/hmi/app.js";

const when = (ts) => (ts ? new Date(ts * 1000).toISOString().replace("T", " ").slice(0, 19) : "-");
const FINISHED = ["succeeded", "failed", "cancelled"];
const DEVICES_SHOWN = 500;

function stateBadge(state) {
  if (state === "halted" || state === "failed") return h("span", { class: "abnormal" }, state);
  if (state === "paused" || state === "aborted" || state === "cancelled") return h("span", { class: "warning" }, state);
  return h("span", {}, state);
}

function bar(done, total) {
  const pct = total ? Math.round((100 * done) / total) : 0;
  return h("div", { class: "progress", title: `${done} of ${total}` }, h("span", { style: null, "data-pct": pct }));
}

/** Per wave: devices, and how many are in each state. */
export function waves(campaign, devices) {
  const out = campaign.waves.map((name) => ({ name, total: 0, states: {} }));
  for (const d of devices) {
    const w = out[d.wave] || (out[d.wave] = { name: `wave ${d.wave}`, total: 0, states: {} });
    w.total += 1;
    w.states[d.state] = (w.states[d.state] || 0) + 1;
  }
  return out;
}

async function firmwarePage(main, arg) {
  main.append(h("h1", {}, "Firmware"));
  const msg = h("span", { id: "fw-message", class: "muted" });
  const images = h("tbody", {});
  const campaigns = h("tbody", {});
  const detail = h("section", { id: "fw-campaign" });
  let selected = arg || null;
  try {
    await api("/api/firmware/images");
  } catch (e) {
    main.append(h("p", { class: "muted", id: "fw-off" }, e.message));
    return null;
  }
  main.append(h("h2", {}, "Images"),
    h("table", { id: "fw-images" }, h("thead", {}, h("tr", {}, ["id", "hardware", "version", "size", "SHA-256", "signed by", "uploaded", "note"].map((x) => h("th", {}, x)))), images),
    h("h2", {}, "Campaigns"), h("div", { class: "toolbar" }, msg),
    h("table", { id: "fw-campaigns" }, h("thead", {}, h("tr", {}, ["id", "image", "state", "progress", "succeeded", "failed", "in flight", "created", "reason", ""].map((x) => h("th", {}, x)))), campaigns),
    detail);
  const act = async (c, action) => {
    const why = await askReason(`${action[0].toUpperCase() + action.slice(1)} campaign ${c.id}?`);
    if (why === null) return;
    try {
      await api(`/api/firmware/campaigns/${encodeURIComponent(c.id)}/${action}`, { method: "POST", reason: why });
      msg.textContent = `${action}: done`;
    } catch (e) { msg.textContent = e.message; }
    await load();
  };
  const buttons = (c) => {
    if (!can("engineer")) return "";
    const b = (action, label) => h("button", { type: "button", "data-action": action, onclick: (e) => { e.stopPropagation(); act(c, action); } }, label);
    const out = [];
    if (c.state === "running") out.push(b("pause", "Pause"));
    if (c.state === "paused" || c.state === "halted") out.push(b("resume", "Resume"));
    if (!["completed", "aborted"].includes(c.state)) out.push(b("abort", "Abort"));
    return out;
  };
  const showCampaign = async (id) => {
    const doc = await api(`/api/firmware/campaigns/${encodeURIComponent(id)}`);
    const ws = waves(doc.campaign, doc.devices);
    detail.replaceChildren(h("h2", {}, `Campaign ${id}`),
      h("table", { id: "fw-waves" }, h("thead", {}, h("tr", {}, ["wave", "devices", "progress", "pending", "sent", "succeeded", "failed", "cancelled"].map((x) => h("th", {}, x)))),
        h("tbody", {}, ws.map((w) => {
          const done = FINISHED.reduce((n, s) => n + (w.states[s] || 0), 0);
          return h("tr", { "data-wave": w.name }, h("td", {}, w.name), h("td", { class: "num" }, w.total), h("td", {}, bar(done, w.total)),
            ...["pending", "sent", "succeeded"].map((s) => h("td", { class: "num" }, w.states[s] || 0)),
            h("td", { class: "num" }, w.states.failed ? h("span", { class: "abnormal" }, w.states.failed) : 0),
            h("td", { class: "num" }, w.states.cancelled || 0));
        }))),
      h("h2", {}, "Devices"),
      h("table", { id: "fw-devices" }, h("thead", {}, h("tr", {}, ["device", "wave", "state", "result", "detail", "updated"].map((x) => h("th", {}, x)))),
        h("tbody", {}, doc.devices.slice(0, DEVICES_SHOWN).map((d) => h("tr", { "data-device": d.device_id },
          h("td", {}, h("a", { href: `#/device/${encodeURIComponent(d.device_id)}` }, d.device_id)), h("td", {}, ws[d.wave] ? ws[d.wave].name : d.wave),
          h("td", {}, stateBadge(d.state)), h("td", {}, d.result), h("td", {}, d.detail || ""), h("td", {}, when(d.updated_at)))))),
      doc.devices.length > DEVICES_SHOWN ? h("p", { class: "muted" }, `first ${DEVICES_SHOWN} of ${doc.devices.length} devices`) : "");
    for (const el of detail.querySelectorAll(".progress > span")) el.style.width = `${el.dataset.pct}%`;
  };
  const load = async () => {
    const [im, ca] = await Promise.all([api("/api/firmware/images"), api("/api/firmware/campaigns")]);
    images.replaceChildren(...im.images.map((i) => h("tr", {}, h("td", {}, i.id), h("td", {}, i.hardware), h("td", {}, i.version),
      h("td", { class: "num" }, i.size.toLocaleString("en-US")), h("td", {}, i.sha256.slice(0, 12)),
      h("td", {}, i.signed_by || h("span", { class: "warning" }, "unsigned")), h("td", {}, when(i.created_at)), h("td", {}, i.note || ""))));
    campaigns.replaceChildren(...ca.campaigns.map((c) => {
      const n = c.counts || {};
      const total = Object.values(n).reduce((a, b) => a + b, 0);
      const done = FINISHED.reduce((k, s) => k + (n[s] || 0), 0);
      return h("tr", { class: "clickable", "data-campaign": c.id, onclick: () => { selected = c.id; showCampaign(c.id); } },
        h("td", {}, c.id), h("td", {}, c.image_id), h("td", { class: "fw-state" }, stateBadge(c.state)), h("td", {}, bar(done, total)),
        h("td", { class: "num" }, n.succeeded || 0), h("td", { class: "num" }, n.failed ? h("span", { class: "abnormal" }, n.failed) : 0),
        h("td", { class: "num" }, n.sent || 0), h("td", {}, when(c.created_at)), h("td", {}, c.reason || ""), h("td", { class: "actions" }, buttons(c)));
    }));
    for (const el of campaigns.querySelectorAll(".progress > span")) el.style.width = `${el.dataset.pct}%`;
    if (!ca.campaigns.length) campaigns.replaceChildren(h("tr", {}, h("td", { colspan: 10, class: "muted" }, "No campaigns.")));
    if (selected) await showCampaign(selected);
  };
  await load();
  const t = setInterval(() => load().catch(() => {}), 3000);
  return () => clearInterval(t);
}

export function register() {
  registerPage({ name: "firmware", label: "Firmware", role: "viewer", nav: true, order: 50, render: firmwarePage });
}
