"""sd_notify without a dependency: READY=1, STOPPING=1, WATCHDOG=1, STATUS=… over the socket
systemd names in $NOTIFY_SOCKET. Outside systemd every call is a no-op."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable

from orchestrator import logs

log = logs.get("bes.daemon")


def notify(message: str) -> bool:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.connect(addr)
            s.sendall(message.encode())
        except OSError:
            return False
    return True


def watchdog_interval_s() -> float | None:
    """Half the watchdog timeout systemd asked for, or None when there is no watchdog."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1e6 / 2
    except ValueError:
        return None


async def watchdog_loop(healthy: Callable[[], tuple[bool, str]] | None = None) -> None:
    """Ping from the event loop itself, and only while `healthy()` says so: a blocked loop or a
    dead task stops the pings, and systemd restarts us. Runs until cancelled (a supervised
    task), also when there is no watchdog to ping."""
    interval = watchdog_interval_s()
    if interval is None:
        await asyncio.Event().wait()
        return
    withheld = False
    while True:
        ok, why = healthy() if healthy is not None else (True, "ok")
        if ok:
            notify("WATCHDOG=1")
        elif not withheld:
            log.error("watchdog_withheld", reason=why)
        withheld = not ok
        await asyncio.sleep(interval)
