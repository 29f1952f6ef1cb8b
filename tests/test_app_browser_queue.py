"""The queue panel in a real browser (Debian's Chromium at 1440 px), from a user study: a failed
job's whole error is readable, the queue buttons do what they say, the status marks render without
an emoji font, the job picker never makes the server log an error, and no progress timer flickers
over the status line. One server start for all of it (a browser test costs half a minute).

The server is ``tests/gated_wgp.py`` (a "[hold]" job waits while the gate file exists) with one
more patch, written by this test: a "[fail]" job fails with a three-line error."""
from __future__ import annotations

import re

import pytest

from tests.app_harness import (ROOT, StudioServer, add_job, gallery_count, job_id_of, launch_chromium, open_studio,
                               set_number, wait_for_status)
from wan.testing.tiny_family import ensure_tiny_checkpoints

ERROR_LINES = ["the transformer file cannot be used: it was made for another model, see below",
               "  missing key blocks.0.self_attn.q.weight",
               "  missing key blocks.1.self_attn.q.weight"]
# beyond ASCII, what the status marks may use (tests/test_app_queue_panel.py checks the font has them)
DEJAVU_SANS_HAS = "▶✓✗■…·"
# gradio's progress timer ("0.1s", "processing | 0.1/0.2s", "queue: 1/2 | 0.3s"), not "running for 3 s"
TIMER = re.compile(r"\d\.\ds\b|\bprocessing\b|\bqueue:")
ENTRY = """import sys
sys.path.insert(0, {root!r})
import tests.gated_wgp as gated  # the "[hold]" gate
from wan.engine.engine import Engine
from wan.loading.files import CheckpointError

_generate = Engine.generate


def generate(self, request, progress=None, cancel=None, **kwargs):
    if "[fail]" in request.prompt:
        raise CheckpointError({error!r})
    return _generate(self, request, progress=progress, cancel=cancel, **kwargs)


Engine.generate = generate
sys.exit(gated.main(sys.argv[1:]))
"""
# the status line's text at each change, recorded in the page (a timer may show for 100 ms only)
WATCH_STATUS = """() => {
    window.statusTexts = [];
    const box = document.querySelector('#queue-status');
    new MutationObserver(() => window.statusTexts.push(box.innerText))
        .observe(box, {subtree: true, childList: true, characterData: true, attributes: true});
}"""
# whether everything inside an element ends within it (no column or line out of sight, to scroll to)
FITS = """(box) => { const right = document.querySelector(box).getBoundingClientRect().right;
    return [...document.querySelectorAll(box + ' *')].every(e => {
        const r = e.getBoundingClientRect(); return r.width === 0 || r.right <= right + 1; }); }"""
# per cell of the queue table: its text and how many lines that text takes on the screen
CELL_LINES = """() => [...document.querySelectorAll('#queue-table .virtual-body [role=gridcell]')].map(cell => {
    const tops = [], walker = document.createTreeWalker(cell, NodeFilter.SHOW_TEXT);
    let height = 1e9;
    while (walker.nextNode()) {
        if (!walker.currentNode.textContent.trim()) continue;
        const range = document.createRange();
        range.selectNodeContents(walker.currentNode);
        for (const r of range.getClientRects()) { tops.push(r.top); height = Math.min(height, r.height); }
    }
    tops.sort((a, b) => a - b);
    const lines = tops.filter((t, i) => i === 0 || t - tops[i - 1] > height / 2).length;
    return [cell.innerText, lines];
})"""


class FailingStudio(StudioServer):
    """The gated studio, where a job whose prompt holds "[fail]" fails with ``ERROR_LINES``."""

    def command(self) -> list[str]:
        entry = self.base / "failing_wgp.py"
        entry.write_text(ENTRY.format(root=str(ROOT), error="\n".join(ERROR_LINES)))
        return [super().command()[0], str(entry), *super().command()[2:]]


@pytest.fixture(scope="module")
def chromium():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = launch_chromium(p)
        yield browser
        browser.close()


def pick_job(page, job_id: str) -> None:
    page.click("#job-pick input")
    page.get_by_role("option").filter(has_text=job_id).first.click()
    page.keyboard.press("Escape")


def click(page, name: str, message_start: str) -> str:
    """Clicks a queue button and waits for its message."""
    page.get_by_role("button", name=name, exact=True).click()
    page.wait_for_function("(start) => document.querySelector('#queue-message').innerText.trim().startsWith(start)",
                           arg=message_start)
    return page.inner_text("#queue-message").strip()


def row_of(page, job_id: str) -> str:
    return page.locator("#queue-table .virtual-body [role=row]").filter(has_text=job_id).first.inner_text()


def shown_text(page, selector: str) -> str:
    """The text of an element as shown (an indentation is kept as no-break spaces)."""
    return page.inner_text(selector).replace("\u00a0", " ")


def status_cells(page) -> list[str]:
    return page.locator("#queue-table .virtual-body [role=gridcell][data-col='2']").all_inner_texts()


