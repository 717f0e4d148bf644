// Hand-drawn SVG charts: stacked bars with an optional line, a half-circle gauge, a sparkline.
// Each returns an SVG string; the page sets it as innerHTML of a container.

export function esc(value) {
  return String(value ?? "")
    .replaceAll("&", "&amp;")
    .replaceAll("<", "&lt;")
    .replaceAll(">", "&gt;")
    .replaceAll('"', "&quot;")
    .replaceAll("'", "&#39;");
}

export const PALETTE = [
  "#58a6ff", "#3fb950", "#d29922", "#bc8cff", "#ff7b72", "#39c5cf", "#f778ba", "#a5d6ff", "#7ee787",
  "#ffa657",
];

/** A round upper bound for an axis and its step (1, 2, 2.5, 5 × 10^n). */
export function niceScale(max, ticks = 4) {
  if (!(max > 0)) return { top: 1, step: 0.25 };
  const raw = max / ticks;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) ?? 10 * mag;
  return { top: step * Math.ceil(max / step), step };
}

/**
 * Stacked bars. `categories` are x labels; `series` [{name, color, values}] stack bottom-up.
 * `line` {values, color, format, label} is drawn on its own right-hand axis (0..max).
 */
export function stackedBars({
  categories, series, width = 800, height = 220, yFormat = (v) => String(v),
  labelEvery = 1, line = null, titles = null,
}) {
  const n = categories.length;
  const totals = categories.map((_, i) => series.reduce((sum, s) => sum + (s.values[i] || 0), 0));
  const { top, step } = niceScale(Math.max(0, ...totals));
  // Room for the widest y label ("US$0.000" in Korean is wider than "$0.000"): ~6.5 units a
  // character at the axis font size, so no label is cut off at the left edge.
  const widest = Math.max(0, ...[0, top / 2, top].map((v) => String(yFormat(v)).length));
  const pad = { left: Math.max(52, 12 + 6.5 * widest), right: line ? 46 : 12, top: 10, bottom: 24 };
  const w = width - pad.left - pad.right;
  const h = height - pad.top - pad.bottom;
  const y = (v) => pad.top + h - (v / top) * h;
  const slot = n ? w / n : w;
  const barW = Math.max(2, Math.min(34, slot * 0.7));
  const parts = [`<svg viewBox="0 0 ${width} ${height}" role="img">`];
  for (let v = 0; v <= top + step / 2; v += step) {
    parts.push(`<line class="grid-line" x1="${pad.left}" x2="${width - pad.right}" y1="${y(v)}" y2="${y(v)}"/>`);
    parts.push(`<text x="${pad.left - 6}" y="${y(v) + 3.5}" text-anchor="end">${esc(yFormat(v))}</text>`);
  }
  categories.forEach((label, i) => {
    const x = pad.left + slot * i + (slot - barW) / 2;
    let base = 0;
    const title = titles ? titles[i] : `${label}: ${yFormat(totals[i])}`;
    parts.push(`<g><title>${esc(title)}</title>`);
    for (const s of series) {
      const v = s.values[i] || 0;
      if (v > 0) {
        const y1 = y(base + v);
        const hh = Math.max(1, y(base) - y1);
        parts.push(`<rect x="${x.toFixed(1)}" y="${y1.toFixed(1)}" width="${barW.toFixed(1)}" height="${hh.toFixed(1)}" rx="1.5" fill="${s.color}"/>`);
      }
      base += v;
    }
    // an invisible full-height target so the tooltip also works on empty days
    parts.push(`<rect x="${(pad.left + slot * i).toFixed(1)}" y="${pad.top}" width="${slot.toFixed(1)}" height="${h}" fill="transparent"/></g>`);
    if (i % labelEvery === 0) {
      parts.push(`<text x="${(x + barW / 2).toFixed(1)}" y="${height - 7}" text-anchor="middle">${esc(label)}</text>`);
    }
  });
  if (line) {
    const lmax = niceScale(Math.max(line.min ?? 0, ...line.values.filter((v) => v != null))).top;
    const ly = (v) => pad.top + h - (v / lmax) * h;
    // A gap (no value: no request in that bucket) breaks the line instead of bridging it.
    const segments = [[]];
    line.values.forEach((v, i) => {
      if (v == null) {
        if (segments[segments.length - 1].length) segments.push([]);
        return;
      }
      segments[segments.length - 1].push(`${(pad.left + slot * i + slot / 2).toFixed(1)},${ly(v).toFixed(1)}`);
    });
    for (const pts of segments) {
      if (pts.length > 1) {
        parts.push(`<polyline points="${pts.join(" ")}" fill="none" stroke="${line.color}" stroke-width="2" stroke-linejoin="round"/>`);
      }
      for (const p of pts) {
        const [cx, cy] = p.split(",");
        parts.push(`<circle cx="${cx}" cy="${cy}" r="2.4" fill="${line.color}"/>`);
      }
    }
    for (const v of [0, lmax / 2, lmax]) {
      parts.push(`<text x="${width - pad.right + 6}" y="${ly(v) + 3.5}" fill="${line.color}" style="fill:${line.color}">${esc(line.format(v))}</text>`);
    }
  }
  parts.push("</svg>");
  return parts.join("");
}

