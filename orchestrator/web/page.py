"""HTML for the status page and a job's timeline. Pure: data in, text out.

Every value that came from a file, a service or the database goes through `e()` (HTML
escaping, quotes included); the only markup is the literal text of this module.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import html
from collections.abc import Iterable, Mapping, Sequence

from orchestrator import jobs
from orchestrator.web import queries

_WAITING_NOTE = "unfinished for longer than"


def e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def age_text(seconds: float) -> str:
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def when(at: dt.datetime | None) -> str:
    return "" if at is None else at.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _doc(title: str, body: str, *, script: bool) -> str:
    tail = '<script src="/static/status.js"></script>\n' if script else ""
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{e(title)}</title>\n"
        "<link rel=\"stylesheet\" href=\"/static/status.css\">\n"
        f"</head><body>\n{body}\n{tail}</body></html>\n"
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class StatusData:
    now: dt.datetime
    worker: str
    live: tuple[bool, str]  #: what /healthz says
    ready: tuple[bool, str]  #: what /readyz says
    counts: Mapping[tuple[str, str], int]
    per_minute: Sequence[queries.MinuteCount]
    in_flight: Sequence[queries.JobRow]
    in_flight_total: int
    stuck_total: int
    stuck: Sequence[queries.JobRow]
    stuck_after_s: float
    failures: Sequence[queries.JobRow]


def _health(name: str, answer: tuple[bool, str]) -> str:
    ok, reason = answer
    if ok:
        return f'<span class="ok">{e(name)}</span>'
    return f'<span class="badge">not {e(name)}</span> {e(reason)}'


def _job_link(job_id: str) -> str:
    return f'<a href="/jobs/{e(job_id)}">{e(job_id[:8])}</a>'


def counts_table(counts: Mapping[tuple[str, str], int]) -> str:
    states = list(queries.states())
    services = sorted({s for s, _ in counts})
    head = "".join(f'<th class="num">{e(s)}</th>' for s in states)
    rows = []
    for service in services:
        cells = []
        total = 0
        for state in states:
            n = counts.get((service, state), 0)
            total += n
            cls = "num" if n else "num zero"
            cells.append(f'<td class="{cls}" data-state="{e(state)}">{n}</td>')
        rows.append(f'<tr data-service="{e(service)}"><th>{e(service)}</th>{"".join(cells)}'
                    f'<td class="num" data-state="total">{total}</td></tr>')
    if not rows:
        rows.append(f'<tr><td colspan="{len(states) + 2}" class="muted">no jobs yet</td></tr>')
    return (f'<table id="counts"><thead><tr><th>service</th>{head}<th class="num">total</th>'
            f'</tr></thead><tbody>{"".join(rows)}</tbody></table>')


def chart(points: Sequence[queries.MinuteCount]) -> str:
    """Files per minute as an inline SVG: one line for done, one for failed, a dot per minute."""
    width, height, left, right, top, bottom = 900, 180, 40, 10, 10, 24
    inner_w, inner_h = width - left - right, height - top - bottom
    peak = max([1, *(p.done for p in points), *(p.failed for p in points)])
    n = max(len(points) - 1, 1)

    def xy(i: int, v: int) -> tuple[float, float]:
        return left + inner_w * i / n, top + inner_h * (1 - v / peak)

    parts = [f'<svg class="chart" id="chart" viewBox="0 0 {width} {height}" role="img" '
             'aria-label="files per minute over the last hour" '
             'xmlns="http://www.w3.org/2000/svg">']
    for frac in (0.0, 0.5, 1.0):
        y = top + inner_h * (1 - frac)
        parts.append(f'<line class="grid" x1="{left}" y1="{y:.1f}" x2="{width - right}" '
                     f'y2="{y:.1f}"/><text class="axis" x="{left - 6}" y="{y + 4:.1f}" '
                     f'text-anchor="end">{peak * frac:g}</text>')
    if points:
        for i, anchor in ((0, "start"), (len(points) // 2, "middle"),
                          (len(points) - 1, "end")):
            x, _ = xy(i, 0)
            parts.append(f'<text class="axis" x="{x:.1f}" y="{height - 6}" '
                         f'text-anchor="{anchor}">{e(points[i].minute.strftime("%H:%M"))}</text>')
    for series in ("done", "failed"):
        coords = [xy(i, getattr(p, series)) for i, p in enumerate(points)]
        if coords:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
            parts.append(f'<polyline class="{series}" points="{path}"/>')
        for (x, y), p in zip(coords, points, strict=True):
            v = getattr(p, series)
            parts.append(f'<circle class="point {series}" cx="{x:.1f}" cy="{y:.1f}" r="2.5" '
                         f'data-minute="{e(p.minute.strftime("%H:%M"))}" data-value="{v}">'
                         f'<title>{e(p.minute.strftime("%H:%M"))} UTC: {v} {series}</title>'
                         '</circle>')
    parts.append("</svg>")
    return "".join(parts)


def _job_rows(rows: Iterable[queries.JobRow], now: dt.datetime, stuck_after_s: float) -> str:
    out = []
    for j in rows:
        age_s = (now - j.created_at).total_seconds()
        is_stuck = age_s > stuck_after_s
        badge = ' <span class="badge">stuck</span>' if is_stuck else ""
        out.append(
            f'<tr class="{"stuck" if is_stuck else ""}" data-job="{e(j.id)}">'
            f"<td>{_job_link(j.id)}</td><td class=\"name\">{e(j.input_name)}</td>"
            f"<td>{e(j.service)}</td><td>{e(j.state)}{badge}</td><td>{e(j.bes_status or '')}"
            f'</td><td class="num">{e(age_text(age_s))}</td><td class="num">{j.attempts}</td>'
            "</tr>")
    return "".join(out)


_JOB_HEAD = ("<thead><tr><th>job</th><th>input</th><th>service</th><th>state</th>"
             '<th>backend status</th><th class="num">age</th><th class="num">attempts</th>'
             "</tr></thead>")


def status_page(d: StatusData) -> str:
    total_done = sum(p.done for p in d.per_minute)
    total_failed = sum(p.failed for p in d.per_minute)
    shown = len(d.in_flight)
    more = (f'<p class="muted">the oldest {shown} of {d.in_flight_total} shown</p>'
            if d.in_flight_total > shown else "")
    failures = "".join(
        f'<tr data-job="{e(j.id)}"><td>{_job_link(j.id)}</td><td class="name">'
        f"{e(j.input_name)}</td><td>{e(j.service)}</td><td>{e(j.state)}</td>"
        f"<td>{e(when(j.finished_at))}</td><td>{e(j.error_code or '')}</td>"
        f'<td class="error">{e(j.error or "")}</td></tr>'
        for j in d.failures
    ) or '<tr><td colspan="7" class="muted">no failures</td></tr>'
    stuck_note = (f'<span class="badge">{d.stuck_total}</span> {_WAITING_NOTE} '
                  f'{e(age_text(d.stuck_after_s))}' if d.stuck_total
                  else f"none {_WAITING_NOTE} {e(age_text(d.stuck_after_s))}")
    body = f"""\
