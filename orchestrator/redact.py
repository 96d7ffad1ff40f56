"""Scrub secrets from text before it reaches a log line, an exception message or the database.

Two layers: exact values the caller knows (API keys, subscription keys, account keys), and
patterns that are secret wherever they appear (a SAS `sig=`, `AccountKey=`, a bearer token).
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable

MASK = "***"
#: Shorter "secrets" would mask ordinary words; real keys are far longer.
MIN_SECRET_LEN = 6

#: (pattern, replacement): group 1 is the part kept, the value after it is masked.
_PATTERNS: tuple[re.Pattern[str], ...] = (
    # SAS signature, plain or URL-encoded (`%26sig%3D...` inside an encoded URL).
    re.compile(r"(?i)((?<![A-Za-z_])sig=)[^&\s\"'<>;,]+"),
    re.compile(r"(?i)((?<![A-Za-z_])sig%3D)[^&%\s\"'<>;,]+"),
    re.compile(r"(?i)(\bAccountKey=)[^;\s\"'<>]+"),
    re.compile(r"(?i)(\bSharedAccessSignature=)[^;\s\"'<>]+"),
    re.compile(r"(?i)(\bBearer\s+)[A-Za-z0-9._~+/=-]+"),
    re.compile(r"(?i)(Ocp-Apim-Subscription-Key[\"']?\s*[:=]\s*[\"']?)[^\s,\"'}]+"),
)


#: Lower-case words one of which is in any text _PATTERNS can match: text with none of them (a
#: path, a status word: nearly everything logged) is returned after one cheap check, not six
#: regular-expression scans.
_TRIGGERS = ("sig", "accountkey=", "sharedaccesssignature=", "bearer", "ocp-apim-subscription-key")


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with every known secret value and every secret-shaped value replaced by ***."""
    # Longest first, so a secret that contains another is masked whole.
    for secret in sorted({s for s in secrets if s and len(s) >= MIN_SECRET_LEN},
                         key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, MASK)
    low = text.lower()
    if not any(word in low for word in _TRIGGERS):
        return text
    for pattern in _PATTERNS:
        text = pattern.sub(_keep_prefix, text)
    return text


def _keep_prefix(m: re.Match[str]) -> str:
    return m.group(1) + MASK


def redact_url(url: str) -> str:
    """The URL with scheme, host and path kept; a SAS signature and any password masked."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return redact(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:{MASK}@{host}" if ":" in userinfo else f"{user}@{host}"
    query = "&".join(
        f"{k}={MASK}" if k.lower() == "sig" else (f"{k}={v}" if sep else k)
        for k, sep, v in (item.partition("=") for item in parts.query.split("&") if item)
    )
    out = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))
    return redact(out)
