// fs-cc360 operator console: the little it needs beyond server-rendered HTML.
"use strict";

// Overview: reload the live part every data-refresh seconds while the tab is visible.
function startRefresh(live) {
  const seconds = Number(live.dataset.refresh) || 10;
  const updated = document.getElementById("updated");
  async function refresh() {
    if (document.hidden) return;
    try {
      const response = await fetch(live.dataset.src, {credentials: "same-origin",
                                                       redirect: "manual", cache: "no-store"});
      if (response.type === "opaqueredirect" || response.status === 403) {
        window.location.reload();  // logged out: show the login page
        return;
      }
      if (!response.ok) throw new Error("HTTP " + response.status);
      live.innerHTML = await response.text();
      const verdict = document.getElementById("verdict");
      if (updated && verdict) {
        updated.textContent = "as of " + verdict.dataset.asOf + ", refreshes every " + seconds + " s";
      }
      live.classList.remove("stale");
    } catch (error) {
      if (updated) updated.textContent = "refresh failed (" + error.message + "), retrying";
      live.classList.add("stale");
    }
  }
  window.setInterval(refresh, seconds * 1000);
  document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
}

// Dead rows: "select all".
function startSelectAll(box) {
  box.addEventListener("change", () => {
    for (const pick of document.querySelectorAll("input.pick")) pick.checked = box.checked;
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const live = document.getElementById("live");
  if (live && live.dataset.refresh) startRefresh(live);
  const all = document.getElementById("select-all");
  if (all) startSelectAll(all);
});
