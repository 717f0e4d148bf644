// The StockPilot Ops dashboard. Reads the public /api/v1 routes every few seconds; every
// panel loads and fails on its own, so one service down greys out its panels only.
import { currentLang, locale, setLang, t, translateStatic } from "./i18n.js";
import { PALETTE, esc, gauge, sparkline, stackedBars } from "./charts.js";
import { spendLogPanel } from "./spendlog.js";

const API = "/api/v1";
const params = new URLSearchParams(location.search);
const REFRESH_MS = Math.max(250, Number(params.get("refresh_ms")) || 5000);
const SLOW_EVERY = 6; // uptime history and the 30-day breakdown: every 6th refresh
const FETCH_TIMEOUT_MS = 8000;
const FEED_MAX = 50;
const LOCK_JOBS_MAX = 24;

class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
    this.detail = detail;
  }
}

let readToken = null;
try {
  readToken = sessionStorage.getItem("stockpilot.readToken");
} catch {
  readToken = null;
}

/** One JSON request; throws ApiError (status 0 when the gateway cannot be reached). */
async function api(path, { method = "GET", bearer, body = null, timeout = FETCH_TIMEOUT_MS } = {}) {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), timeout);
  const headers = { Accept: "application/json" };
  const token = bearer === undefined ? readToken : bearer;
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body != null) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(API + path, {
      method,
      headers,
      body: body == null ? undefined : JSON.stringify(body),
      signal: controller.signal,
      cache: "no-store",
    });
  } catch (err) {
    throw new ApiError(0, err && err.name === "AbortError" ? "timed out" : "gateway unreachable");
  } finally {
    clearTimeout(timer);
  }
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  if (!response.ok) {
    if (bearer === undefined && (response.status === 401 || (response.status === 403 && readToken))) {
      document.getElementById("read-token-button").hidden = false;
    }
    const detail = (data && (data.detail || data.message)) || response.statusText || "error";
    throw new ApiError(response.status, typeof detail === "string" ? detail : JSON.stringify(detail));
  }
  return data;
}

// ----- formatting ------------------------------------------------------------------------

const num = (v) => (typeof v === "number" && Number.isFinite(v) ? v : null);
const fmtInt = (v) => (num(v) == null ? "–" : new Intl.NumberFormat(locale()).format(Math.round(v)));
const fmtDec = (v, digits = 1) =>
  num(v) == null
    ? "–"
    : new Intl.NumberFormat(locale(), { maximumFractionDigits: digits, minimumFractionDigits: digits }).format(v);
const fmtPct = (v, digits = 1) => (num(v) == null ? "–" : `${fmtDec(v, digits)}%`);

function fmtUSD(v) {
  if (num(v) == null) return "–";
  const digits = Math.abs(v) >= 100 ? 0 : Math.abs(v) >= 1 || v === 0 ? 2 : 4;
  return new Intl.NumberFormat(locale(), {
    style: "currency", currency: "USD", minimumFractionDigits: digits, maximumFractionDigits: digits,
  }).format(v);
}

/** A dollar axis formatter with as many decimals as the scale needs. */
function axisUSD(max) {
  const digits = max >= 20 ? 0 : max >= 0.5 ? 2 : 3;
  const format = new Intl.NumberFormat(locale(), {
    style: "currency", currency: "USD", minimumFractionDigits: digits, maximumFractionDigits: digits,
  });
  return (v) => format.format(v);
}

function fmtMs(v) {
  if (num(v) == null) return "–";
  return v >= 1000 ? `${fmtDec(v / 1000, 2)} s` : `${fmtDec(v, v < 10 ? 1 : 0)} ms`;
}

function fmtCompact(v) {
  if (num(v) == null) return "–";
  return new Intl.NumberFormat(locale(), { notation: "compact", maximumFractionDigits: 1 }).format(v);
}

function fmtDuration(seconds) {
  const s = num(seconds);
  if (s == null) return "–";
  const ko = currentLang() === "ko";
  const [h, m, sec] = [Math.floor(s / 3600), Math.floor((s % 3600) / 60), s % 60];
  if (s < 60) return ko ? `${fmtDec(sec, s < 10 ? 1 : 0)}초` : `${fmtDec(sec, s < 10 ? 1 : 0)} s`;
  if (s < 3600) return ko ? `${m}분 ${Math.floor(sec)}초` : `${m} m ${Math.floor(sec)} s`;
  return ko ? `${h}시간 ${m}분` : `${h} h ${m} m`;
}

const parseTime = (iso) => (iso ? new Date(iso) : null);

/** A time in the browser's time zone; the date too when it is not today. */
function fmtTime(iso, withSeconds = true) {
  const d = parseTime(iso);
  if (!d || Number.isNaN(d.getTime())) return "–";
  const sameDay = d.toDateString() === new Date().toDateString();
  const opts = { hour: "2-digit", minute: "2-digit", hourCycle: "h23" };
  if (withSeconds) opts.second = "2-digit";
  if (!sameDay) Object.assign(opts, { month: "short", day: "numeric" });
  return new Intl.DateTimeFormat(locale(), opts).format(d);
}

function fmtRelative(iso) {
  const d = parseTime(iso);
  if (!d || Number.isNaN(d.getTime())) return "–";
  const diff = (d.getTime() - Date.now()) / 1000;
  const rtf = new Intl.RelativeTimeFormat(locale(), { numeric: "auto" });
  const abs = Math.abs(diff);
  if (abs < 60) return rtf.format(Math.round(diff), "second");
  if (abs < 3600) return rtf.format(Math.round(diff / 60), "minute");
  if (abs < 86400) return rtf.format(Math.round(diff / 3600), "hour");
  return rtf.format(Math.round(diff / 86400), "day");
}

/** A server day "2026-11-26" as a short label, without any time-zone shift. */
function fmtDay(day) {
  const [y, m, d] = String(day).split("-").map(Number);
  if (!y || !m || !d) return String(day);
  return new Intl.DateTimeFormat(locale(), { month: "numeric", day: "numeric", timeZone: "UTC" })
    .format(new Date(Date.UTC(y, m - 1, d)));
}

const statusLabel = (s) => t(`status.${s}`) === `status.${s}` ? String(s) : t(`status.${s}`);
const badge = (s, text = statusLabel(s)) =>
  `<span class="badge" data-status="${esc(s)}"><span class="dot"></span>${esc(text)}</span>`;

// ----- shape helpers: tolerate a dict keyed by name or a list of objects -------------------

/** Entries of a `by_*` breakdown as [{key, ...metrics}]. */
function entries(breakdown, ...keyNames) {
  if (!breakdown) return [];
  if (Array.isArray(breakdown)) {
    return breakdown.map((item) => {
      if (item == null || typeof item !== "object") return { key: String(item) };
      const key = [...keyNames, "key", "name"].map((k) => item[k]).find((v) => v != null);
      return { ...item, key: String(key ?? "?") };
    });
  }
  return Object.entries(breakdown).map(([key, value]) =>
    value != null && typeof value === "object" ? { ...value, key } : { key, count: value },
  );
}

