"""The web UI's Data tab (lora/app.py, lora/webui/data.py) in a real browser (playwright + Debian's
chromium): prepare a small folder of songs with auto captions and a trigger word, listen to a clip,
edit one caption, save, and start training from it; the run reads the edit.

Without gradio, playwright or chromium these tests skip, except with CI=true, where they fail.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time

import pytest

from tests.helpers import free_port, require_browser

CHROMIUM = require_browser()  # (skips, or fails with CI=true, without gradio, playwright or chromium)

pytestmark = pytest.mark.slow  # (a browser, a prepare run and a training run)

from lora import app  # noqa: E402
from tests.conftest import write_songs  # noqa: E402

TIMEOUT = 60_000  # ms



@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # (the prepare / training subprocesses)
    root = tmp_path_factory.mktemp("ui_data")
    out_root = root / "output"
    out_root.mkdir()
    cfg = app.load_config(None)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, model_path=str(tiny_model_dir)))
    ns = app.parse_args(["--port", str(free_port()), "--output_root", str(out_root)])
    demo = app.build_ui(cfg, out_root, ns)
    app.launch(demo, ns, out_root, block=False)
    yield demo, f"http://127.0.0.1:{ns.port}/", root
    demo.procs.stop_all()
    demo.close()


@pytest.fixture
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        pg = b.new_page(viewport={"width": 1280, "height": 900})
        pg.set_default_timeout(TIMEOUT)
        pg.goto(server[1])
        pg.wait_for_selector("#prompts textarea")
        yield pg
        b.close()


def _fill(pg, elem_id: str, value) -> None:
    box = pg.locator(f"#{elem_id} input, #{elem_id} textarea").first
    box.fill(str(value))
    box.press("Tab")


def _text(pg, elem_id: str) -> str:
    return pg.locator(f"#{elem_id}").inner_text()


def _wait_text(pg, elem_id: str, pattern: str, timeout_s: float = 90) -> str:
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        text = _text(pg, elem_id)
        if re.search(pattern, text):
            return text
        time.sleep(0.3)
    raise AssertionError(f"#{elem_id} never matched {pattern!r}; it says: {_text(pg, elem_id)!r}")


def _wait_for(cond, timeout_s: float, what: str):
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        if cond():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _cell(pg, row: int, col: int):
    return pg.locator(f"#data_table [data-testid=cell-{row}-{col}]")


def _cell_text(pg, row: int, col: int) -> str:
    return _cell(pg, row, col).locator("span[data-editable]").first.inner_text().strip()


def _edit_cell(pg, row: int, col: int, text: str) -> None:
    """Double-click a cell, type over its text, press Enter (as a user edits it)."""
    _cell(pg, row, col).dblclick()
    pg.locator("#data_table textarea[aria-label='Edit cell']").first.wait_for(state="visible")
    pg.keyboard.press("Control+a")
    pg.keyboard.type(text)
    pg.keyboard.press("Enter")
    _wait_for(lambda: _cell_text(pg, row, col) == text, 10, "the edited cell")


def _player_seconds(pg) -> float:
    """The duration the browser's own audio element reports for the clip player (gradio keeps it in
    a shadow root; playwright's locators pierce it)."""
    t0 = time.time()
    while time.time() - t0 < 30:
        d = [a.evaluate("el => el.currentSrc && el.readyState >= 1 ? el.duration : null")
             for a in pg.locator("#data_player audio").all()]
        d = [x for x in d if x is not None]
        if d:
            return d[0]
        time.sleep(0.3)
    raise AssertionError("no loaded audio in the clip player")


