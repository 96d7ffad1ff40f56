"""The status page's stylesheet and script, served from our own routes: the page's
Content-Security-Policy allows scripts and styles from this origin only, never inline ones."""

from __future__ import annotations

CSS = """\
:root { color-scheme: light dark; --fg: #1d2330; --muted: #5d6575; --line: #d5d9e0;
  --bad: #b3261e; --bad-bg: #fde7e4; --ok: #1b6e3a; --warn-bg: #fff3cd; --bg: #fff; }
@media (prefers-color-scheme: dark) { :root { --fg: #e4e7ec; --muted: #9aa3b2; --line: #394150;
  --bad: #ff8a80; --bad-bg: #4a1f1c; --ok: #7fd49b; --warn-bg: #4a3d12; --bg: #161a21; } }
body { font: 14px/1.4 system-ui, sans-serif; color: var(--fg); background: var(--bg);
  margin: 1.5rem auto; max-width: 1200px; padding: 0 1rem; }
h1 { font-size: 1.4rem; margin: 0 0 .25rem; } h2 { font-size: 1.1rem; margin: 1.6rem 0 .4rem; }
.muted, .meta { color: var(--muted); }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .25rem .5rem; border-bottom: 1px solid var(--line);
  vertical-align: top; }
th { font-weight: 600; } td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.error { white-space: pre-wrap; word-break: break-word; max-width: 40rem; }
td.name { word-break: break-all; max-width: 24rem; }
tr.stuck td { background: var(--warn-bg); }
.badge { display: inline-block; padding: 0 .4rem; border-radius: .6rem; font-size: .8rem;
  background: var(--bad-bg); color: var(--bad); font-weight: 600; }
.zero { color: var(--muted); }
.ok { color: var(--ok); font-weight: 600; }
.ok::before { content: "✓ "; }
a { color: inherit; }
svg.chart { width: 100%; max-width: 900px; height: auto; border: 1px solid var(--line); }
svg.chart .grid { stroke: var(--line); stroke-width: 1; }
svg.chart .axis { fill: var(--muted); font-size: 11px; }
svg.chart .done { stroke: var(--ok); fill: none; stroke-width: 2; }
svg.chart .failed { stroke: var(--bad); fill: none; stroke-width: 2; }
svg.chart circle.done { fill: var(--ok); stroke: none; }
svg.chart circle.failed { fill: var(--bad); stroke: none; }
.legend-done { color: var(--ok); } .legend-failed { color: var(--bad); }
#refresh { float: right; }
"""

JS = """\
// Refreshes the status page every 15 s while it is visible; the button pauses it.
"use strict";
(function () {
  var PERIOD_MS = 15000;
  var paused = false;
  var button = document.getElementById("refresh");
  if (button) {
    button.addEventListener("click", function () {
      paused = !paused;
      button.textContent = paused ? "resume refresh" : "pause refresh";
    });
  }
  setInterval(function () {
    if (!paused && document.visibilityState === "visible") {
      window.location.reload();
    }
  }, PERIOD_MS);
})();
"""