const countOf = (e) => num(e.requests) ?? num(e.count) ?? num(e.total) ?? num(e.calls) ?? 0;
const costOf = (e) => num(e.cost_usd) ?? num(e.total_cost_usd) ?? num(e.cost) ?? 0;
const failedOf = (e) => num(e.failed) ?? num(e.failed_requests) ?? num(e.errors) ?? null;

/** A rate given either as a fraction or as a percentage, as a percentage. */
// Every rate the API answers (error_rate, success_rate, used_pct, uptime_pct) is a percentage.
const asPct = (v) => num(v);

// ----- panels ------------------------------------------------------------------------------

const state = { tick: 0, status: null, statusError: null, latencyBy: "model", history: null, lockMessage: null, alerts: new Map(), stream: "connecting" };

/** A per-refresh memo so panels that read the same route share one request. */
function refreshContext() {
  const memo = new Map();
  return {
    get(path) {
      if (!memo.has(path)) memo.set(path, api(path));
      return memo.get(path);
    },
  };
}

const PANELS = [
  { id: "panel-components", service: "health", load: loadComponents, render: renderComponents },
  { id: "panel-cost", service: "usage", load: (ctx) => ctx.get("/usage/costs"), render: renderCost },
  { id: "panel-costchart", service: "usage", load: (ctx) => ctx.get(COST_CHART_PATH), render: renderCostChart },
  { id: "panel-requests", service: "usage", load: loadRequests, render: renderRequests },
  { id: "panel-top", service: "usage", load: (ctx) => ctx.get("/usage/stats"), render: renderTop },
  { id: "panel-latency", service: "usage", load: (ctx) => ctx.get("/usage/stats"), render: renderLatency },
  spendLogPanel({ usd: fmtUSD, int: fmtInt, time: fmtTime, ms: fmtMs, badge }, () => refresh()),
  { id: "panel-executions", service: "batch", load: (ctx) => ctx.get("/batch/executions/recent?limit=12"), render: renderExecutions },
  { id: "panel-jobs", service: "batch", load: (ctx) => ctx.get("/batch/executions/stats"), render: renderJobs },
  { id: "panel-schedules", service: "batch", load: (ctx) => ctx.get("/batch/jobs"), render: renderSchedules },
  { id: "panel-locks", service: "batch", load: loadLocks, render: renderLocks },
];

function serviceDown(service) {
  const svc = state.status && state.status.services && state.status.services[service];
  return Boolean(svc && svc.status === "unavailable");
}

async function runPanel(panel, ctx) {
  if (serviceDown(panel.service)) {
    panel.error = { service: panel.service };
  } else {
    try {
      panel.data = await panel.load(ctx);
      panel.error = null;
    } catch (err) {
      panel.error = err instanceof ApiError ? err : new ApiError(0, String(err));
      if (!(err instanceof ApiError)) console.error(err);
    }
  }
  drawPanel(panel);
}

function errorText(error) {
  if (error.service) return t("panel.serviceDown", { service: t(`service.${error.service}`) });
  return error.status ? `HTTP ${error.status} — ${error.detail}` : error.detail;
}

function drawPanel(panel) {
  const el = document.getElementById(panel.id);
  if (panel.data !== undefined) {
    try {
      panel.render(panel.data);
    } catch (err) {
      console.error(err);
      panel.error = panel.error || new ApiError(0, `could not draw: ${err.message}`);
    }
  }
  const box = el.querySelector(".panel-error");
  const badgeBox = el.querySelector(".state-badge");
  if (panel.error) {
    el.dataset.state = "unavailable";
    const stale = panel.data !== undefined ? ` (${t("panel.staleNote")})` : "";
    box.textContent = t("panel.unavailable", { reason: errorText(panel.error) }) + stale;
    badgeBox.innerHTML = badge("unavailable");
  } else {
    el.dataset.state = "ok";
    box.textContent = "";
    badgeBox.innerHTML = "";
  }
}

// ----- header: /api/v1/status --------------------------------------------------------------

async function loadStatus(ctx) {
  try {
    state.status = await ctx.get("/status");
    state.statusError = null;
  } catch (err) {
    state.status = null;
    state.statusError = err;
  }
  drawHeader();
}

function drawHeader() {
  const overall = document.querySelector("[data-testid=overall-status]");
  const s = state.status;
  const status = s ? s.status : state.statusError ? (state.statusError.status ? "unhealthy" : "offline") : "loading";
  overall.dataset.status = status;
  overall.querySelector(".overall-label").textContent = statusLabel(status);
  overall.title = state.statusError ? errorText(state.statusError) : "";
  document.title = `${statusLabel(status)} · StockPilot Ops`;
  drawReasons(s);
  for (const name of ["health", "usage", "batch"]) {
    const el = document.querySelector(`[data-testid=service-${name}]`);
    const svc = s && s.services ? s.services[name] : null;
    el.dataset.status = svc ? svc.status : state.statusError ? "unknown" : "loading";
    el.title = svc
      ? [statusLabel(svc.status), svc.detail, svc.lag ? `lag ${svc.lag}` : null].filter(Boolean).join(" · ")
      : "";
  }
  const alerts = document.querySelector("[data-testid=alerts-24h]");
  alerts.textContent = s && num(s.alerts_24h) != null ? t("header.alerts24h", { n: fmtInt(s.alerts_24h) }) : "";
  if (state.updatedAt) {
    document.querySelector("[data-testid=last-updated]").textContent = t("header.updated", {
      time: fmtTime(state.updatedAt.toISOString()),
    });
  }
}

// ----- headline reasons: why the status is what it is ---------------------------------------

const AREA_ORDER = ["dependencies", "llm_spend", "llm_errors", "batch", "locks", "services", "alert_hooks"];

/** A reason's or an area's params made readable in the chosen language. */
function readable(params = {}) {
  const out = {};
  for (const [k, v] of Object.entries(params)) out[k] = v == null ? "–" : v;
  const p = params;
  if (p.period) out.period = t(`period.${p.period}`);
  if (p.service) out.serviceName = t(`service.${p.service}`);
  if (p.name && ["health", "usage", "batch"].includes(p.name)) out.serviceName = t(`service.${p.name}`);
  for (const k of ["cost_usd", "budget_usd", "today_usd", "month_usd"]) if (k in p) out[k] = fmtUSD(p[k]);
  for (const k of ["pct", "rate", "today_pct", "month_pct"]) if (k in p) out[k] = p[k] == null ? "–" : fmtDec(p[k], k === "rate" ? 1 : 0);
  if ("ago_s" in p) out.ago = fmtRelative(new Date(Date.now() - 1000 * (num(p.ago_s) ?? 0)).toISOString());
  return out;
}

/** The server's English sentence, or the same said in the chosen language (by its code). */
function explain(code, params, english) {
  if (currentLang() === "en") return english;
  const key = `why.${code}`;
  const text = t(key, readable(params));
  return text === key ? english : text;
}