<header><button id="refresh" type="button">pause refresh</button>
<h1>bes-orchestrator</h1>
<p class="meta">daemon {e(d.worker)} · {e(when(d.now))} UTC · read-only</p>
<p id="health">{_health("live", d.live)} · {_health("ready", d.ready)}</p></header>
<main>
<h2>Jobs by state</h2>
{counts_table(d.counts)}
<h2>Files per minute, last hour</h2>
<p class="meta"><span class="legend-done">■ done {total_done}</span> ·
<span class="legend-failed">■ failed {total_failed}</span></p>
{chart(d.per_minute)}
<h2 id="stuck-heading">Stuck jobs</h2>
<p id="stuck-summary">{stuck_note}</p>
{f'<table id="stuck">{_JOB_HEAD}<tbody>'
 f'{_job_rows(d.stuck, d.now, d.stuck_after_s)}</tbody></table>' if d.stuck else ""}
<h2>In flight ({d.in_flight_total})</h2>
<table id="in-flight">{_JOB_HEAD}<tbody>
{_job_rows(d.in_flight, d.now, d.stuck_after_s)
 or '<tr><td colspan="7" class="muted">nothing in flight</td></tr>'}
</tbody></table>
{more}
<h2>Last {len(d.failures)} failures</h2>
<table id="failures"><thead><tr><th>job</th><th>input</th><th>service</th><th>state</th>
<th>ended (UTC)</th><th>code</th><th>error</th></tr></thead><tbody>
{failures}
</tbody></table>
</main>"""
    return _doc("bes-orchestrator status", body, script=True)


def job_page(job: jobs.Job, events: Sequence[jobs.JobEvent], now: dt.datetime) -> str:
    fields: list[tuple[str, object]] = [
        ("job", job.id), ("input", job.input_name), ("service", job.service),
        ("watch", job.watch or "(queue)"), ("state", job.state.value),
        ("backend job", job.bes_job_id or ""), ("backend status", job.bes_status or ""),
        ("created (UTC)", when(job.created_at)),
        ("age", age_text((now - job.created_at).total_seconds())),
        ("finished (UTC)", when(job.finished_at)), ("attempts", job.attempts),
        ("runs", job.runs), ("polls", job.poll_count), ("error code", job.error_code or ""),
        ("error", job.error or ""),
    ]
    fields += [(f"output {k}", v) for k, v in sorted(job.outputs.items())]
    info = "".join(f"<tr><th>{e(k)}</th><td class=\"error\">{e(v)}</td></tr>"
                   for k, v in fields)
    timeline = "".join(
        f"<tr><td>{e(when(ev.at))}</td><td>{e(ev.from_state.value if ev.from_state else '')}"
        f"</td><td>{e(ev.to_state.value)}</td><td>{e(ev.worker or '')}</td>"
        f'<td class="error">{e(ev.message)}</td></tr>'
        for ev in events
    )
    body = f"""\
<p><a href="/">← status</a></p>
<h1>Job {e(job.short_id)}</h1>
<table id="job">{info}</table>
<h2>Timeline</h2>
<table id="timeline"><thead><tr><th>at (UTC)</th><th>from</th><th>to</th><th>worker</th>
<th>message</th></tr></thead><tbody>{timeline}</tbody></table>"""
    return _doc(f"job {job.short_id}", body, script=False)


def message_page(title: str, message: str) -> str:
    return _doc(title, f'<p><a href="/">← status</a></p><h1>{e(title)}</h1><p>{e(message)}</p>',
                script=False)
