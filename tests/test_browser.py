"""The status page in a real browser: Debian's chromium, headless, driven by Playwright (the
system browser: nothing is downloaded), against the real daemon on the emulator and Azurite
with done, failed and in-flight jobs.

The screenshot goes to the test's temporary folder (its path is printed); with
BES_UPDATE_SCREENSHOT=1 it also replaces docs/status-page.png, the README's picture.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from orchestrator import azurite as azurite_mod
from tests import harness, test_metrics

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]
XSS_NAME = test_metrics.XSS_NAME

pytestmark = pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                                reason="needs Debian's chromium (apt-get install chromium)")


def test_status_page_in_chromium(tmp_path: Path, azurite: azurite_mod.Azurite,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    from playwright.sync_api import Dialog, sync_playwright

    with test_metrics.mixed_run(tmp_path / "run", azurite, stuck_after_s=1) as run, \
            sync_playwright() as pw:
        history = run.history()
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            dialogs: list[str] = []

            def on_dialog(dialog: Dialog) -> None:
                dialogs.append(dialog.message)
                dialog.dismiss()

            page.on("dialog", on_dialog)
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            response = page.goto(f"{run.url}/")
            assert response is not None and response.status == 200
            page.wait_for_load_state("networkidle")

            # The daemon's own health, as /healthz and /readyz answer.
            assert page.locator("#health").inner_text() == "live · ready"
            assert page.locator("#health .ok").count() == 2

            # The counts job_history holds, per service and state.
            counts: dict[tuple[str, str], int] = {}
            for h in history:
                key = (h["service"], h["state"])
                counts[key] = counts.get(key, 0) + 1
            assert counts == {("svc", "done"): 3, ("svc", "failed"): 2, ("slow", "started"): 2}
            for (service, state), n in counts.items():
                cell = page.locator(f'#counts tr[data-service="{service}"] '
                                    f'td[data-state="{state}"]')
                assert cell.inner_text() == str(n), (service, state)
            assert page.locator('#counts tr[data-service="svc"] td[data-state="total"]'
                                ).inner_text() == "5"

            # The chart has a point per minute, and the minute of this run is not zero.
            points = page.locator("#chart circle.point.done")
            assert points.count() == 60
            values = [int(v or 0) for v in points.evaluate_all(
                "els => els.map(e => e.getAttribute('data-value'))")]
            assert sum(values) == 3
            assert page.locator("#chart polyline.failed").count() == 1

            # A failed job's error text is visible.
            failed = [h for h in history if h["state"] == "failed"]
            error = failed[0]["error"]
            assert "Col2" in error
            assert page.locator("#failures td.error", has_text="Column 'Col2' not found"
                                ).first.is_visible()

            # The HTML-looking file name is text: no <img> made of it, no script ran.
            name_cell = page.locator("#failures td.name", has_text=XSS_NAME)
            assert name_cell.count() == 1 and name_cell.inner_text() == XSS_NAME
            assert page.locator("img").count() == 0
            assert dialogs == []
            # And the policy itself forbids inline handlers: markup injected by any other way
            # would still not run (the browser enforces the Content-Security-Policy).
            page.evaluate("document.body.insertAdjacentHTML('beforeend', "
                          "'<img id=probe src=x onerror=\"window.__ran = 1\">')")
            page.wait_for_timeout(300)
            assert page.evaluate("window.__ran === undefined")

            # The waiting jobs are in flight, with age and backend status, flagged stuck.
            flight = page.locator("#in-flight tbody tr")
            assert flight.count() == 2
            assert "NotStarted" in flight.first.inner_text()
            assert page.locator("#in-flight tr.stuck").count() == 2
            assert page.locator("#stuck-summary").inner_text().startswith("2 ")

            # Every request stayed on the daemon's origin (no CDN, nothing remote).
            assert requests and all(u.startswith(run.url) for u in requests), requests

            # Screenshot of the whole page.
            page.evaluate("document.getElementById('probe').remove()")
            shot = tmp_path / "status-page.png"
            page.screenshot(path=str(shot), full_page=True)
            with capsys.disabled():
                print(f"\nstatus page screenshot: {shot}")
            if os.environ.get("BES_UPDATE_SCREENSHOT") == "1":
                shutil.copyfile(shot, harness.ROOT / "docs" / "status-page.png")

            # A job's timeline on click.
            job_id = failed[0]["job_id"]
            page.click(f'#failures a[href="/jobs/{job_id}"]')
            page.wait_for_url(f"**/jobs/{job_id}")
            timeline = page.locator("#timeline tbody tr")
            assert timeline.count() >= 4
            text = page.locator("#timeline").inner_text()
            assert "claimed" in text and "failed" in text
            assert page.locator("img").count() == 0 and dialogs == []
        finally:
            browser.close()