/** A half-circle gauge for a percentage (null: no budget, drawn empty). */
export function gauge({ pct, value, sub }) {
  const r = 70;
  const cx = 90;
  const cy = 86;
  const clamped = pct == null ? 0 : Math.max(0, Math.min(100, pct));
  const angle = Math.PI * (1 - clamped / 100);
  const ex = cx + r * Math.cos(angle);
  const ey = cy - r * Math.sin(angle);
  const color = pct == null ? "#5d6b7e" : pct >= 100 ? "#f85149" : pct >= 80 ? "#d29922" : "#3fb950";
  const arc = (x, yy) => `M ${cx - r} ${cy} A ${r} ${r} 0 0 1 ${x.toFixed(2)} ${yy.toFixed(2)}`;
  return [
    `<svg viewBox="0 0 180 104" role="img">`,
    `<path d="${arc(cx + r, cy)}" fill="none" stroke="#222b38" stroke-width="14" stroke-linecap="round"/>`,
    clamped > 0
      ? `<path d="${arc(ex, ey)}" fill="none" stroke="${color}" stroke-width="14" stroke-linecap="round"/>`
      : "",
    `<text x="${cx}" y="${cy - 18}" text-anchor="middle" style="fill:#e6edf3;font-size:21px;font-weight:600">${esc(value)}</text>`,
    `</svg>`,
    // In HTML, not SVG: a longer label (Korean, a big budget) wraps instead of being cut off.
    `<div class="gauge-sub" style="color:${color}">${esc(sub)}</div>`,
  ].join("");
}

/** A small latency line with status-coloured dots for bad points. */
export function sparkline(points, { width = 200, height = 26 } = {}) {
  const values = points.map((p) => p.v);
  const finite = values.filter((v) => v != null && Number.isFinite(v));
  if (points.length < 2 || !finite.length) return `<svg viewBox="0 0 ${width} ${height}"></svg>`;
  const max = Math.max(...finite) || 1;
  const x = (i) => (i / (points.length - 1)) * (width - 4) + 2;
  const y = (v) => height - 3 - (v / max) * (height - 6);
  const path = points
    .map((p, i) => (p.v == null ? null : `${x(i).toFixed(1)},${y(p.v).toFixed(1)}`))
    .filter(Boolean)
    .join(" ");
  const marks = points
    .map((p, i) =>
      p.bad ? `<rect x="${(x(i) - 1).toFixed(1)}" y="0" width="2" height="${height}" fill="#f85149" opacity=".55"/>` : "",
    )
    .join("");
  return `<svg viewBox="0 0 ${width} ${height}" preserveAspectRatio="none">${marks}<polyline points="${path}" fill="none" stroke="#58a6ff" stroke-width="1.5" vector-effect="non-scaling-stroke"/></svg>`;
}