function drawReasons(s) {
  const count = document.querySelector("[data-testid=reason-count]");
  const list = document.querySelector("[data-testid=reasons-list]");
  const areas = document.querySelector("[data-testid=areas-list]");
  const reasons = (s && s.reasons) || [];
  count.textContent = reasons.length ? t("reasons.count", { n: fmtInt(reasons.length) }) : "";
  if (!s) {
    list.innerHTML = `<li class="empty">${esc(state.statusError ? errorText(state.statusError) : t("status.loading"))}</li>`;
    areas.innerHTML = "";
    return;
  }
  list.innerHTML = reasons.length
    ? reasons.map((r) => `<li class="reason" data-testid="status-reason" data-area="${esc(r.area)}" data-severity="${esc(r.severity)}" data-code="${esc(r.code || "")}">
        <span class="reason-area">${esc(t(`area.${r.area}`))}</span>
        <span class="reason-text">${esc(explain(r.code, r.params, r.message))}</span>
      </li>`).join("")
    : `<li class="empty">${esc(t("reasons.none"))}</li>`;
  const given = s.areas || {};
  areas.innerHTML = AREA_ORDER.filter((name) => given[name]).map((name) => {
    const a = given[name];
    return `<li class="area" data-testid="status-area" data-area="${esc(name)}" data-status="${esc(a.status)}">
      <span class="dot"></span><span class="area-name">${esc(t(`area.${name}`))}</span>
      <span class="area-summary">${esc(explain(a.code, a.params, a.summary))}</span>
    </li>`;
  }).join("");
}

function toggleReasons(open) {
  const head = document.getElementById("headline");
  const next = open ?? !head.classList.contains("open");
  head.classList.toggle("open", next);
  document.querySelector("[data-testid=overall-status]").setAttribute("aria-expanded", String(next));
}

document.querySelector("[data-testid=overall-status]").addEventListener("click", () => toggleReasons());
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape") toggleReasons(false);
});
document.addEventListener("click", (event) => {
  if (!event.target.closest("#headline")) toggleReasons(false);
});

// ----- components --------------------------------------------------------------------------

const COMPONENT_ORDER = ["database", "redis", "openai"];

async function loadComponents(ctx) {
  const comprehensive = await ctx.get("/health/comprehensive");
  if (!state.history || state.tick % SLOW_EVERY === 1) {
    try {
      state.history = await api("/health/history?hours=24");
    } catch {
      // uptime is a detail of this panel: keep the last series rather than failing it
    }
  }
  return { comprehensive, history: state.history, statusComponents: (state.status && state.status.components) || {} };
}

function renderComponents({ comprehensive, history, statusComponents }) {
  const byName = new Map();
  for (const c of comprehensive.components || []) byName.set(c.name, c);
  if (!byName.size) {
    // no probe answer in detail yet: at least the statuses the summary knows
    for (const [name, status] of Object.entries(statusComponents)) {
      if (name === "database" || name === "redis" || name === "openai" || name.startsWith("external.")) {
        byName.set(name, { name, status, kind: name.startsWith("external.") ? "external_api" : name });
      }
    }
  }
  const series = new Map((history && history.series ? history.series : []).map((s) => [s.component, s]));
  const names = [...byName.keys()].sort((a, b) => {
    const ia = COMPONENT_ORDER.indexOf(a);
    const ib = COMPONENT_ORDER.indexOf(b);
    return (ia < 0 ? 99 : ia) - (ib < 0 ? 99 : ib) || a.localeCompare(b);
  });
  const box = document.getElementById("component-tiles");
  if (!names.length) {
    box.innerHTML = `<div class="empty">${esc(t("components.none"))}</div>`;
  } else {
    box.innerHTML = names.map((name) => {
      const c = byName.get(name);
      const s = series.get(name);
      const points = s && s.points ? s.points.slice(-60).map((p) => ({ v: num(p.latency_ms), bad: p.status === "unhealthy" })) : [];
      const label = name.startsWith("external.") ? name.slice("external.".length) : name;
      const kind = c.kind && t(`kind.${c.kind}`) !== `kind.${c.kind}` ? t(`kind.${c.kind}`) : c.kind || "";
      const uptime = s ? asPctStrict(s.uptime_pct) : null;
      // A probe switched off is "not configured" (and says how to switch it on), not "unknown".
      const off = c.details && c.details.configured === false;
      const setting = off ? c.details.enable_with : null;
      const hint = off ? t("components.enableWith", { setting: setting || "?" }) : null;
      return `<div class="tile" data-testid="component-${esc(name)}" data-status="${esc(c.status)}" data-configured="${off ? "false" : "true"}" title="${esc(c.checked_at ? fmtTime(c.checked_at) : "")}">
        <div class="tile-head"><span class="tile-name">${esc(label)}</span>${off ? badge("unknown", t("components.notConfigured")) : badge(c.status)}</div>
        <div class="tile-kind">${esc(kind)}</div>
        <div class="tile-metrics"><span>${esc(t("components.latency"))} <b>${esc(fmtMs(c.latency_ms))}</b></span>
          <span>${esc(t("components.uptime"))} <b>${esc(fmtPct(uptime, uptime === 100 ? 0 : 1))}</b></span></div>
        ${sparkline(points)}
        ${c.error ? `<div class="tile-error" title="${esc(c.error)}">${esc(c.error)}</div>` : ""}
        ${hint ? `<div class="tile-hint" title="${esc(hint)}">${esc(hint)}</div>` : ""}
      </div>`;
    }).join("");
  }
  const m = comprehensive.system_metrics;
  document.getElementById("system-metrics").textContent = m
    ? t("components.system", { cpu: fmtDec(m.cpu_percent, 0), mem: fmtDec(m.memory_percent, 0), disk: fmtDec(m.disk_percent, 0) })
    : "";
}

// uptime_pct is a percentage by contract
const asPctStrict = (v) => num(v);

// ----- cost gauges and forecast --------------------------------------------------------------

function monthForecast(costs) {
  const month = costs.month || {};
  const given = (costs.forecast && num(costs.forecast.month_end_cost_usd)) ?? num(month.forecast_usd);
  if (given != null) return given;
  // Linear from the days elapsed so far (the last daily entry is the server's today).
  const days = costs.daily || [];
  const today = days.length ? String(days[days.length - 1].date) : null;
  const [y, m, d] = today ? today.split("-").map(Number) : [];
  const cost = num(month.cost_usd);
  if (!y || !m || !d || cost == null) return null;
  const inMonth = new Date(Date.UTC(y, m, 0)).getUTCDate();
  const fraction = (d - 1 + (new Date().getHours() * 60 + new Date().getMinutes()) / 1440) / inMonth;
  return fraction > 0 ? cost / fraction : cost;
}