def test_prepare_edit_save_and_train_from_the_data_tab(page, server, tiny_model_dir, tiny_clap_dir):
    root = server[2]
    # (the prepared folder lies under the UI's output root, as every folder the UI writes)
    songs, data, run = root / "songs", root / "output" / "data", root / "output" / "run_from_data"
    write_songs(songs, n=3, seconds=6.0)
    page.get_by_role("tab", name="Data").click()
    _fill(page, "data_input", songs)
    _fill(page, "data_dir", data)
    page.locator("#data_auto_caption input[type=checkbox]").check()
    _fill(page, "data_clap_model", tiny_clap_dir)
    _fill(page, "data_trigger", "zxq")
    page.locator("#data_prepare").click()
    status = _wait_text(page, "data_status", r"Ready:|failed|Error", 180)
    assert "Ready: 3 clip(s)" in status and "trigger word zxq" in status, status
    doc = json.loads((data / "metadata.json").read_text())
    assert [_cell_text(page, i, 0) for i in range(3)] == [c["audio"] for c in doc["clips"]]
    assert [_cell_text(page, i, 2) for i in range(3)] == [c["text"] for c in doc["clips"]]
    assert all(c["caption_source"] == "auto" for c in doc["clips"])
    assert _cell_text(page, 0, 3).startswith("genre: ")  # the CLAP tags, with scores
    # a row's player plays that clip
    _cell(page, 1, 1).click()
    assert _player_seconds(page) == pytest.approx(doc["clips"][1]["duration"], abs=0.05)

    _edit_cell(page, 1, 2, "lofi piano, dusty drums")
    page.locator("#data_save").click()
    saved = _wait_text(page, "data_saved", r"Saved|Error")
    assert "Saved: 1 caption(s) changed" in saved, saved
    after = json.loads((data / "metadata.json").read_text())
    assert after["clips"][1]["text"] == "lofi piano, dusty drums"
    assert after["clips"][1]["caption_source"] == "edited"
    assert [c for i, c in enumerate(after["clips"]) if i != 1] == [c for i, c in enumerate(doc["clips"])
                                                                   if i != 1]

    page.locator("#data_train").click()
    page.locator("#train_data_dir").wait_for(state="visible")
    assert page.locator("#train_data_dir input, #train_data_dir textarea").first.input_value() == str(data)
    for key, value in (("output_dir", run), ("model_path", tiny_model_dir), ("max_steps", 2),
                       ("save_steps", 2), ("eval_steps", 2), ("logging_steps", 1), ("batch_size", 2),
                       ("gradient_accumulation_steps", 1), ("mixed_precision", "no")):
        _fill(page, f"train_{key}", value)
    page.locator("#start_train").click()
    _wait_text(page, "train_msg", "Started")
    _wait_for(lambda: (run / "final_model" / "adapter_model.safetensors").is_file(), 240, "the run to finish")
    saved_cfg = (run / "config.yaml").read_text()
    assert f"data_dir: {data}" in saved_cfg and "trigger_word: zxq" in saved_cfg
    from lora.dataprep import cache_store
    from lora.dataprep.token_cache import text_key

    texts = set()
    for cache in (data / "cache").iterdir():
        texts |= set(cache_store.scan(cache).texts)
    # training read the edit (with the trigger word)
    assert text_key("zxq, lofi piano, dusty drums") in texts


def test_bad_data_tab_inputs_are_messages(page, server):
    root = server[2]
    page.get_by_role("tab", name="Data").click()
    _fill(page, "data_input", root / "no_such_songs")
    page.locator("#data_prepare").click()
    text = _wait_text(page, "data_status", "Error")
    assert "Audio folder not found" in text and "Traceback" not in text
    _fill(page, "data_dir", root / "output" / "no_data_here")
    page.locator("#data_load").click()
    text = _wait_text(page, "data_status", "metadata.json not found")  # (not the last message)
    assert "Traceback" not in text
    _fill(page, "data_input", root)
    _fill(page, "data_dir", root / "outside_the_output_root")  # the UI writes only under its root
    page.locator("#data_prepare").click()
    text = _wait_text(page, "data_status", "outside")
    assert "outside the UI's output root" in text and not (root / "outside_the_output_root").exists()
