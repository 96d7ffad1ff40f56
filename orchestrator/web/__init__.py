"""The daemon's HTTP endpoint: `GET /metrics`, `/healthz`, `/readyz`, the status page at `/`,
a job's timeline at `/jobs/{id}`. Start it with `await web.start(settings, repo, live=…,
ready=…)` on the daemon's loop; `await server.stop()` closes it."""

from orchestrator.web.server import Server, start

__all__ = ["Server", "start"]