function renderCost(costs) {
  const one = (id, title, period) => {
    const p = period || {};
    const pct = num(p.used_pct) ?? (num(p.budget_usd) ? (100 * (p.cost_usd || 0)) / p.budget_usd : null);
    const sub = num(p.budget_usd)
      ? t("cost.ofBudget", { pct: fmtPct(pct, 0), budget: fmtUSD(p.budget_usd) })
      : t("cost.noBudget");
    document.getElementById(id).innerHTML =
      `<div class="gauge-title">${esc(title)}</div>` +
      gauge({ pct: num(p.budget_usd) ? pct : null, value: fmtUSD(p.cost_usd), sub });
  };
  one("gauge-today", t("cost.today"), costs.today);
  one("gauge-month", t("cost.month"), costs.month);
  const forecast = monthForecast(costs);
  const budget = costs.month ? num(costs.month.budget_usd) : null;
  const box = document.getElementById("forecast");
  box.classList.toggle("over", budget != null && forecast != null && forecast > budget);
  box.innerHTML = forecast == null ? "" :
    esc(t("cost.forecast", { value: "\u0000" })).replace("\u0000", `<b>${esc(fmtUSD(forecast))}</b>`) +
    (budget ? ` ${esc(t("cost.forecastBudget", { pct: fmtDec((100 * forecast) / budget, 0), budget: fmtUSD(budget) }))}` : "");
  const models = entries(costs.by_model, "model").map((e) => ({ ...e, n: costOf(e) }))
    .filter((e) => e.n > 0).sort((a, b) => b.n - a.n).slice(0, 4);
  document.getElementById("month-models").innerHTML = models.length
    ? `<h3>${esc(t("cost.byModel"))}</h3>` + rankRows(models, {
      color: "#bc8cff",
      value: (e) => `${fmtUSD(e.n)} · ${t("top.calls", { n: fmtInt(countOf(e)) })}`,
    })
    : "";
  const unpriced = entries(costs.unpriced_models, "model").map((e) => e.key);
  document.getElementById("unpriced").textContent = unpriced.length ? t("cost.unpriced", { models: unpriced.join(", ") }) : "";
}

// ----- 30-day cost by model ------------------------------------------------------------------

// One request for the whole chart: the server's default day range is the same 30 days as
// /usage/costs' `daily`, and `series` holds its ten dearest models plus `(other)`. (It used
// to take one /usage/stats?date= per day with calls: up to 30 requests per draw.)
const COST_CHART_PATH = "/usage/timeseries?bucket=day&group_by=model";
const OTHER_KEY = "(other)";
const OTHER_COLOR = "#5d6b7e";

/** A bucket's day as the server names it: `t` is its start in STOCKPILOT_TZ, so the date
 * part of the ISO text is the server's day, whatever the browser's zone. */
const serverDay = (iso) => String(iso).slice(0, 10);

function renderCostChart(answer) {
  const points = answer.points || [];
  const days = points.map((p) => serverDay(p.t));
  const totals = points.map((p) => num(p.cost_usd) ?? 0);
  const grand = totals.reduce((a, b) => a + b, 0);
  const chart = document.getElementById("cost-chart");
  const legend = document.getElementById("cost-legend");
  const note = document.getElementById("cost-note");
  if (!days.length || grand <= 0) {
    chart.innerHTML = `<div class="empty">${esc(t("costchart.none"))}</div>`;
    legend.innerHTML = "";
    note.textContent = "";
    return;
  }
  // The server's order (dearest first, `(other)` last); a model that cost nothing in the
  // range draws no bar, so it takes no colour and no legend entry either.
  const series = (answer.series || [])
    .map((s) => ({ key: s.key, values: days.map((_, i) => (s.points && s.points[i] ? num(s.points[i].cost_usd) ?? 0 : 0)) }))
    .filter((s) => s.values.some((v) => v > 0))
    .map((s, i) => ({
      key: s.key,
      name: s.key === OTHER_KEY ? t("costchart.other") : s.key,
      color: s.key === OTHER_KEY ? OTHER_COLOR : PALETTE[i % PALETTE.length],
      values: s.values,
    }));
  chart.innerHTML = stackedBars({
    categories: days.map(fmtDay),
    series,
    width: 860,
    height: 230,
    yFormat: axisUSD(Math.max(...totals)),
    labelEvery: days.length > 16 ? 3 : 1,
    titles: days.map((day, i) => [`${day}: ${fmtUSD(totals[i])}`,
      ...series.filter((s) => s.values[i] > 0).map((s) => `${s.name}: ${fmtUSD(s.values[i])}`)].join("\n")),
  });
  legend.innerHTML = series.map((s) =>
    `<span data-testid="cost-legend-item" data-key="${esc(s.key)}"><i style="background:${s.color}"></i>${esc(s.name)}<b>${esc(fmtUSD(s.values.reduce((a, b) => a + b, 0)))}</b></span>`,
  ).join("") + `<span>· ${esc(t("costchart.total"))}<b>${esc(fmtUSD(grand))}</b></span>`;
  // Say when a bar is not every model by name: keys added up under "other", or calls the
  // per-model cells could not tell apart (the server's notes say why, in English).
  const otherKeys = num(answer.other_keys) ?? 0;
  const coverage = answer.coverage || {};
  const notes = [];
  if (otherKeys > 0) notes.push(t("costchart.otherKeys", { n: fmtInt(otherKeys) }));
  // Only calls matter here: a coverage that is inexact for percentiles alone (which this
  // chart does not draw) has no unattributed calls and earns no note.
  const unattributed = num(coverage.unattributed_calls) ?? 0;
  if (coverage.exact === false && unattributed > 0) notes.push(t("costchart.inexact", { n: fmtInt(unattributed) }));
  note.textContent = notes.join(" ");
  note.title = unattributed > 0 ? (coverage.notes || []).join("\n") : "";
}

// ----- requests today ------------------------------------------------------------------------

async function loadRequests(ctx) {
  const [series, stats] = await Promise.all([ctx.get("/usage/timeseries"), ctx.get("/usage/stats")]);
  return { series, stats };
}

function renderRequests({ series, stats }) {
  const total = num(stats.total_requests) ?? 0;
  const failed = num(stats.failed_requests) ?? 0;
  // No calls: no rate and no latency ("–"), never a reassuring 0 %.
  const errorRate = total ? (100 * failed) / total : asPct(stats.error_rate);
  document.getElementById("kpi-requests").textContent = fmtInt(total);
  const er = document.getElementById("kpi-error-rate");
  er.textContent = fmtPct(errorRate);
  er.classList.toggle("bad", errorRate != null && errorRate >= 20);
  document.getElementById("kpi-latency").textContent = total
    ? `${fmtMs(stats.avg_response_time_ms)} / ${fmtMs(stats.p95_response_time_ms)}`
    : "–";
  document.getElementById("kpi-tokens").textContent = fmtCompact(stats.total_tokens);
  document.getElementById("kpi-rpm").textContent = fmtDec(stats.requests_per_minute, 1);
  const points = series.points || [];
  const clock = new Intl.DateTimeFormat(locale(), { hour: "2-digit", minute: "2-digit", hourCycle: "h23" });
  const labels = points.map((p) => clock.format(new Date(p.t)));
  const ok = points.map((p) => Math.max(0, (p.requests || 0) - (p.failed || 0)));
  const bad = points.map((p) => p.failed || 0);
  const rate = points.map((p) => (p.requests ? (100 * (p.failed || 0)) / p.requests : null));
  document.getElementById("requests-chart").innerHTML = stackedBars({
    categories: labels,
    series: [
      { name: t("requests.ok"), color: "#2f81f7", values: ok },
      { name: t("requests.failed"), color: "#f85149", values: bad },
    ],
    width: 860,
    height: 200,
    yFormat: (v) => fmtCompact(v),
    labelEvery: points.length > 12 ? 3 : 1,
    line: { values: rate, color: "#d29922", format: (v) => `${fmtDec(v, 0)}%`, min: 10 },
    titles: points.map((p, i) => `${fmtTime(p.t, false)} · ${fmtInt(p.requests)} · ${t("requests.failed")} ${fmtInt(p.failed)} · ${fmtUSD(p.cost_usd)} · p95 ${fmtMs(p.p95_response_time_ms)}`),
  });
  document.getElementById("requests-legend").innerHTML = [
    ["#2f81f7", t("requests.ok")], ["#f85149", t("requests.failed")], ["#d29922", t("requests.errorRate")],
  ].map(([c, n]) => `<span><i style="background:${c}"></i>${esc(n)}</span>`).join("");
}

