"""The web UI cannot be turned against its host, driven in chromium (playwright + Debian's chromium, as
tests/test_app.py): hostile names in every place the UI renders a path, a run name, a caption or a
prompt run no script (everything reaching HTML is escaped: lora.webui.runs.md_text, the report's
sandboxed frame); the Train and Evaluate forms are checked with the scripts' own schema before
anything starts and write only under the output root (the message shows in the page); a prompt
'--help' stays a prompt in reproduce.sh. Without gradio, playwright or chromium these tests skip,
except with CI=true, where they fail."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import time
from pathlib import Path

import pytest

from tests.helpers import free_port, require_browser

pytestmark = pytest.mark.slow


CHROMIUM = require_browser()  # (skips, or fails with CI=true, without gradio, playwright or chromium)

from lora import app, evaluate  # noqa: E402

TIMEOUT = 60_000  # ms
# Markup that runs a script wherever it reaches HTML unescaped, in text or in an attribute (a folder
# name cannot hold '/', so it cannot close an <iframe>: its own onload is the way in)
XSS = "x\" onload=\"window.__xss=5\" data-x=\"'><img src=x onerror=window.__xss=1><svg onload=window.__xss=2>"
# ... and in a prompt or caption, where '/' is allowed too
XSS_TEXT = XSS + "<script>window.__xss=3</script>[click](javascript:window.__xss=4)"



@pytest.fixture(scope="module")
def hostile(tmp_path_factory, trained_output_dir, example_data_dir, tiny_model_dir):
    """An output root whose run, adapter and evaluation folders carry hostile names, and a data
    folder whose captions are hostile (they become the evaluation's prompts and its report's)."""
    root = tmp_path_factory.mktemp("hostile_ui") / "output"
    root.mkdir()
    run = root / f"run {XSS}"
    shutil.copytree(trained_output_dir, run)
    data = root.parent / "data"
    shutil.copytree(example_data_dir, data, ignore=shutil.ignore_patterns("cache"))
    meta = json.loads((data / "metadata.json").read_text())
    for c in meta["clips"]:
        c["text"] = f"{XSS_TEXT} {c['id']}"
    (data / "metadata.json").write_text(json.dumps(meta))
    assert evaluate.main(["--base_model_path", str(tiny_model_dir), "--lora_model_path",
                          str(run / "best_model"), "--data_dir", str(data), "--output_dir",
                          str(root / f"eval {XSS}"), "--compare", "--num_prompts", "1",
                          "--eval_seeds", "1", "--eval_duration", "0.5", "--bootstrap_samples",
                          "100"]) == 0
    return {"root": root, "run": run, "data": data}


@pytest.fixture(scope="module")
def server(hostile, tiny_model_dir):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cfg = app.load_config(None)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, model_path=str(tiny_model_dir)),
                              data=dataclasses.replace(cfg.data, data_dir=str(hostile["data"])))
    ns = app.parse_args(["--port", str(free_port()), "--output_root", str(hostile["root"])])
    demo = app.build_ui(cfg, hostile["root"], ns)
    app.launch(demo, ns, hostile["root"], block=False)
    yield demo, f"http://127.0.0.1:{ns.port}/"
    demo.procs.stop_all()
    demo.close()


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        ctx = b.new_context(viewport={"width": 1280, "height": 900})
        dialogs = []
        ctx.on("page", lambda pg: pg.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss())))
        pg = ctx.new_page()
        pg.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        pg.set_default_timeout(TIMEOUT)
        pg.goto(server[1])
        pg.wait_for_selector("#prompts textarea")
        pg.dialogs = dialogs
        yield pg
        b.close()


def _fill(pg, elem_id: str, value) -> None:
    box = pg.locator(f"#{elem_id} input, #{elem_id} textarea").first
    box.fill(str(value))
    box.press("Tab")


def _pick(pg, elem_id: str, value: str) -> None:
    box = pg.locator(f"#{elem_id} input").first
    box.click()
    box.fill(value)
    box.press("Enter")
    pg.keyboard.press("Escape")


def _text(pg, elem_id: str) -> str:
    return pg.locator(f"#{elem_id}").inner_text()


def _wait_text(pg, elem_id: str, pattern: str, timeout_s: float = 90) -> str:
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        text = _text(pg, elem_id)
        if re.search(pattern, text):
            return text
        time.sleep(0.2)
    raise AssertionError(f"#{elem_id} never matched {pattern!r}; it says: {_text(pg, elem_id)!r}")


def _no_script_ran(pg) -> None:
    """No hostile markup ran (in the page or any frame), none became an element, no dialog opened."""
    for frame in pg.frames:
        try:
            ran = frame.evaluate("() => window.__xss")
        except Exception:  # a sandboxed frame without scripts cannot be asked: nothing ran there
            ran = None
        assert ran is None, f"a script of a hostile name ran in {frame.url}: {ran}"
    assert pg.evaluate("() => document.querySelectorAll('[onerror], [onload]').length") == 0
    assert not pg.dialogs


def test_hostile_names_in_every_place_the_ui_shows_them_run_no_script(page, hostile):
    root, run = hostile["root"], hostile["run"]
    # Generate: the prompt (status, the CLI command, the sample list), the adapter folder (player
    # labels, the status)
    _fill(page, "prompts", f"{XSS_TEXT}\n--help")
    _fill(page, "seed", 3)
    _fill(page, "duration", 0.5)
    box = page.locator("#adapter input").first
    clear = page.locator("#adapter .remove-all")
    if clear.count():
        clear.first.click()
    box.click()
    box.fill(str(run / "best_model"))
    box.press("Enter")
    page.keyboard.press("Escape")
    page.locator("#generate_btn").click()
    status = _wait_text(page, "gen_status", r"Done: 4 file\(s\)", 180)
    assert "<img src=x onerror=window.__xss=1>" in status  # shown as text, not removed
    _no_script_ran(page)
    job = max((root / "ui").glob("gen-*"), key=lambda p: p.stat().st_mtime)
    # a prompt '--help' stays a prompt in reproduce.sh (as inference_lora.py parses it)
    command = (job / "base" / "reproduce.sh").read_text().splitlines()[1]
    from lora.config import parse_config

    cfg, _ = parse_config(shlex.split(command)[2:], sections=("generation", "model"))
    assert cfg.generation.prompts == [XSS_TEXT, "--help"]
    # Train: the run's folder in the list and its summary
    page.get_by_role("tab", name="Train").click()
    _pick(page, "run_pick", str(run))
    assert "<img src=x" in _wait_text(page, "run_status", "newest checkpoint")
    _no_script_ran(page)
    # Evaluate: the evaluation's folder, its summary and its report (captions as prompts)
    page.get_by_role("tab", name="Evaluate").click()
    _pick(page, "eval_pick", str(root / f"eval {XSS}"))
    frame = page.locator("#eval_report iframe")
    frame.wait_for()
    assert frame.get_attribute("sandbox") == "allow-same-origin"  # no scripts, whatever it holds
    report = page.frame_locator("#eval_report iframe").locator("body")
    assert "<script>window.__xss=3</script>" in report.inner_text(timeout=30_000)
    _no_script_ran(page)
    # Data: a prepared folder with a hostile name and hostile captions (its status line, the clips
    # table, the Train form's message after "Train on this")
    data = root / f"data {XSS}"
    if not data.exists():
        shutil.copytree(hostile["data"], data)
    page.get_by_role("tab", name="Data").click()
    _fill(page, "data_dir", data)
    page.locator("#data_load").click()
    status = _wait_text(page, "data_status", r"Ready:|Error")
    assert "Ready:" in status and "<img src=x onerror=window.__xss=1>" in status, status
    assert "<script>window.__xss=3</script>" in _text(page, "data_table")
    _no_script_ran(page)
    page.locator("#data_train").click()
    assert "<img src=x onerror=window.__xss=1>" in _wait_text(page, "train_msg", "Data folder from the Data tab")
    _no_script_ran(page)


def test_forms_are_checked_with_the_scripts_schema_and_write_only_under_the_output_root(page, server, hostile,
                                                                                         tiny_model_dir):
    root, demo = hostile["root"], server[0]
    page.get_by_role("tab", name="Train").click()
    good = {"model_path": tiny_model_dir, "data_dir": hostile["data"], "max_steps": 2,
            "mixed_precision": "no", "output_dir": f"new {XSS}", "learning_rate": 0.0003, "lora_rank": 12}
    cases = [("output_dir", "/", "outside the UI's output root"),
             ("output_dir", "../..", "outside the UI's output root"),
             ("learning_rate", -1, r"learning_rate must be > 0"),
             ("lora_rank", 0, r"lora_rank must be"),
             ("eval_steps", "abc", r"eval_steps must be 'auto'"),
             ("data_dir", root / "no_data", r"does not exist")]
    for key, value, expect in cases:
        for k, v in dict(good, **{key: value}).items():
            _fill(page, f"train_{k}", v)
        old = _text(page, "train_msg")
        page.locator("#start_train").click()
        t0 = time.time()
        while _text(page, "train_msg") == old and time.time() - t0 < 60:
            time.sleep(0.2)
        text = _wait_text(page, "train_msg", expect)
        assert "Started" not in text and "Traceback" not in text, text
        _fill(page, "train_eval_steps", "auto")
    assert not demo.procs.procs  # nothing was started
    assert not (root / f"new {XSS}").exists() and not Path("/checkpoints").exists()
    _no_script_ran(page)
    # Evaluate writes only under the root too, and says why in the page
    page.get_by_role("tab", name="Evaluate").click()
    _fill(page, "eval_out", "/tmp")
    page.locator("#eval_run").click()
    t0 = time.time()
    text = ""
    while "outside the UI's output root" not in text and time.time() - t0 < 60:
        time.sleep(0.2)
        text = page.locator("#eval_msg textarea").input_value()
    assert "outside the UI's output root" in text and not demo.procs.procs
