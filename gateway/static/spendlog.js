// The spend-log panel: the last LLM calls with what each was charged (GET /usage/records),
// filtered by user and model. Its own module: dashboard.js only registers it.
import { t } from "./i18n.js";
import { esc } from "./charts.js";

const ROWS = 15;
// A page reads a bounded part of the stream and may come back short when matches are rare;
// the panel follows the cursor a few pages to fill its rows, then says there may be more.
const MAX_PAGES = 4;

/** The panel, drawn with the dashboard's own formatters (`fmt`: usd, int, time, ms, badge). */
export function spendLogPanel(fmt, refresh) {
  const filters = { user_id: "", model: "" };

  for (const name of Object.keys(filters)) {
    const input = document.getElementById(`spend-${name}`);
    input.addEventListener("change", () => {
      filters[name] = input.value.trim();
      refresh();
    });
  }

  async function load(ctx) {
    const query = new URLSearchParams({ limit: String(ROWS) });
    for (const [name, value] of Object.entries(filters)) if (value) query.set(name, value);
    const records = [];
    let cursor = null;
    for (let page = 0; page < MAX_PAGES && records.length < ROWS; page += 1) {
      if (cursor) query.set("cursor", cursor);
      const answer = await ctx.get(`/usage/records?${query}`);
      records.push(...(answer.records || []));
      cursor = answer.next_cursor;
      if (!cursor) break;
    }
    return { records: records.slice(0, ROWS), more: Boolean(cursor), filtered: Object.values(filters).some(Boolean) };
  }

  function render({ records, more, filtered }) {
    const body = document.getElementById("spend-log");
    const note = document.getElementById("spend-note");
    note.textContent = more && records.length < ROWS ? t("spend.more") : "";
    if (!records.length) {
      body.innerHTML = `<tr><td colspan="6" class="empty">${esc(t(filtered ? "spend.noneFiltered" : "spend.none"))}</td></tr>`;
      return;
    }
    body.innerHTML = records.map((r) => {
      const tokens = (r.prompt_tokens || 0) + (r.completion_tokens || 0);
      const priced = r.priced === "unpriced" ? ` title="${esc(t("spend.unpriced"))}"` : "";
      return `<tr data-testid="spend-row" data-id="${esc(r.id)}" data-failed="${r.failed}">
        <td>${esc(fmt.time(r.occurred_at))}</td>
        <td class="job" title="${esc(r.user_id || "")}">${esc(r.user_id || "–")}</td>
        <td class="job" title="${esc(r.endpoint || "")}">${esc(r.model)}</td>
        <td class="num">${esc(fmt.int(tokens))}</td>
        <td class="num" data-testid="spend-cost"${priced}>${esc(fmt.usd(r.cost_usd))}${r.priced === "unpriced" ? "*" : ""}</td>
        <td>${r.failed ? fmt.badge("failed", r.error_code || String(r.status_code)) : `<span class="muted">${esc(fmt.ms(r.response_time_ms))}</span>`}</td>
      </tr>`;
    }).join("");
  }

  return { id: "panel-spendlog", service: "usage", load, render };
}