// ----- top endpoints and error codes ---------------------------------------------------------

function rankRows(items, { color, value }) {
  const max = Math.max(1, ...items.map((e) => e.n));
  return items.map((e) => `<div class="rank-row" data-key="${esc(e.key)}"><span class="rank-name" title="${esc(e.key)}">${esc(e.key)}</span>
    <span class="rank-value">${esc(value(e))}</span>
    <div class="bar" style="--c:${color}"><span style="width:${((100 * e.n) / max).toFixed(1)}%"></span></div></div>`).join("");
}

function renderTop(stats) {
  const eps = entries(stats.by_endpoint, "endpoint").map((e) => ({ ...e, n: countOf(e) }))
    .sort((a, b) => b.n - a.n).slice(0, 6);
  document.getElementById("top-endpoints").innerHTML = eps.length
    ? rankRows(eps, {
      color: "#58a6ff",
      value: (e) => {
        const f = failedOf(e);
        return [t("top.calls", { n: fmtInt(e.n) }), f ? fmtPct((100 * f) / (e.n || 1)) : null, costOf(e) ? fmtUSD(costOf(e)) : null].filter(Boolean).join(" · ");
      },
    })
    : `<div class="empty">${esc(t("top.none"))}</div>`;
  const errs = entries(stats.by_error_code, "error_code", "code").map((e) => ({ ...e, n: countOf(e) }))
    .filter((e) => e.n > 0).sort((a, b) => b.n - a.n).slice(0, 6);
  document.getElementById("top-errors").innerHTML = errs.length
    ? rankRows(errs, { color: "#f85149", value: (e) => fmtInt(e.n) })
    : `<div class="empty">${esc(t("top.noErrors"))}</div>`;
}

// ----- latency by model and by endpoint -----------------------------------------------------

const LATENCY_ROWS = 12;

/** Today's response times per model or per endpoint (the toggle), busiest first; a dash
 * where the server keeps no percentile (null). Reads the refresh's one /usage/stats. */
function renderLatency(stats) {
  const by = state.latencyBy;
  for (const button of document.querySelectorAll("#latency-toggle button")) {
    button.setAttribute("aria-pressed", String(button.dataset.by === by));
  }
  document.getElementById("latency-key").textContent = t(by === "model" ? "latency.model" : "latency.endpoint");
  const rows = entries(by === "model" ? stats.by_model : stats.by_endpoint, by)
    .sort((a, b) => countOf(b) - countOf(a) || a.key.localeCompare(b.key))
    .slice(0, LATENCY_ROWS);
  const body = document.getElementById("latency-rows");
  body.innerHTML = rows.length
    ? rows.map((e) => `<tr data-testid="latency-row" data-key="${esc(e.key)}">
        <td class="job" title="${esc(e.key)}">${esc(e.key)}</td>
        <td class="num">${esc(fmtInt(countOf(e)))}</td>
        <td class="num" data-testid="latency-avg">${esc(fmtMs(e.avg_response_time_ms))}</td>
        <td class="num" data-testid="latency-p50">${esc(fmtMs(e.p50_response_time_ms))}</td>
        <td class="num" data-testid="latency-p95">${esc(fmtMs(e.p95_response_time_ms))}</td>
        <td class="num" data-testid="latency-p99">${esc(fmtMs(e.p99_response_time_ms))}</td>
      </tr>`).join("")
    : `<tr><td colspan="6" class="empty">${esc(t("top.none"))}</td></tr>`;
}

document.getElementById("latency-toggle").addEventListener("click", (event) => {
  const button = event.target.closest("button[data-by]");
  if (!button || button.dataset.by === state.latencyBy) return;
  state.latencyBy = button.dataset.by;
  const panel = PANELS.find((p) => p.id === "panel-latency");
  if (panel.data !== undefined || panel.error) drawPanel(panel);
});

// ----- batch executions ------------------------------------------------------------------------

function renderExecutions(answer) {
  const rows = (answer.executions || []).slice(0, 12);
  const body = document.getElementById("executions");
  if (!rows.length) {
    body.innerHTML = `<tr><td colspan="7" class="empty">${esc(t("exec.none"))}</td></tr>`;
    return;
  }
  body.innerHTML = rows.map((x) => {
    const running = x.status === "running";
    const started = parseTime(x.started_at);
    const lastBeat = parseTime(x.last_heartbeat_at);
    const duration = num(x.duration_s)
      ?? (running && started ? (Date.now() - started.getTime()) / 1000
        : x.status === "lost" && started && lastBeat ? (lastBeat.getTime() - started.getTime()) / 1000 : null);
    const pct = num(x.progress_pct) ?? (x.items_total ? (100 * (x.items_processed || 0)) / x.items_total : x.status === "succeeded" ? 100 : null);
    const barColor = x.status === "failed" || x.status === "lost" ? "var(--bad)" : running ? "var(--accent)" : "var(--ok)";
    return `<tr data-testid="execution-row" data-execution-id="${esc(x.execution_id)}" data-status="${esc(x.status)}">
      <td class="job" title="${esc(x.execution_id)}">${esc(x.job_id)}</td>
      <td>${badge(x.status)}${x.error ? `<div class="err" title="${esc(x.error)}">${esc(x.error)}</div>` : ""}</td>
      <td>${esc(fmtTime(x.started_at))}</td>
      <td class="num">${esc(fmtDuration(duration))}</td>
      <td class="num">${num(x.throughput_per_s) == null ? "–" : esc(`${fmtDec(x.throughput_per_s, x.throughput_per_s < 10 ? 1 : 0)}/s`)}</td>
      <td class="num">${num(x.peak_memory_mb) == null ? "–" : esc(`${fmtInt(x.peak_memory_mb)} MB`)}</td>
      <td><div class="progress"><div class="bar" style="--c:${barColor}"><span style="width:${Math.max(0, Math.min(100, pct ?? 0)).toFixed(1)}%"></span></div><small>${esc(pct == null ? "–" : fmtPct(pct, 0))}</small></div></td>
    </tr>`;
  }).join("");
}

