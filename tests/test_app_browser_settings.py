"""The Settings tab in a real browser (Debian's Chromium through Playwright, the real server on the
TEST models): a config file naming a profile that does not exist still starts a server with a
usable profile picker; the tab's plain labels, flags, pickers and resolved folders; saving."""
from __future__ import annotations

import yaml

from tests.app_harness import StudioServer, choose, launch_chromium, open_studio


def test_the_settings_tab_after_a_bad_profile_in_the_file(tmp_path):
    from playwright.sync_api import sync_playwright
    base = tmp_path / "studio"
    base.mkdir()
    config = base / "wan_studio.yaml"
    config.write_text("profile: no_such_profile\n", encoding="utf-8")  # what the tab used to save
    server = StudioServer(base, tmp_path / "ckpt").start()
    try:
        assert f"warning: {config}: profile: 'no_such_profile' is not allowed" in server.log()
        with sync_playwright() as p:
            browser = launch_chromium(p)
            try:
                page = open_studio(browser.new_context(viewport={"width": 1400, "height": 1800}), server.url)
                assert page.input_value("#profile input") != ""  # the Generate tab's picker holds a profile
                page.get_by_role("tab", name="Settings").click()
                listen = page.locator("#setting-listen")
                listen.wait_for()
                assert "Listen on all network interfaces" in listen.inner_text()
                assert "(--listen)" in listen.inner_text()
                assert page.input_value("#setting-model input") == "TEST tiny Wan 2.1 t2v [test model]"
                assert page.input_value("#setting-profile input") == "(default)"  # the file's value was ignored
                choose(page, "setting-profile", "5 VeryLowRAM_LowVRAM")
                # a relative folder shows where it is, on the server, once the box is left
                box = page.locator("#setting-output-dir textarea, #setting-output-dir input").first
                box.fill("my_outputs")
                box.press("Tab")
                page.wait_for_function("(t) => document.querySelector('#setting-output-dir').innerText.includes(t)",
                                       arg=f"now: {base.resolve() / 'my_outputs'}")
                page.get_by_role("button", name="Save settings", exact=True).click()
                page.wait_for_function("() => document.querySelector('#settings-message').innerText.includes('Saved')")
                assert "output_dir, profile" in page.inner_text("#settings-message")
            finally:
                browser.close()
        # the value as typed, the profile by name; the flags of this start are not written
        assert yaml.safe_load(config.read_text()) == {"output_dir": "my_outputs", "profile": "VeryLowRAM_LowVRAM"}
    finally:
        server.stop()
