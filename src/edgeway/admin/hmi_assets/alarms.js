// The alarms page (/api/alarms): what needs attention first (active and not
// acknowledged, then active, then unacknowledged), most severe first within;
// acknowledge, confirm, reset, clear, shelve (timed or one-shot), unshelve and
// comment, each asking why (kept as the transition's comment and in the
// audit). Live: the overview event carries the alarm service's transition
// count; the list is read again when it moves.
import { api, askReason, can, h, live, registerPage } from "/hmi/app.js";

const when = (ts) => (ts ? new Date(ts * 1000).toISOString().replace("T", " ").slice(11, 19) : "-");
const SHELVE = [["15 min", "15m"], ["1 h", "1h"], ["8 h", "8h"], ["one-shot", null]];

/** Attention order: active+unacked, active, unacked, the rest; then severity, then newest. */
export function attention(a) {
  return a.active && !a.acked ? 0 : a.active ? 1 : !a.acked ? 2 : 3;
}

function sortAlarms(alarms) {
  return alarms.slice().sort((x, y) => attention(x) - attention(y) || y.severity - x.severity
    || (y.active_since || 0) - (x.active_since || 0));
}

function bandBadge(a) {
  const cls = a.band === "high" || a.band === "medium_high" ? "sev-high" : a.band === "medium" ? "sev-medium" : "sev-low";
  // Colour only while it needs someone: an acknowledged, cleared alarm is grey.
  return h("span", { class: a.active || !a.acked ? cls : "muted" }, `${a.band.replace("_", " ")} ${a.severity}`);
}

function stateText(a) {
  const parts = [a.active ? (a.latched ? "latched" : "active") : "cleared", a.acked ? "acknowledged" : "unacknowledged"];
  if (!a.confirmed) parts.push("to confirm");
  if (a.shelved) parts.push(a.shelved.kind === "one_shot" ? "shelved (one-shot)" : `shelved until ${when(a.shelved.until)}`);
  if (a.suppressed) parts.push("suppressed");
  if (a.out_of_service) parts.push("out of service");
  return parts.join(", ");
}

async function alarmsPage(main) {
  const filter = h("select", { id: "alarm-filter" }, [["shown", "shown"], ["all", "all kept"], ["active", "active"], ["unacked", "unacknowledged"], ["shelved", "shelved"]]
    .map(([v, l]) => h("option", { value: v }, l)));
  const msg = h("span", { id: "alarm-message", class: "muted" });
  const body = h("tbody", {});
  const history = h("section", { id: "alarm-history" });
  main.append(h("h1", {}, "Alarms"), h("div", { class: "toolbar" }, filter, h("span", { class: "grow" }), msg),
    h("table", { id: "alarms" }, h("thead", {}, h("tr", {}, ["severity", "source", "type", "message", "state", "since", "count", ""].map((x) => h("th", {}, x)))), body),
    history);
  let off;
  try { await api("/api/alarms?limit=1"); } catch (e) { off = e; }
  if (off) { body.replaceChildren(h("tr", {}, h("td", { colspan: 8, id: "alarms-off" }, off.message))); return null; }

  const act = async (a, action, label, extra = {}) => {
    const why = await askReason(`${label}: ${a.source} / ${a.type}?`);
    if (why === null) return;
    if (action === "comment" && !why) { msg.textContent = "a comment needs its text"; return; }
    try {
      await api(`/api/alarms/${encodeURIComponent(a.source)}/${encodeURIComponent(a.type)}/${action}`,
        { method: "POST", body: { comment: why, ...extra }, reason: why });
      msg.textContent = `${label}: done`;
    } catch (e) { msg.textContent = e.message; }
    await load();
  };
  const buttons = (a) => {
    if (!can("operator")) return "";
    const b = (action, label, extra) => h("button", { type: "button", "data-action": action, onclick: (e) => { e.stopPropagation(); act(a, action, label, extra); } }, label);
    const out = [];
    if (!a.acked) out.push(b("ack", "Acknowledge"));
    if (a.acked && !a.confirmed) out.push(b("confirm", "Confirm"));
    if (a.latched) out.push(b("reset", "Reset"));
    if (a.active && !a.latched) out.push(b("clear", "Clear"));
    if (a.shelved) out.push(b("unshelve", "Unshelve"));
    else {
      const pick = h("select", { "data-shelve": "1", onclick: (e) => e.stopPropagation() }, SHELVE.map(([l, d]) => h("option", { value: d || "" }, l)));
      out.push(h("span", {}, pick, h("button", { type: "button", "data-action": "shelve", onclick: (e) => {
        e.stopPropagation();
        act(a, "shelve", `Shelve (${pick.selectedOptions[0].text})`, pick.value ? { duration: pick.value } : { one_shot: true });
      } }, "Shelve")));
    }
    out.push(b("comment", "Comment"));
    return out;
  };
  const showHistory = async (a) => {
    const doc = await api(`/api/alarms/${encodeURIComponent(a.source)}/${encodeURIComponent(a.type)}/history?limit=20`);
    history.replaceChildren(h("h2", {}, `History of ${a.source} / ${a.type}`),
      h("table", { id: "alarm-transitions" }, h("thead", {}, h("tr", {}, ["when", "action", "by", "comment"].map((x) => h("th", {}, x)))),
        h("tbody", {}, doc.transitions.map((t) => h("tr", {}, h("td", {}, new Date(t.at * 1000).toISOString().replace("T", " ").slice(0, 19)),
          h("td", {}, t.action), h("td", {}, t.by), h("td", {}, t.comment || ""))))));
  };
  const load = async () => {
    const doc = await api(`/api/alarms?state=${filter.value}&limit=1000`);
    body.replaceChildren(...sortAlarms(doc.alarms).map((a) => h("tr", { class: "clickable", "data-alarm": `${a.source}/${a.type}`, "data-acked": a.acked ? "1" : "0", onclick: () => showHistory(a) },
      h("td", {}, bandBadge(a)), h("td", {}, a.source), h("td", {}, a.type), h("td", {}, a.message),
      h("td", { class: "alarm-state" }, stateText(a)), h("td", {}, when(a.active_since || a.raised_at)),
      h("td", { class: "num" }, a.count), h("td", { class: "actions" }, buttons(a)))));
    if (!doc.alarms.length) body.replaceChildren(h("tr", {}, h("td", { colspan: 8, class: "muted" }, "No alarms.")));
  };
  filter.addEventListener("change", load);
  await load();
  let seen = null;
  live(null, { overview: (o) => {
    const t = o.alarms ? o.alarms.transitions : null;
    if (seen !== null && t !== seen) load();
    seen = t;
  } });
  return null;
}

export function register() {
  registerPage({ name: "alarms", label: "Alarms", role: "viewer", nav: true, order: 15, render: alarmsPage });
}