function renderJobs(stats) {
  const jobs = entries(stats.by_job, "job_id").map((e) => {
    const ok = num(e.succeeded) ?? 0;
    const failed = num(e.failed) ?? 0;
    const total = num(e.total) ?? ok + failed + (num(e.running) ?? 0);
    const finished = ok + failed + (num(e.cancelled) ?? 0) + (num(e.lost) ?? 0);
    const rate = finished ? (100 * ok) / finished : asPct(e.success_rate);
    return { key: e.key, ok, total, rate };
  }).sort((a, b) => (a.rate ?? 101) - (b.rate ?? 101) || a.key.localeCompare(b.key));
  const box = document.getElementById("jobs");
  box.innerHTML = jobs.length
    ? jobs.map((j) => {
      const color = j.rate == null ? "var(--unknown)" : j.rate >= 95 ? "var(--ok)" : j.rate >= 75 ? "var(--warn)" : "var(--bad)";
      return `<div class="rank-row" data-testid="job-row" data-job-id="${esc(j.key)}"><span class="rank-name">${esc(j.key)}</span>
        <span class="rank-value"><b style="color:${color}">${esc(fmtPct(j.rate, 0))}</b> · ${esc(t("jobs.runs", { ok: fmtInt(j.ok), n: fmtInt(j.total) }))}</span>
        <div class="bar" style="--c:${color}"><span style="width:${(j.rate ?? 0).toFixed(1)}%"></span></div></div>`;
    }).join("")
    : `<div class="empty">${esc(t("jobs.none"))}</div>`;
  const patterns = entries(stats.failure_patterns, "error").slice(0, 4);
  // The two patterns the batch service itself words are said in the chosen language.
  const own = { "execution lost: heartbeats stopped": "jobs.lostPattern", "failed without an error message": "jobs.noMessagePattern" };
  const said = (key) => (own[key] ? t(own[key]) : key);
  document.getElementById("failures").innerHTML = patterns.length
    ? patterns.map((p) => `<div class="failure"><span title="${esc(p.example || p.key)}">${esc(said(p.key))}</span><span class="count">×${esc(fmtInt(countOf(p)))}${p.last_seen ? ` · ${esc(fmtTime(p.last_seen, false))}` : ""}</span></div>`).join("")
    : `<div class="empty">${esc(t("jobs.noFailures"))}</div>`;
}

// ----- scheduled jobs: state and next expected start (GET /batch/jobs) ---------------------

/** A job's schedule in words: "every 1 h 0 m" or "cron 0 2 * * * (Asia/Seoul)", and its grace. */
function scheduleText(s) {
  if (!s) return { main: t("sched.unscheduled"), grace: "" };
  const main = s.cron != null
    ? t("sched.cron", { cron: s.cron, tz: s.tz || "UTC" })
    : t("sched.every", { every: fmtDuration(s.every_s) });
  return { main, grace: t("sched.grace", { grace: fmtDuration(s.grace_s) }) };
}

// Jobs that need a look first: missed, failing, late, then the rest by name.
const SCHED_RANK = { missed: 0, failing: 1, late: 2, running: 3, new: 4, up: 5 };

function renderSchedules(answer) {
  const jobs = [...(answer.jobs || [])].sort((a, b) =>
    (SCHED_RANK[a.state] ?? 9) - (SCHED_RANK[b.state] ?? 9) || a.job_id.localeCompare(b.job_id));
  const body = document.getElementById("schedules");
  if (!jobs.length) {
    body.innerHTML = `<tr><td colspan="5" class="empty">${esc(t("sched.none"))}</td></tr>`;
    return;
  }
  body.innerHTML = jobs.map((j) => {
    const sched = scheduleText(j.schedule);
    const last = j.last_execution;
    const lastCell = last
      ? `${badge(last.status)}<div class="sub">${esc(fmtRelative(last.started_at))}</div>`
      : `<span class="muted">${esc(t("sched.never"))}</span>`;
    const overdue = j.state === "late" || j.state === "missed";
    const expected = j.next_expected_at
      ? `<div class="${overdue ? "overdue" : ""}">${esc(fmtTime(j.next_expected_at, false))} · ${esc(fmtRelative(j.next_expected_at))}</div>`
      : "–";
    const more = [];
    if (j.missed_slots) more.push(t("sched.missedSlots", { n: fmtInt(j.missed_slots) }));
    if (overdue && j.next_slot_at) more.push(t("sched.nextSlot", { time: fmtTime(j.next_slot_at, false) }));
    return `<tr data-testid="schedule-row" data-job-id="${esc(j.job_id)}" data-state="${esc(j.state)}">
      <td class="job">${esc(j.job_id)}</td>
      <td>${badge(`job-${j.state}`, t(`sched.state.${j.state}`))}</td>
      <td title="${esc(`${sched.main} · ${sched.grace}`)}"><div>${esc(sched.main)}</div>${sched.grace ? `<div class="sub">${esc(sched.grace)}</div>` : ""}</td>
      <td>${lastCell}</td>
      <td data-testid="schedule-next">${expected}${more.length ? `<div class="sub">${esc(more.join(" · "))}</div>` : ""}</td>
    </tr>`;
  }).join("");
}

// ----- locks ---------------------------------------------------------------------------------

async function loadLocks(ctx) {
  // Every held lock in one answer (GET /batch/locks, beyond the contract); the per-job
  // lookups below are the fallback for a gateway without that route.
  const all = await ctx.get("/batch/locks").catch(() => null);
  // A lock taken for a run whose heartbeats stopped is held by nobody alive: say so.
  const latest = await ctx.get("/batch/executions/recent?limit=200").catch(() => ({ executions: [] }));
  const runs = new Map((latest.executions || []).map((x) => [x.execution_id, x.status]));
  const judged = (l) => ({ ...l, run: l.execution_id ? runs.get(l.execution_id) ?? null : null });
  if (all && Array.isArray(all.locks)) {
    const held = all.locks.filter((l) => l.locked || l.expired).map(judged);
    held.sort((a, b) => lockRank(b) - lockRank(a) || a.job_id.localeCompare(b.job_id));
    return { held };
  }
  const [expired, recent, stats] = await Promise.all([
    ctx.get("/batch/locks/expired"),
    ctx.get("/batch/executions/recent?limit=12").catch(() => ({ executions: [] })),
    ctx.get("/batch/executions/stats").catch(() => ({})),
  ]);
  // Ask the lock status of every job we know of.
  const jobs = new Set();
  for (const l of expired.locks || []) jobs.add(l.job_id);
  for (const x of recent.executions || []) jobs.add(x.job_id);
  for (const e of entries(stats.by_job, "job_id")) jobs.add(e.key);
  const known = [...jobs].filter(Boolean).slice(0, LOCK_JOBS_MAX);
  const statuses = await Promise.all(known.map((job) =>
    api(`/batch/jobs/${encodeURIComponent(job)}/lock/status`).catch(() => null)));
  const byJob = new Map((expired.locks || []).map((l) => [l.job_id, { ...l, expired: true }]));
  for (const s of statuses) if (s) byJob.set(s.job_id, s);
  const held = [...byJob.values()].filter((l) => l.locked || l.expired).map(judged);
  held.sort((a, b) => lockRank(b) - lockRank(a) || a.job_id.localeCompare(b.job_id));
  return { held };
}

