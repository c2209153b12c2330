// A trend chart on a canvas: the server already reduced the series to at most
// ~2,000 min/max points, so drawing is one polyline, whatever the time range.

function fmtTime(t, span) {
  const d = new Date(t * 1000);
  if (span > 2 * 86400) return d.toISOString().slice(5, 16).replace("T", " ");
  return d.toTimeString().slice(0, 8);
}

function fmtValue(v) {
  const a = Math.abs(v);
  if (a !== 0 && (a >= 1e6 || a < 1e-3)) return v.toExponential(2);
  return Number(v.toFixed(3)).toString();
}

/** Draw {t, v} on canvas; returns the number of points drawn. */
export function drawTrend(canvas, t, v) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, hgt = canvas.clientHeight;
  canvas.width = Math.round(w * dpr);
  canvas.height = Math.round(hgt * dpr);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, hgt);
  ctx.font = "12px system-ui, sans-serif";
  ctx.fillStyle = "#5a5a5a";
  if (!t.length) { ctx.fillText("no data in this range", 10, 20); return 0; }
  let lo = Infinity, hi = -Infinity;
  for (let i = 0; i < v.length; i++) { if (v[i] < lo) lo = v[i]; if (v[i] > hi) hi = v[i]; }
  if (hi === lo) { hi += 1; lo -= 1; }
  const t0 = t[0], t1 = t[t.length - 1] === t0 ? t0 + 1 : t[t.length - 1];
  const left = 60, right = 10, top = 10, bottom = 24;
  const pw = w - left - right, ph = hgt - top - bottom;
  const x = (tt) => left + ((tt - t0) / (t1 - t0)) * pw;
  const y = (vv) => top + (1 - (vv - lo) / (hi - lo)) * ph;
  ctx.strokeStyle = "#a8a8a8";
  ctx.lineWidth = 1;
  ctx.beginPath();
  for (let k = 0; k <= 4; k++) {
    const yy = top + (k / 4) * ph;
    ctx.moveTo(left, yy); ctx.lineTo(left + pw, yy);
    ctx.fillText(fmtValue(hi - (k / 4) * (hi - lo)), 2, yy + 4);
  }
  ctx.stroke();
  ctx.fillText(fmtTime(t0, t1 - t0), left, hgt - 6);
  const end = fmtTime(t1, t1 - t0);
  ctx.fillText(end, left + pw - ctx.measureText(end).width, hgt - 6);
  ctx.strokeStyle = "#202020";
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  ctx.moveTo(x(t[0]), y(v[0]));
  for (let i = 1; i < t.length; i++) ctx.lineTo(x(t[i]), y(v[i]));
  ctx.stroke();
  return t.length;
}
