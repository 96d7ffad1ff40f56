"""Ask a running daemon's endpoint how it is: what `bes-orchestrator status` shows.

Reads `/healthz` and `/readyz` of the daemon this configuration describes (`[http] listen`),
with its token when one is configured. A daemon that is not running, or an endpoint that is
off, is an answer too, not an error.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pydantic

from orchestrator import config, errors, logs

TIMEOUT_S = 3.0
#: A wildcard listen address is asked on the loopback interface.
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Probe:
    """One endpoint's answer: HTTP status (0: no answer) and its one-line reason."""

    status: int
    reason: str

    @property
    def ok(self) -> bool:
        return self.status == 200


@dataclasses.dataclass(frozen=True, kw_only=True)
class Health:
    url: str | None  #: None: the endpoint is off (`listen = ""`)
    live: Probe | None = None
    ready: Probe | None = None

    def as_dict(self) -> dict[str, object]:
        def one(p: Probe | None) -> dict[str, object] | None:
            return None if p is None else {"ok": p.ok, "status": p.status, "reason": p.reason}

        return {"url": self.url, "live": one(self.live), "ready": one(self.ready)}


def http_settings(path: Path) -> config.HttpConfig:
    """The `[http]` table with its token read (commands that only read the database load the
    configuration without secrets; this one secret is needed to ask the daemon)."""
    raw = tomllib.loads(path.read_text(encoding="utf-8")).get("http", {})
    try:
        return config.HttpConfig.model_validate(
            raw, context={"base": path.resolve().parent, "secrets": True})
    except pydantic.ValidationError as exc:
        from orchestrator.config import core

        err = core.to_config_error(exc)
        raise errors.ConfigError(f"http.{err.key}", err.problem) from None


def _get(url: str, token: str | None) -> Probe:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as r:
            return Probe(status=r.status, reason=_reason(r.read()))
    except urllib.error.HTTPError as exc:
        return Probe(status=exc.code, reason=_reason(exc.read()))
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        why = getattr(exc, "reason", exc)
        return Probe(status=0, reason=f"no answer from {url}: {why}")


def _reason(body: bytes) -> str:
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return logs.scrub(text.splitlines()[0] if text else "")
    return logs.scrub(str(data.get("reason", text)) if isinstance(data, dict) else text)


def health(http: config.HttpConfig) -> Health:
    if not http.listen:
        return Health(url=None)
    host = _WILDCARDS.get(http.host, http.host)
    base = f"http://[{host}]:{http.port}" if ":" in host else f"http://{host}:{http.port}"
    token = http.token.get() if http.token is not None else None
    return Health(url=base, live=_get(f"{base}/healthz", token),
                  ready=_get(f"{base}/readyz", token))