def test_the_queue_panel_as_people_use_it(chromium, tmp_path_factory):
    checkpoints = tmp_path_factory.mktemp("ckpt")
    ensure_tiny_checkpoints(checkpoints)
    server = FailingStudio(tmp_path_factory.mktemp("studio"), checkpoints, gated=True).start()
    context = chromium.new_context(viewport={"width": 1440, "height": 900})
    try:
        page = open_studio(context, server.url)
        page.evaluate(WATCH_STATUS)
        server.gate.touch()
        set_number(page, "steps", 3)
        slow = job_id_of(add_job(page, "slow [hold]"))
        wait_for_status(page, slow, "running")
        set_number(page, "steps", 2)
        quick, spare, broken = (job_id_of(add_job(page, p)) for p in ("quick", "spare", "broken [fail]"))
        page.wait_for_function("(id) => document.querySelector('#queue-table').innerText.includes(id)", arg=broken)
        marks = status_cells(page)

        # 5. while the job runs, no progress timer over the status line (sampled 3 s, and at every change)
        samples = []
        for _ in range(15):
            samples.append(page.inner_text("#queue-status"))
            page.wait_for_timeout(200)

        # 2. "Cancel selected" cancels the picked waiting job, and the running one goes on
        pick_job(page, spare)
        assert click(page, "Cancel selected", "Cancelled") == f"Cancelled {spare}."
        wait_for_status(page, spare, "cancelled")
        assert "running" in row_of(page, slow)

        # 4. Remove the picked job while a refresh sent before the click (naming that job) is held
        # back until the Remove has answered: the server must take it without an error
        tick = page.evaluate("() => window.gradio_config.dependencies.find(d => d.api_name === 'tick').id")
        held, holding = [], [False]

        def hold_ticks(route):
            body = route.request.post_data_json or {}
            if holding[0] and body.get("fn_index") == tick:
                held.append(route)
            else:
                route.continue_()
        page.route("**/queue/join*", hold_ticks)
        pick_job(page, spare)
        page.wait_for_timeout(300)
        holding[0] = True
        page.wait_for_timeout(1500)  # the next refresh, with the job picked, is held
        assert held, "no refresh was sent while the job was picked"
        assert click(page, "Remove", "Removed") == f"Removed {spare}."
        holding[0] = False
        for route in held:
            route.continue_()
        page.unroute("**/queue/join*")
        page.wait_for_timeout(1500)
        assert page.input_value("#job-pick input") == "" and spare not in page.inner_text("#queue-table")

        # 2. "Abort running" stops the running job, whatever is picked (here a waiting one)
        pick_job(page, quick)
        assert click(page, "Abort running", "Aborting") == f"Aborting {slow}..."
        wait_for_status(page, slow, "cancelled")
        server.gate.unlink()
        wait_for_status(page, quick, "done")

        # 1. the failure: by the Add button (it named that job last) and in the picked job's details
        wait_for_status(page, broken, "failed")
        page.wait_for_function("(id) => document.querySelector('#message').innerText.startsWith('⚠️ Job ' + id)",
                               arg=broken)
        message = shown_text(page, "#message")
        assert message.startswith(f"⚠️ Job {broken} failed:\n") and "\n".join(ERROR_LINES) in message
        row = row_of(page, broken)
        assert ERROR_LINES[0][:40] in row and "missing key" not in row  # the table: a first line only
        pick_job(page, broken)
        page.wait_for_function("() => document.querySelector('#job-detail').innerText.includes('missing key')")
        detail = shown_text(page, "#job-detail")
        assert "\n".join(ERROR_LINES) in detail and "✗ failed" in detail and "finished" in detail
        for box in ("#job-detail", "#queue-table"):  # nothing of it out of sight at 1440 px
            assert page.evaluate(FITS, box), f"{box} is wider than the panel"
        cells = page.evaluate(CELL_LINES)
        assert cells and all(lines <= 1 for _, lines in cells), [c for c in cells if c[1] > 1]
        marks += status_cells(page)

        # 2. "Clear finished" empties this session's list, and the video stays in the gallery
        page.wait_for_function("() => document.querySelectorAll('#gallery video').length === 1")
        assert click(page, "Clear finished", "Cleared").startswith("Cleared 3 finished job(s)")
        page.wait_for_function("(id) => !document.querySelector('#queue-table').innerText.includes(id)", arg=quick)
        page.wait_for_timeout(2000)  # two refreshes
        assert gallery_count(page) == 1

        # 3. the status marks: words, and symbols DejaVu Sans has (no emoji font in Debian's Chromium)
        assert {"▶ running", "queued", "✓ done", "✗ failed", "■ cancelled"} <= set(marks), marks
        odd = {c for mark in marks for c in mark if not c.isascii() and c not in DEJAVU_SANS_HAS}
        assert not odd, odd

        # 5. and at every change of the status line since the page opened
        texts = samples + page.evaluate("() => window.statusTexts")
        timers = list(dict.fromkeys(t for t in texts if TIMER.search(t)))
        assert len(texts) > 20 and not timers, timers
    finally:
        context.close()
        server.stop()
    log = server.log()
    assert "is not in the list of choices" not in log and "Traceback" not in log, log[-3000:]
