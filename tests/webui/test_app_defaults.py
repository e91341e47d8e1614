"""The web UI pointed at a model from the command line (`python lora/app.py --model_path tiny`: the
schema's flags, as every script), forms that start from the configured model and from best_model,
downloads whose names say base or fine-tune, a summary table in a monospaced font, and no share-link
hint. Without gradio (or, for the browser test, playwright and chromium) these tests skip, except
with CI=true, where they fail."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, free_port, importable, require, require_browser


@pytest.fixture(scope="module", autouse=True)
def gradio_installed():
    require("gradio (bash install.sh --dev)", importable("gradio"), module_level=False)



@pytest.fixture(scope="module")
def out_root(tmp_path_factory, trained_output_dir):
    """A run whose final_model is newer than its best_model (as after any training)."""
    root = tmp_path_factory.mktemp("ui_defaults") / "output"
    shutil.copytree(trained_output_dir, root / "run1")
    os.utime(root / "run1" / "final_model" / "adapter_config.json")
    return root


def _component(demo, elem_id: str):
    return next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == elem_id)


def test_the_app_takes_the_schema_flags():
    """`python lora/app.py --model_path tiny` is an unknown flag on today's main."""
    from lora import app

    ns = app.parse_args(["--model_path", "tiny", "--guidance_scale", "4.5", "--port", "7999"])
    assert ns.cfg.model.model_path == "tiny" and ns.cfg.generation.guidance_scale == 4.5
    assert ns.port == 7999
    from lora.common.fields import ConfigError

    with pytest.raises(ConfigError, match="--auth must be user:password"):
        app.parse_args(["--auth", "nopassword"])


@pytest.mark.slow  # (over ~2 s: the full suite runs it, the fast loop leaves it out)
def test_forms_start_from_the_configured_model_and_best_model(out_root):
    """Today's main pre-selects the newest adapter (final_model), and its forms can only start from
    config.yaml's model."""
    from lora import app

    ns = app.parse_args(["--model_path", "tiny", "--output_root", str(out_root)])
    demo = app.build_ui(ns.cfg, out_root, ns)
    best = str(out_root / "run1" / "best_model")
    assert _component(demo, "model_path").value == "tiny"
    assert _component(demo, "eval_model").value == "tiny"
    assert _component(demo, "train_model_path").value == "tiny"
    assert _component(demo, "adapter").value == [best]
    assert _component(demo, "eval_adapter").value == best
    # a configured adapter wins (generation.lora_model_path, as inference_lora.py uses it)
    final = str(out_root / "run1" / "final_model")
    ns = app.parse_args(["--model_path", "tiny", "--output_root", str(out_root), "--lora_model_path", final])
    demo = app.build_ui(ns.cfg, out_root, ns)
    assert _component(demo, "adapter").value == [final]


@pytest.mark.slow
def test_ab_downloads_have_distinct_names(out_root, tiny_model_dir):
    """Base and fine-tune files of one sample share their name (<prompt>_s<seed>.wav): on today's
    main both downloads are called the same."""
    import gradio as gr
    import soundfile as sf

    from lora import app
    from lora.webui.engine import MODES, Engine

    ns = app.parse_args(["--model_path", str(tiny_model_dir), "--output_root", str(out_root)])
    handler = app._generate_handler(gr, Engine(ns.cfg), out_root, ns)
    best = str(out_root / "run1" / "best_model")
    result = handler("soft piano", str(tiny_model_dir), [best], "1", 0.5, 3.0, 1.0, 250, 0.0, "5", 1, None,
                     MODES[0], False, None, progress=lambda *a, **k: None)
    assert result[0].startswith("Done"), result[0]
    files = [Path(f) for f in result[5]]
    assert len(files) == 2 and len({f.name for f in files}) == 2
    assert sorted(f.name.split("_", 1)[0] for f in files) == ["base", "fine-tune"]
    job = files[0].parent.parent
    for f in files:
        side = f.name.split("_", 1)[0]
        assert f.read_bytes() == (job / side / f.name.split("_", 1)[1]).read_bytes()
        assert sf.info(str(f)).duration == pytest.approx(0.5, abs=0.02)


@pytest.mark.slow
def test_served_without_gradios_share_hint(tmp_path, tiny_model_dir):
    """gradio's start-up lines end with 'To create a public link, set `share=True`': a link this UI
    never makes. The server says where it is, once."""
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, str(ROOT / "lora" / "app.py"), "--model_path", str(tiny_model_dir),
                          "--port", str(port), "--output_root", str(tmp_path / "output")], cwd=ROOT,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        t0 = time.time()
        while time.time() - t0 < 240:
            line = p.stdout.readline()
            if not line:
                break
            lines.append(line)
            if f"Web UI on http://127.0.0.1:{port}" in line:
                break
        assert any(f"Web UI on http://127.0.0.1:{port}" in ln for ln in lines), "".join(lines)[-3000:]
    finally:
        p.send_signal(signal.SIGINT)
        try:
            out, _ = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
    text = "".join(lines) + out
    assert "share=True" not in text and "public link" not in text, text[-3000:]


@pytest.mark.slow
def test_evaluate_summary_is_monospaced(out_root, tiny_model_dir):
    """The summary's columns are aligned with spaces: in a proportional font (today's main) they do
    not line up."""
    chromium = require_browser(module_level=False)
    from playwright.sync_api import sync_playwright

    from lora import app

    ns = app.parse_args(["--model_path", str(tiny_model_dir), "--port", str(free_port()),
                         "--output_root", str(out_root)])
    demo = app.build_ui(ns.cfg, out_root, ns)
    app.launch(demo, ns, out_root, block=False)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, headless=True)
            page = browser.new_page()
            page.set_default_timeout(60_000)
            page.goto(f"http://127.0.0.1:{ns.port}/")
            page.get_by_role("tab", name="Evaluate").click()
            box = page.locator("#eval_summary textarea")
            box.wait_for()
            font = box.evaluate("el => getComputedStyle(el).fontFamily")
            browser.close()
    finally:
        demo.close()
    assert "monospace" in font, font
