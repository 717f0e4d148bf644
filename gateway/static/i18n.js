// Labels in English and Korean; the choice is remembered in localStorage.
const STORAGE_KEY = "stockpilot.lang";

const MESSAGES = {
  en: {
    "app.subtitle": "StockPilot AI operations",
    "status.loading": "Loading…",
    "status.healthy": "Healthy",
    "status.degraded": "Degraded",
    "status.unhealthy": "Unhealthy",
    "status.unknown": "Unknown",
    "status.unavailable": "Unavailable",
    "status.up": "Up",
    "status.catching_up": "Catching up",
    "status.offline": "Gateway unreachable",
    "status.running": "Running",
    "status.succeeded": "Succeeded",
    "status.failed": "Failed",
    "status.cancelled": "Cancelled",
    "status.lost": "Lost",
    "status.expired": "Expired",
    "status.held": "Held",
    "service.health": "Health service",
    "service.usage": "Usage service",
    "service.batch": "Batch service",
    "header.alerts24h": "{n} alerts in 24 h",
    "header.updated": "Updated {time}",
    "auth.readToken": "Read token",
    "auth.readTokenPrompt": "This gateway needs a read token (STOCKPILOT_READ_TOKEN):",
    "components.title": "Dependencies",
    "components.latency": "Latency",
    "components.uptime": "Uptime 24 h",
    "components.none": "No component has been probed yet.",
    "components.system": "Health host: CPU {cpu}% · memory {mem}% · disk {disk}%",
    "kind.database": "PostgreSQL",
    "kind.redis": "Redis",
    "kind.openai": "OpenAI API",
    "kind.external_api": "External API",
    "cost.title": "LLM cost vs budget",
    "cost.today": "Today",
    "cost.month": "This month",
    "cost.noBudget": "no budget set",
    "cost.ofBudget": "{pct} of {budget}",
    "cost.forecast": "Month-end forecast: {value}",
    "cost.forecastBudget": "({pct}% of the {budget} budget)",
    "cost.unpriced": "Unpriced models (cost 0): {models}",
    "cost.byModel": "This month by model",
    "costchart.title": "Cost by model, last 30 days",
    "costchart.total": "30-day total",
    "costchart.none": "No LLM cost recorded in the last 30 days.",
    "requests.title": "Requests and error rate today",
    "requests.ok": "Successful",
    "requests.failed": "Failed",
    "requests.errorRate": "Error rate %",
    "kpi.requests": "Requests today",
    "kpi.errorRate": "Error rate",
    "kpi.latency": "Avg / p95 latency",
    "kpi.tokens": "Tokens",
    "kpi.rpm": "Requests / min",
    "top.title": "Top endpoints and errors",
    "top.endpoints": "Endpoints (today)",
    "top.errors": "Error codes (today)",
    "top.none": "Nothing yet today.",
    "top.noErrors": "No errors today.",
    "top.calls": "{n} calls",
    "exec.title": "Recent batch executions",
    "exec.job": "Job",
    "exec.status": "Status",
    "exec.started": "Started",
    "exec.duration": "Duration",
    "exec.throughput": "Throughput",
    "exec.memory": "Peak memory",
    "exec.progress": "Progress",
    "exec.none": "No execution recorded yet.",
    "jobs.title": "Success rate by job (24 h)",
    "jobs.failures": "Failure patterns",
    "jobs.runs": "{ok}/{n} runs",
    "jobs.none": "No execution in the last 24 h.",
    "jobs.noFailures": "No failures.",
    "locks.title": "Job locks",
    "locks.job": "Job",
    "locks.owner": "Owner",
    "locks.acquired": "Acquired",
    "locks.expires": "Expires",
    "locks.token": "Fencing",
    "locks.release": "Release",
    "locks.none": "No lock is held.",
    "locks.released": "Lock of {job} released (was held by {owner}).",
    "locks.notHeld": "{job} held no lock.",
    "locks.refused": "Release of {job} refused ({status}): {detail}",
    "locks.failed": "Release of {job} failed ({status}): {detail}",
    "alerts.title": "Live alerts",
    "alerts.none": "No alerts. The feed updates live.",
    "stream.connected": "Live",
    "stream.connecting": "Connecting…",
    "stream.offline": "Stream interrupted, reconnecting…",
    "panel.unavailable": "Unavailable: {reason}",
    "panel.serviceDown": "{service} does not answer",
    "panel.staleNote": "showing the last data received",
    "token.title": "Admin token",
    "token.text": "Releasing the lock of {job} needs the admin token (STOCKPILOT_ADMIN_TOKEN). It is sent once and not stored.",
    "token.cancel": "Cancel",
    "token.submit": "Release lock",
    "footer.tz": "Times in {tz}",
    "footer.api": "API reference",
    "time.ago": "{d} ago",
    "time.in": "in {d}",
    "lang.switch": "한국어로 보기",
  },
  ko: {
    "app.subtitle": "StockPilot AI 운영",
    "status.loading": "불러오는 중…",
    "status.healthy": "정상",
    "status.degraded": "성능 저하",
    "status.unhealthy": "장애",
    "status.unknown": "알 수 없음",
    "status.unavailable": "사용 불가",
    "status.up": "정상 작동",
    "status.catching_up": "동기화 중",
    "status.offline": "게이트웨이 연결 불가",
    "status.running": "실행 중",
    "status.succeeded": "성공",
    "status.failed": "실패",
    "status.cancelled": "취소됨",
    "status.lost": "유실",
    "status.expired": "만료됨",
    "status.held": "보유 중",
    "service.health": "헬스 서비스",
    "service.usage": "사용량 서비스",
    "service.batch": "배치 서비스",
    "header.alerts24h": "24시간 알림 {n}건",
    "header.updated": "{time} 갱신",
    "auth.readToken": "읽기 토큰",
    "auth.readTokenPrompt": "이 게이트웨이는 읽기 토큰(STOCKPILOT_READ_TOKEN)이 필요합니다:",
    "components.title": "의존성 상태",
    "components.latency": "지연 시간",
    "components.uptime": "24시간 가동률",
    "components.none": "아직 점검된 구성 요소가 없습니다.",
    "components.system": "헬스 호스트: CPU {cpu}% · 메모리 {mem}% · 디스크 {disk}%",
    "kind.database": "PostgreSQL",
    "kind.redis": "Redis",
    "kind.openai": "OpenAI API",
    "kind.external_api": "외부 API",
    "cost.title": "LLM 비용 대비 예산",
    "cost.today": "오늘",
    "cost.month": "이번 달",
    "cost.noBudget": "예산 미설정",
    "cost.ofBudget": "예산 {budget}의 {pct}",
    "cost.forecast": "월말 예상 비용: {value}",
    "cost.forecastBudget": "({budget} 예산의 {pct}%)",
    "cost.unpriced": "가격 미등록 모델(비용 0): {models}",
    "cost.byModel": "이번 달 모델별 비용",
    "costchart.title": "모델별 비용 (최근 30일)",
    "costchart.total": "30일 합계",
    "costchart.none": "최근 30일간 기록된 LLM 비용이 없습니다.",
    "requests.title": "오늘의 요청 수와 오류율",
    "requests.ok": "성공",
    "requests.failed": "실패",
    "requests.errorRate": "오류율 %",
    "kpi.requests": "오늘 요청 수",
    "kpi.errorRate": "오류율",
    "kpi.latency": "평균 / p95 응답 시간",
    "kpi.tokens": "토큰",
    "kpi.rpm": "분당 요청",
    "top.title": "상위 엔드포인트와 오류",
    "top.endpoints": "엔드포인트 (오늘)",
    "top.errors": "오류 코드 (오늘)",
    "top.none": "오늘은 아직 기록이 없습니다.",
    "top.noErrors": "오늘 오류가 없습니다.",
    "top.calls": "{n}회",
    "exec.title": "최근 배치 실행",
    "exec.job": "작업",
    "exec.status": "상태",
    "exec.started": "시작",
    "exec.duration": "소요 시간",
    "exec.throughput": "처리량",
    "exec.memory": "최대 메모리",
    "exec.progress": "진행률",
    "exec.none": "기록된 실행이 없습니다.",
    "jobs.title": "작업별 성공률 (24시간)",
    "jobs.failures": "실패 유형",
    "jobs.runs": "{n}회 중 {ok}회 성공",
    "jobs.none": "최근 24시간 동안 실행이 없습니다.",
    "jobs.noFailures": "실패 없음.",
    "locks.title": "작업 잠금",
    "locks.job": "작업",
    "locks.owner": "소유자",
    "locks.acquired": "획득",
    "locks.expires": "만료",
    "locks.token": "펜싱 토큰",
    "locks.release": "해제",
    "locks.none": "보유 중인 잠금이 없습니다.",
    "locks.released": "{job} 잠금을 해제했습니다 (이전 소유자: {owner}).",
    "locks.notHeld": "{job}에는 잠금이 없었습니다.",
    "locks.refused": "{job} 잠금 해제가 거부되었습니다 ({status}): {detail}",
    "locks.failed": "{job} 잠금 해제 실패 ({status}): {detail}",
    "alerts.title": "실시간 알림",
    "alerts.none": "알림이 없습니다. 새 알림은 실시간으로 표시됩니다.",
    "stream.connected": "실시간",
    "stream.connecting": "연결 중…",
    "stream.offline": "스트림 끊김, 재연결 중…",
    "panel.unavailable": "사용 불가: {reason}",
    "panel.serviceDown": "{service}가 응답하지 않습니다",
    "panel.staleNote": "마지막으로 받은 데이터를 표시합니다",
    "token.title": "관리자 토큰",
    "token.text": "{job} 잠금을 해제하려면 관리자 토큰(STOCKPILOT_ADMIN_TOKEN)이 필요합니다. 토큰은 한 번만 전송되며 저장되지 않습니다.",
    "token.cancel": "취소",
    "token.submit": "잠금 해제",
    "footer.tz": "시간대: {tz}",
    "footer.api": "API 문서",
    "time.ago": "{d} 전",
    "time.in": "{d} 후",
    "lang.switch": "Switch to English",
  },
};

