// The readable reference: /api/openapi.json as a table per tag.
const main = document.getElementById("main");
const h = (tag, cls, text) => { const el = document.createElement(tag); if (cls) el.className = cls; if (text !== undefined) el.textContent = text; return el; };

async function show() {
  const resp = await fetch("/api/openapi.json", { credentials: "same-origin" });
  const doc = await resp.json();
  if (!resp.ok) { main.replaceChildren(h("p", "abnormal", `${doc.error}: ${doc.message}`)); return; }
  main.replaceChildren(h("h1", null, `${doc.info.title} ${doc.info.version}`), h("p", "muted", doc.info.description));
  const byTag = new Map();
  for (const [path, ops] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(ops)) {
      const tag = (op.tags || ["other"])[0];
      if (!byTag.has(tag)) byTag.set(tag, []);
      byTag.get(tag).push([method.toUpperCase(), path, op]);
    }
  }
  for (const [tag, ops] of byTag) {
    main.append(h("h2", null, tag));
    const table = h("table");
    const head = h("tr");
    for (const x of ["method", "path", "role", "what"]) head.append(h("th", null, x));
    table.append(head);
    for (const [method, path, op] of ops) {
      const tr = h("tr");
      tr.append(h("td", null, method), h("td", null, path), h("td", null, op["x-role"] || ""));
      const what = h("td");
      what.append(h("div", null, op.summary));
      if (op.description) what.append(h("div", "muted", op.description));
      tr.append(what);
      table.append(tr);
    }
    main.append(table);
  }
}
show();
