// Every element inside a panel (or the top bar) lies within it; no label is cut off.
// Evaluated by tests/dashboard/test_status_headline.py: answers a list of problems.
() => {
  const bad = [];
  for (const box of document.querySelectorAll('.panel, .topbar')) {
    const outer = box.getBoundingClientRect();
    for (const el of box.querySelectorAll('*')) {
      if (el.closest('.reasons-pop')) continue;
      const r = el.getBoundingClientRect();
      if (!r.width || !r.height) continue;
      if (r.right > outer.right + 1 || r.left < outer.left - 1) {
        bad.push(`${box.id || box.className}: <${el.tagName.toLowerCase()} class="${el.className.baseVal ?? el.className}"> ${el.textContent.trim().slice(0, 40)} [${Math.round(r.left)}, ${Math.round(r.right)}] outside [${Math.round(outer.left)}, ${Math.round(outer.right)}]`);
      }
    }
  }
  const labels = 'h1, h2, h3, th, .kpi-label, .gauge-title, .gauge-sub, .overall-label, .reason-count, .svc, button, .badge, .tile-kind, .subtitle, .alerts24, .updated';
  for (const el of document.querySelectorAll(labels)) {
    if (el.closest('.reasons-pop') || !el.getClientRects().length) continue;
    if (el.scrollWidth > el.clientWidth + 1 && getComputedStyle(el).overflow !== 'visible') {
      bad.push(`cut off: <${el.tagName.toLowerCase()} class="${el.className}"> ${el.textContent.trim().slice(0, 40)}`);
    }
  }
  // SVG text is clipped by its SVG, never wrapped: it must fit.
  for (const text of document.querySelectorAll('.panel svg text')) {
    const r = text.getBoundingClientRect();
    const svg = text.closest('svg').getBoundingClientRect();
    if (!r.width) continue;
    if (r.left < svg.left - 1 || r.right > svg.right + 1) {
      bad.push(`cut off: <svg text> ${text.textContent.trim().slice(0, 40)}`);
    }
  }
  return bad;
}