function initialLang() {
  try {
    const saved = localStorage.getItem(STORAGE_KEY);
    if (saved === "en" || saved === "ko") return saved;
  } catch {
    // storage may be disabled; fall back to the browser's language
  }
  return (navigator.language || "en").toLowerCase().startsWith("ko") ? "ko" : "en";
}

let lang = initialLang();

export function currentLang() {
  return lang;
}

export function locale() {
  return lang === "ko" ? "ko-KR" : "en-US";
}

export function setLang(next) {
  lang = next === "ko" ? "ko" : "en";
  try {
    localStorage.setItem(STORAGE_KEY, lang);
  } catch {
    // not remembered, still switched
  }
  document.documentElement.lang = lang;
}

/** The message for `key` with `{name}` placeholders filled from `vars`. */
export function t(key, vars = {}) {
  const text = MESSAGES[lang][key] ?? MESSAGES.en[key] ?? key;
  return text.replace(/\{(\w+)\}/g, (_, name) => (name in vars ? String(vars[name]) : `{${name}}`));
}

/** Translate every element carrying data-i18n. */
export function translateStatic(root = document) {
  document.documentElement.lang = lang;
  for (const el of root.querySelectorAll("[data-i18n]")) {
    el.textContent = t(el.dataset.i18n);
  }
}