/** expired, then held for a lost run, then held: what needs a hand comes first. */
const lockState = (l) => (l.expired ? "expired" : l.run === "lost" ? "lost" : "held");
const lockRank = (l) => ({ expired: 2, lost: 1, held: 0 })[lockState(l)];

function renderLocks({ held }) {
  const body = document.getElementById("locks");
  body.innerHTML = held.length
    ? held.map((l) => {
      const how = lockState(l);
      const badgeStatus = how === "held" ? "running" : how;
      const label = { expired: t("status.expired"), lost: t("locks.runLost"), held: t("status.held") }[how];
      // The state badge already says "Expired": the cell keeps to the time, so it fits.
      const expires = fmtRelative(l.expires_at);
      const acquired = `${t("locks.acquired")} ${fmtTime(l.acquired_at)}`;
      return `<tr data-testid="lock-row" data-job-id="${esc(l.job_id)}" data-expired="${l.expired ? "true" : "false"}" data-lock-state="${how}" class="${how === "held" ? "" : "expired"}">
        <td class="job" title="${esc(`${l.job_id} · ${acquired}`)}">${esc(l.job_id)}</td>
        <td>${badge(badgeStatus, label)}</td>
        <td class="owner" title="${esc(l.owner ?? "")}">${esc(l.owner ?? "–")}</td>
        <td class="expires" title="${esc(fmtTime(l.expires_at))}">${esc(expires)}</td>
        <td class="num">${esc(l.fencing_token ?? "–")}</td>
        <td class="num"><button type="button" class="danger" data-testid="lock-release" data-job-id="${esc(l.job_id)}">${esc(t("locks.release"))}</button></td>
      </tr>`;
    }).join("")
    : `<tr><td colspan="6" class="empty">${esc(t("locks.none"))}</td></tr>`;
  drawLockMessage();
}

function drawLockMessage() {
  const box = document.getElementById("lock-message");
  const m = state.lockMessage;
  box.hidden = !m;
  if (m) {
    box.dataset.kind = m.kind;
    box.textContent = t(m.key, m.vars);
  }
}

const dialog = document.getElementById("token-dialog");

function askToken(job) {
  return new Promise((resolve) => {
    const input = document.getElementById("token-input");
    const form = document.getElementById("token-form");
    document.getElementById("token-text").textContent = t("token.text", { job });
    input.value = "";
    const finish = (value) => {
      form.removeEventListener("submit", onSubmit);
      document.getElementById("token-cancel").removeEventListener("click", onCancel);
      dialog.removeEventListener("cancel", onCancel);
      if (dialog.open) dialog.close();
      resolve(value);
    };
    const onSubmit = (event) => {
      event.preventDefault();
      finish(input.value.trim());
    };
    const onCancel = (event) => {
      event.preventDefault();
      finish(null);
    };
    form.addEventListener("submit", onSubmit);
    document.getElementById("token-cancel").addEventListener("click", onCancel);
    dialog.addEventListener("cancel", onCancel);
    dialog.showModal();
    input.focus();
  });
}

async function releaseLock(job) {
  const token = await askToken(job);
  if (token === null) return;
  try {
    const answer = await api(`/batch/jobs/${encodeURIComponent(job)}/lock/release`, {
      method: "POST",
      bearer: token || null,
      body: { reason: "released from the dashboard" },
    });
    state.lockMessage = answer.released
      ? { kind: "ok", key: "locks.released", vars: { job, owner: answer.previous_owner ?? "–" } }
      : { kind: "ok", key: "locks.notHeld", vars: { job } };
  } catch (err) {
    const refused = err.status === 401 || err.status === 403;
    state.lockMessage = {
      kind: "error",
      key: refused ? "locks.refused" : "locks.failed",
      vars: { job, status: err.status || "–", detail: err.detail },
    };
  }
  drawLockMessage();
  refresh();
}

document.getElementById("locks").addEventListener("click", (event) => {
  const button = event.target.closest("[data-testid=lock-release]");
  if (button) releaseLock(button.dataset.jobId);
});

// ----- live alerts ---------------------------------------------------------------------------

function addAlert(alert, fresh) {
  if (!alert || !alert.id) return;
  const existing = state.alerts.get(alert.id);
  state.alerts.set(alert.id, { ...alert, fresh: fresh && !existing });
  if (state.alerts.size > FEED_MAX * 2) {
    const keep = [...state.alerts.values()].sort(byNewest).slice(0, FEED_MAX);
    state.alerts = new Map(keep.map((a) => [a.id, a]));
  }
}

/** The alert's title and message in the chosen language, from its kind and params. */
function alertText(a) {
  const p = a.params || {};
  if (currentLang() === "en" || !a.kind) return { title: a.title || a.kind, message: a.message };
  const scope = p.scope === "daily" || p.scope === "monthly" ? t(`period.${p.scope}`) : p.scope;
  const status = (s) => (s ? statusLabel(s) : "–");
  const error = p.error ? `: ${p.error}` : "";
  const vars = {
    ...p,
    scope,
    value: a.metric && a.metric.endsWith("cost_usd") ? fmtUSD(a.value) : fmtDec(a.value, 1),
    threshold: a.metric && a.metric.endsWith("cost_usd") ? fmtUSD(a.threshold) : fmtDec(a.threshold, 0),
    from: status(p.from),
    to: status(p.to),
    error,
  };
  let key = a.kind;
  if (a.kind === "usage.error_rate" && p.recovered) key = "usage.error_rate.recovered";
  if (a.kind === "batch.job_failed" && p.lost) key = "batch.job_lost";
  if (a.kind === "health.status_changed" && p.settled) key = "health.settled";
  if (a.kind === "batch.lock_expired" && !p.by) key = "batch.lock_expired.unreleased";
  const title = t(`alert.${key}.title`, vars);
  if (title === `alert.${key}.title`) return { title: a.title || a.kind, message: a.message };
  return { title, message: t(`alert.${key}.message`, vars) };
}

const byNewest = (a, b) => String(b.occurred_at).localeCompare(String(a.occurred_at));

