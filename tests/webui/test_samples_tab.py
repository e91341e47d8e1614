"""The web UI's Train tab plays a run's newest training samples beside step 0's (the base model),
same prompt and seed, in a real browser (playwright + Debian's chromium, as tests/test_app.py).

Without gradio, playwright or chromium this skips, except with CI=true, where it fails.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time

import pytest

from tests.helpers import free_port, require_browser

TIMEOUT = 60_000  # ms


CHROMIUM = require_browser()  # (skips, or fails with CI=true, without gradio, playwright or chromium)

from lora import app  # noqa: E402

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def out_root(tmp_path_factory, trained_output_dir):
    root = tmp_path_factory.mktemp("ui_samples") / "output"
    root.mkdir()
    shutil.copytree(trained_output_dir, root / "run1")
    return root


@pytest.fixture(scope="module")
def page(out_root, tiny_model_dir, example_data_dir):
    from playwright.sync_api import sync_playwright

    cfg = app.load_config(None)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, model_path=str(tiny_model_dir)),
                              data=dataclasses.replace(cfg.data, data_dir=str(example_data_dir)))
    ns = app.parse_args(["--port", str(free_port()), "--output_root", str(out_root)])
    demo = app.build_ui(cfg, out_root, ns)
    app.launch(demo, ns, out_root, block=False)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
            pg = browser.new_page(viewport={"width": 1280, "height": 900})
            pg.set_default_timeout(TIMEOUT)
            pg.goto(f"http://127.0.0.1:{ns.port}/")
            pg.wait_for_selector("#prompts textarea")
            yield pg
            browser.close()
    finally:
        demo.procs.stop_all()
        demo.close()


def _pick(pg, elem_id: str, value: str) -> None:
    box = pg.locator(f"#{elem_id} input").first
    box.click()
    box.fill(value)
    box.press("Enter")
    pg.keyboard.press("Escape")


def _wait_text(pg, elem_id: str, needle: str, timeout_s: float = 60) -> str:
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        text = pg.locator(f"#{elem_id}").inner_text()
        if needle in text:
            return text
        time.sleep(0.3)
    raise AssertionError(f"#{elem_id} never showed {needle!r}; it shows {text!r}")


def _served(pg, pid: str, timeout_s: float = 30) -> bytes:
    """The bytes of the file the player plays (its download link, fetched from the server), once
    the browser has loaded it."""
    t0 = time.time()
    while True:
        loaded = [a.evaluate("el => el.currentSrc && el.readyState >= 1 ? el.duration : null")
                  for a in pg.locator(f"#{pid} audio").all()]
        if any(x for x in loaded) or time.time() - t0 > timeout_s:
            break
        time.sleep(0.2)
    assert any(x for x in loaded), f"no loaded audio in #{pid}"
    href = pg.locator(f"#{pid} a.download-link").first.get_attribute("href")
    return pg.request.get(href).body()


def test_train_tab_plays_newest_samples_beside_the_base_models(page, out_root):
    run = out_root / "run1"
    steps = sorted(p.name for p in (run / "samples").iterdir())
    assert steps == ["step-000000", "step-000002", "step-000004"]  # step 0 + each validation
    newest = json.loads((run / "samples" / "step-000004" / "manifest.json").read_text())["samples"]
    base_file = run / "samples" / "step-000000" / newest[1]["file"]
    now_file = run / "samples" / "step-000004" / newest[1]["file"]
    assert base_file.read_bytes() != now_file.read_bytes()  # the adapter changed what it plays

    page.get_by_role("tab", name="Train").click()
    _pick(page, "run_pick", str(run))
    text = _wait_text(page, "samples_status", "step 4")
    assert "step 0 (the base model)" in text
    label = f"{newest[1]['prompt'][:60]} · seed {newest[1]['seed']}"
    _pick(page, "train_sample_pick", label)
    t0 = time.time()
    while _served(page, "sample_now") != now_file.read_bytes() and time.time() - t0 < 30:
        time.sleep(0.5)
    assert _served(page, "sample_base") == base_file.read_bytes()
    assert _served(page, "sample_now") == now_file.read_bytes()
    assert "step 4 (now)" in page.locator("#sample_now").inner_text()