function renderAlerts() {
  const items = [...state.alerts.values()].sort(byNewest).slice(0, FEED_MAX);
  const feed = document.getElementById("alert-feed");
  // The history lives in the usage service: without it "No alerts" would be a guess.
  const historyDown = serviceDown("usage") || state.alertHistoryError != null;
  const emptyText = historyDown ? t("alerts.unknown") : t("alerts.none");
  feed.innerHTML = items.length
    ? items.map((a) => {
      const text = alertText(a);
      return `<li class="alert${a.fresh ? " fresh" : ""}" data-testid="alert-item" data-alert-id="${esc(a.id)}" data-severity="${esc(a.severity)}" data-kind="${esc(a.kind)}">
        <span class="alert-sev">${esc(t(`severity.${a.severity}`))}</span>
        <span class="alert-title" title="${esc(text.title)}">${esc(text.title)}</span>
        <span class="alert-time">${esc(fmtTime(a.occurred_at))}</span>
        <span class="alert-msg" title="${esc(text.message)}">${esc(text.message)}</span>
      </li>`;
    }).join("")
    : `<li class="empty">${esc(emptyText)}</li>`;
  for (const a of items) a.fresh = false;
  const streamState = document.getElementById("stream-state");
  const status = { connected: "connected", connecting: "connecting", offline: "offline" }[state.stream];
  streamState.dataset.status = status;
  streamState.innerHTML = `<span class="dot"></span>${esc(t(`stream.${state.stream}`))}`;
  const panel = document.getElementById("panel-alerts");
  const reason = state.stream === "offline"
    ? t("stream.offline")
    : historyDown
      ? serviceDown("usage") ? t("panel.serviceDown", { service: t("service.usage") }) : errorText(state.alertHistoryError)
      : null;
  panel.dataset.state = reason ? "unavailable" : "ok";
  panel.querySelector(".panel-error").textContent = reason ? t("panel.unavailable", { reason }) : "";
  panel.querySelector(".state-badge").innerHTML = reason ? badge("unavailable") : "";
}

let source = null;
let streamGeneration = 0;

function onStreamAlert(data) {
  try {
    addAlert(JSON.parse(data), true);
  } catch (err) {
    console.error("bad alert event", err);
  }
  renderAlerts();
}

/** (Re)connect the live feed: EventSource, or a fetch stream when a read token is needed. */
function connectStream() {
  streamGeneration += 1;
  if (source) {
    source.close();
    source = null;
  }
  if (readToken) {
    // EventSource cannot send an Authorization header.
    streamWithFetch(streamGeneration);
    return;
  }
  if (typeof EventSource === "undefined") return;
  const generation = streamGeneration;
  // EventSource resends Last-Event-ID itself when it reconnects, so nothing is missed.
  const es = new EventSource(`${API}/alerts/stream`);
  source = es;
  es.addEventListener("open", () => {
    state.stream = "connected";
    renderAlerts();
  });
  es.addEventListener("alert", (event) => onStreamAlert(event.data));
  es.addEventListener("error", () => {
    if (generation !== streamGeneration) return;
    state.stream = "offline";
    renderAlerts();
    if (es.readyState === EventSource.CLOSED) {
      // a refused connection (503, 401) is not retried by the browser: retry ourselves
      es.close();
      setTimeout(() => generation === streamGeneration && connectStream(), REFRESH_MS);
    }
  });
}

/** Server-sent events read with fetch (sends the read token), resuming with Last-Event-ID. */
async function streamWithFetch(generation) {
  let lastId = null;
  while (generation === streamGeneration) {
    try {
      const headers = { Accept: "text/event-stream", Authorization: `Bearer ${readToken}` };
      if (lastId) headers["Last-Event-ID"] = lastId;
      const response = await fetch(`${API}/alerts/stream`, { headers, cache: "no-store" });
      if (!response.ok || !response.body) throw new Error(`HTTP ${response.status}`);
      state.stream = "connected";
      renderAlerts();
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      while (generation === streamGeneration) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        for (let m = /\r?\n\r?\n/.exec(buffer); m; m = /\r?\n\r?\n/.exec(buffer)) {
          const block = buffer.slice(0, m.index);
          buffer = buffer.slice(m.index + m[0].length);
          let event = "message";
          const data = [];
          for (const line of block.split(/\r?\n/)) {
            if (!line || line.startsWith(":")) continue;
            const colon = line.indexOf(":");
            const name = colon < 0 ? line : line.slice(0, colon);
            let text = colon < 0 ? "" : line.slice(colon + 1);
            if (text.startsWith(" ")) text = text.slice(1);
            if (name === "event") event = text;
            else if (name === "data") data.push(text);
            else if (name === "id") lastId = text;
          }
          if (event === "alert" && data.length) onStreamAlert(data.join("\n"));
        }
      }
      reader.cancel().catch(() => {});
    } catch {
      // fall through: show the interruption and retry
    }
    if (generation !== streamGeneration) return;
    state.stream = "offline";
    renderAlerts();
    await new Promise((resolve) => setTimeout(resolve, REFRESH_MS));
  }
}

async function loadAlertHistory() {
  try {
    const answer = await api("/usage/alerts?limit=20");
    for (const a of answer.alerts || []) addAlert(a, false);
    state.alertHistoryError = null;
    state.alertHistoryLoaded = true;
  } catch (err) {
    // the live stream still works; the panel says the history could not be read
    state.alertHistoryError = err instanceof ApiError ? err : new ApiError(0, String(err));
  }
  renderAlerts();
}

// ----- refresh loop, language --------------------------------------------------------------

let running = null;

async function tick() {
  state.tick += 1;
  const ctx = refreshContext();
  await loadStatus(ctx);
  await Promise.all(PANELS.map((panel) => runPanel(panel, ctx)));
  if (serviceDown("usage")) renderAlerts();
  else if (!state.alertHistoryLoaded || (state.tick % SLOW_EVERY === 1 && state.alerts.size === 0)) await loadAlertHistory();
  state.updatedAt = new Date();
  drawHeader();
  document.body.dataset.refreshes = String(state.tick);
}

/** Refresh now (or join the refresh already running). */
function refresh() {
  if (!running) running = tick().finally(() => { running = null; });
  return running;
}

async function loop() {
  try {
    await refresh();
  } finally {
    setTimeout(loop, REFRESH_MS);
  }
}

function applyLanguage() {
  translateStatic();
  const toggle = document.getElementById("lang-toggle");
  toggle.dataset.lang = currentLang();
  toggle.title = t("lang.switch");
  document.getElementById("tz-note").textContent = t("footer.tz", {
    tz: Intl.DateTimeFormat().resolvedOptions().timeZone || "local time",
  });
  drawHeader();
  for (const panel of PANELS) if (panel.data !== undefined || panel.error) drawPanel(panel);
  renderAlerts();
}

document.getElementById("lang-toggle").addEventListener("click", () => {
  setLang(currentLang() === "ko" ? "en" : "ko");
  applyLanguage();
});

document.getElementById("read-token-button").addEventListener("click", () => {
  const token = window.prompt(t("auth.readTokenPrompt"));
  if (token == null) return;
  readToken = token.trim() || null;
  try {
    if (readToken) sessionStorage.setItem("stockpilot.readToken", readToken);
    else sessionStorage.removeItem("stockpilot.readToken");
  } catch {
    // kept for this page only
  }
  connectStream();
  refresh();
});

window.stockpilot = { refresh };
applyLanguage();
connectStream();
loop();
