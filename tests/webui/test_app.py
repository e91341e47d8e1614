"""The web UI (lora/app.py) driven in a real browser: playwright + Debian's chromium
(executable_path).

One server for the module, on the tiny model. Without gradio, playwright or chromium these tests
skip, except with CI=true, where they fail. UI_SCREENSHOTS=DIR saves a PNG of each tab there (docs/
holds the README's).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shlex
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.helpers import free_port, require_browser

# Each test drives the UI end to end (a server on the tiny model, a trained run): all are slow.
pytestmark = pytest.mark.slow


CHROMIUM = require_browser()  # (skips, or fails with CI=true, without gradio, playwright or chromium)

from lora import app, inference_lora  # noqa: E402  (after the checks above: a clear skip/fail, not an ImportError)
from lora.training import checkpoints  # noqa: E402

TIMEOUT = 60_000  # ms



@pytest.fixture(scope="module")
def out_root(tmp_path_factory, trained_output_dir):
    root = tmp_path_factory.mktemp("ui") / "output"
    root.mkdir()
    shutil.copytree(trained_output_dir, root / "run1")
    # an adapter that records a base model of another family (a melody hub id) than the one in use
    other = root / "other_base" / "best_model"
    shutil.copytree(trained_output_dir / "best_model", other)
    cfg_file = other / "adapter_config.json"
    c = json.loads(cfg_file.read_text())
    c["base_model_name_or_path"] = "facebook/musicgen-melody"
    cfg_file.write_text(json.dumps(c))
    return root


@pytest.fixture(scope="module")
def server(out_root, tiny_model_dir, example_data_dir):
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # (the training / evaluate subprocesses)
    cfg = app.load_config(None)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, model_path=str(tiny_model_dir)),
                              data=dataclasses.replace(cfg.data, data_dir=str(example_data_dir)))
    ns = app.parse_args(["--port", str(free_port()), "--output_root", str(out_root)])
    demo = app.build_ui(cfg, out_root, ns)
    app.launch(demo, ns, out_root, block=False)
    yield demo, f"http://127.0.0.1:{ns.port}/"
    demo.procs.stop_all()
    demo.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    pg = browser.new_page(viewport={"width": 1280, "height": 900})
    pg.set_default_timeout(TIMEOUT)
    pg.goto(server[1])
    pg.wait_for_selector("#prompts textarea")
    yield pg
    pg.close()


def _shot(pg, name: str) -> None:
    folder = os.environ.get("UI_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        pg.evaluate("window.scrollTo(0, 0)")
        pg.screenshot(path=str(Path(folder) / f"ui_{name}.png"))


def _fill(pg, elem_id: str, value) -> None:
    box = pg.locator(f"#{elem_id} input, #{elem_id} textarea").first
    box.fill(str(value))
    box.press("Tab")


def _pick(pg, elem_id: str, value: str) -> None:
    """A dropdown that accepts a typed value."""
    box = pg.locator(f"#{elem_id} input").first
    box.click()
    box.fill(value)
    box.press("Enter")
    pg.keyboard.press("Escape")


def _pick_adapters(pg, paths) -> None:
    """The adapter multiselect: clear it, then type each folder."""
    clear = pg.locator("#adapter .remove-all")
    if clear.count():
        clear.first.click()
    box = pg.locator("#adapter input").first
    for path in paths:
        box.click()
        box.fill(path)
        box.press("Enter")
    pg.keyboard.press("Escape")


def _status(pg, elem_id="gen_status") -> str:
    return pg.locator(f"#{elem_id}").inner_text()


def _wait_text(pg, elem_id: str, pattern: str, timeout_s: float = 60) -> str:
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        text = _status(pg, elem_id)
        if re.search(pattern, text):
            return text
        time.sleep(0.2)
    raise AssertionError(f"#{elem_id} never matched {pattern!r}; it says: {_status(pg, elem_id)!r}")


def _generate(pg, prompt: str, seed, duration, samples=1, adapter=None, mode=None, blind=False,
              expect="file\\(s\\)", scales=None):
    _fill(pg, "prompts", prompt)
    _fill(pg, "seed", seed)
    _fill(pg, "duration", duration)
    _fill(pg, "num_samples", samples)
    if adapter is not None:
        _pick_adapters(pg, [adapter] if isinstance(adapter, str) else adapter)
    if scales is not None:
        _fill(pg, "lora_scale", scales)
    if mode is not None:
        pg.locator("#mode").get_by_label(mode, exact=True).check()
    blind_box = pg.locator("#blind input[type=checkbox]")
    if blind_box.is_checked() != blind:
        blind_box.click()
    return _click_and_wait(pg, "generate_btn", "gen_status", expect)


def _click_and_wait(pg, button: str, elem_id: str, pattern: str, timeout_s: float = 60) -> str:
    """Click, then wait for the event's result in #elem_id: new text, no progress tracker showing,
    matching."""
    old = _status(pg, elem_id)
    pg.locator(f"#{button}").click()
    tracker = pg.locator(f"#{elem_id} [data-testid=status-tracker]")
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        text = _status(pg, elem_id)
        busy = (tracker.count() and "hide" not in (tracker.first.get_attribute("class") or "")) or \
            re.match(r"\s*(queue: \d+/\d+|processing|[\d.]+s)\b", text)
        if not busy and text != old and re.search(pattern, text):
            return text
        time.sleep(0.2)
    raise AssertionError(f"#{elem_id} never showed {pattern!r}; it says: {_status(pg, elem_id)!r}")


def _labels(pg) -> list[str]:
    """The players' labels, once no progress timer shows in them (the sample dropdown's change
    event, fired by the generation's result, updates the players again a moment later)."""
    t0 = time.time()
    while True:
        labels = pg.locator("#player_a, #player_b").all_inner_texts()
        if not any(re.match(r"\s*[\d.]+s\b", t) for t in labels) or time.time() - t0 > 10:
            return labels
        time.sleep(0.2)


def _durations(pg, players=("player_a", "player_b")) -> list[float]:
    """The duration the browser's own audio element reports for each player (gradio's waveform
    player keeps it in a shadow root; playwright's locators pierce it)."""
    out = []
    for pid in players:
        audio = pg.locator(f"#{pid} audio")
        t0 = time.time()
        while True:
            d = [a.evaluate("el => el.currentSrc && el.readyState >= 1 ? el.duration : null")
                 for a in audio.all()]
            d = [x for x in d if x is not None]
            if d or time.time() - t0 > 30:
                break
            time.sleep(0.2)
        assert d, f"no loaded audio in #{pid}"
        out.append(d[0])
    return out


def _served_seconds(pg, pid: str) -> float:
    """The length of the file behind the player's download link, fetched from the server."""
    import io

    href = pg.locator(f"#{pid} a.download-link").first.get_attribute("href")
    data = pg.request.get(href).body()
    info = sf.info(io.BytesIO(data))
    return info.frames / info.samplerate


def _newest_job(out_root: Path) -> Path:
    return max((out_root / "ui").glob("gen-*"), key=lambda p: p.stat().st_mtime)


def _run_cli(command: str) -> None:
    argv = shlex.split(command)
    assert argv[:2] == ["python", "lora/inference_lora.py"]
    assert inference_lora.main(argv[2:]) == 0


def test_ab_same_seed_players_manifest_and_cli_reproduces(page, server, out_root):
    adapter = str(out_root / "run1" / "best_model")
    text = _generate(page, "lofi piano with soft drums", 7, 1.5, adapter=adapter)
    assert "seed 7" in text
    assert _durations(page) == pytest.approx([1.5, 1.5], abs=0.02)
    assert [_served_seconds(page, p) for p in ("player_a", "player_b")] == [1.5, 1.5]
    labels = _labels(page)
    assert "Base model" in labels[0] and "Fine-tune" in labels[1]
    job = _newest_job(out_root)
    base = json.loads((job / "base" / "manifest.json").read_text())["files"]
    tuned = json.loads((job / "fine-tune" / "manifest.json").read_text())["files"]
    assert [e["seed"] for e in base] == [e["seed"] for e in tuned] == [7]
    assert base[0]["adapter"] is None and base[0]["settings"]["lora_scale"] is None
    sha = hashlib.sha256((Path(adapter) / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert tuned[0]["adapter"]["weights_sha256"] == sha and tuned[0]["settings"]["lora_scale"] == 1.0
    assert set(base[0]) == set(tuned[0])  # the CLI's manifest fields, for both sides
    assert base[0]["tokens_sha1"] != tuned[0]["tokens_sha1"]  # the adapter changes the music
    for side, entries in (("base", base), ("fine-tune", tuned)):
        command = (job / side / "reproduce.sh").read_text().splitlines()[1]
        _run_cli(command)
        cli = json.loads((job / side / "cli" / "manifest.json").read_text())["files"]
        assert cli[0]["tokens_sha1"] == entries[0]["tokens_sha1"], side
        a, _ = sf.read(job / side / entries[0]["file"])
        b, _ = sf.read(job / side / "cli" / cli[0]["file"])
        np.testing.assert_array_equal(a, b)
    _shot(page, "generate")


def test_blind_ab_hides_then_reveals(page, out_root):
    _generate(page, "dark techno", 3, 1.0, adapter=str(out_root / "run1" / "final_model"), blind=True)
    labels = _labels(page)
    assert labels[0].strip().startswith("A") and labels[1].strip().startswith("B")
    assert not any("Base" in t or "Fine-tune" in t for t in labels)
    page.locator("#reveal_btn").click()
    text = _wait_text(page, "gen_status", "A = ")
    assert "Base model" in text and "Fine-tune" in text
    labels = _labels(page)
    assert sorted(("Base" in t) for t in labels) == [False, True]


def test_stop_ends_a_long_generation_quickly_and_others_wait_in_the_queue(page, browser, out_root,
                                                                          server):
    _fill(page, "prompts", "a very long ambient drone")
    _fill(page, "duration", 90)
    _fill(page, "num_samples", 3)
    page.locator("#mode").get_by_label("base only", exact=True).check()
    page.locator("#generate_btn").click()
    page.wait_for_function("() => document.body.innerText.includes('window 1/')", timeout=TIMEOUT)
    # a second visitor waits for the GPU and sees its place in the queue
    other = browser.new_page(viewport={"width": 1280, "height": 900})
    other.goto(server[1])
    other.wait_for_selector("#prompts textarea")
    _fill(other, "prompts", "queued behind the drone")
    _fill(other, "seed", 5)
    _fill(other, "duration", 1)
    other.locator("#mode").get_by_label("base only", exact=True).check()
    other.locator("#generate_btn").click()
    _wait_text(other, "gen_status", r"queue: \d+/\d+", timeout_s=20)
    t0 = time.time()
    page.locator("#stop_btn").click()
    text = _wait_text(page, "gen_status", "Stopped:", timeout_s=10)
    assert time.time() - t0 < 3.0
    assert "0 file(s)" in text
    # the queued job runs next (the Stop was for the running one), and the UI stays usable
    assert "seed 5" in _wait_text(other, "gen_status", r"file\(s\)")
    other.close()
    _generate(page, "short after stop", 1, 1.0)
    assert _durations(page, ["player_a"])[0] == pytest.approx(1.0, abs=0.02)


def test_bad_inputs_show_a_message_and_the_server_keeps_serving(page, out_root, tmp_path):
    page.locator("#mode").get_by_label("base only", exact=True).check()
    cases = [
        (dict(prompt="   ", seed=1, duration=1), "Write a prompt"),
        (dict(prompt="ok", seed=1, duration=0), "duration"),
        (dict(prompt="ok", seed=1, duration=1, mode="A/B: base and fine-tune",
              adapter=str(tmp_path / "nope")),
         "adapter folder not found"),
        (dict(prompt="ok", seed=1, duration=1, adapter=str(out_root / "other_base" / "best_model")),
         "trained on base model facebook/musicgen-melody"),
    ]
    for kw, message in cases:
        text = _generate(page, kw.pop("prompt"), expect="Error:", **kw)
        assert message in text, (message, text)
        assert "Traceback" not in text
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF not really audio" * 10)
    page.locator("#audio_prompt input[type=file]").set_input_files(str(bad))
    text = _generate(page, "ok", 1, 1, expect="Error:")
    assert "broken.wav" in text and "Traceback" not in text
    page.locator("#audio_prompt button[aria-label='Clear']").first.click()
    _fill(page, "model_path", str(tmp_path / "no_model"))
    text = _generate(page, "ok", 1, 1, expect="Error:")
    assert "no_model" in text and "Traceback" not in text
    # ... and a good request still works afterwards
    page.reload()
    page.wait_for_selector("#prompts textarea")
    _generate(page, "fine again", 2, 1.0, mode="base only")
    # Train: a folder that holds another run
    page.get_by_role("tab", name="Train").click()
    before = sorted(p.name for p in (out_root / "run1").rglob("*"))
    _fill(page, "train_output_dir", str(out_root / "run1"))
    text = _click_and_wait(page, "start_train", "train_msg", "Error:")
    assert "already holds another training run" in text
    assert sorted(p.name for p in (out_root / "run1").rglob("*")) == before


def _tuned(out_root: Path) -> dict:
    return json.loads((_newest_job(out_root) / "fine-tune" / "manifest.json").read_text())["files"][0]


def test_two_adapter_mix_at_1_0_is_adapter_a_alone_and_bad_mixes_are_messages(page, out_root):
    a, b = (str((out_root / "run1" / n).resolve()) for n in ("best_model", "final_model"))
    _generate(page, "mix", 11, 1.0, adapter=[a], mode="fine-tune only", scales="1")
    alone = _tuned(out_root)
    _generate(page, "mix", 11, 1.0, adapter=[a, b], scales="1, 0")
    job, mix = _newest_job(out_root), _tuned(out_root)
    assert mix["adapter"]["paths"] == [a, b] and mix["adapter"]["scales"] == [1.0, 0.0]
    assert [x["weights_sha256"] for x in mix["adapter"]["adapters"]] == [
        hashlib.sha256((Path(p) / "adapter_model.safetensors").read_bytes()).hexdigest() for p in (a, b)]
    assert mix["tokens_sha1"] == alone["tokens_sha1"]  # B at strength 0 adds nothing
    command = (job / "fine-tune" / "reproduce.sh").read_text().splitlines()[1]
    assert shlex.join(["--lora_model_path", a, b, "--lora_scale", "1", "0"]) in command
    _run_cli(command)
    assert json.loads((job / "fine-tune" / "cli"
                       / "manifest.json").read_text())["files"][0]["tokens_sha1"] \
        == mix["tokens_sha1"]
    _generate(page, "mix", 11, 1.0, adapter=[a, b], scales="1, 0.5")
    assert _tuned(out_root)["tokens_sha1"] != alone["tokens_sha1"]  # ... and B at 0.5 is in the mix
    last = _newest_job(out_root)
    for kw, message in ((dict(adapter=[a, b], scales="1, 0, 0.5"), "lora_scale has 3 value(s)"),
                        (dict(adapter=[a, str(out_root / "other_base" / "best_model")], scales="1, 1"),
                         "cannot be mixed")):
        text = _generate(page, "mix", 11, 1.0, expect="Error:", **kw)
        assert message in text and "Traceback" not in text, text
    assert _newest_job(out_root) == last


@pytest.fixture(scope="module")
def tiny_melody_dir(tmp_path_factory):
    from lora.modeling.tiny_model import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("tiny_melody") / "mono", melody=True)


def _set_file(pg, elem_id: str, path) -> None:
    clear = pg.locator(f"#{elem_id} button[aria-label='Clear']")
    if clear.count():
        clear.first.click()
    pg.locator(f"#{elem_id} input[type=file]").set_input_files(str(path))


def test_melody_upload_on_a_melody_base_is_recorded_and_the_cli_reproduces_it(page, out_root,
                                                                              tiny_melody_dir,
                                                                              tiny_model_dir, tmp_path):
    assert not page.locator("#melody_audio").is_visible()  # a text-only base: no melody upload
    _fill(page, "model_path", tiny_melody_dir)
    page.locator("#melody_audio").wait_for(state="visible")
    sr = 32000
    t = np.arange(sr) / sr
    tune = tmp_path / "tune.wav"
    sf.write(tune, np.concatenate([np.sin(2 * np.pi * f * t) for f in (440.0, 261.63)]) * 0.5, sr)
    (tmp_path / "not_audio.wav").write_text("not audio")
    sf.write(tmp_path / "quiet.wav", np.zeros(sr, dtype=np.float32), sr)
    for name, message in (("not_audio.wav", "melody: "), ("quiet.wav", "silent")):
        _set_file(page, "melody_audio", tmp_path / name)
        text = _generate(page, "piano", 4, 1.0, mode="base only", expect="Error:")
        assert name in text and message in text and "Traceback" not in text, text
    _set_file(page, "melody_audio", tune)
    _generate(page, "piano", 4, 1.0, mode="base only")
    job = _newest_job(out_root)
    entry = json.loads((job / "base" / "manifest.json").read_text())["files"][0]
    assert entry["melody"]["file"] == str((job / "melody" / "tune.wav").resolve())
    assert entry["melody"]["sha1"] == hashlib.sha1(tune.read_bytes()).hexdigest()
    command = (job / "base" / "reproduce.sh").read_text().splitlines()[1]
    assert "--melody_audio" in command
    _run_cli(command)
    cli = json.loads((job / "base" / "cli" / "manifest.json").read_text())["files"][0]
    assert cli["melody"] == entry["melody"] and cli["tokens_sha1"] == entry["tokens_sha1"]
    # the same melody with a text-only base: a message, and nothing generated
    _fill(page, "model_path", tiny_model_dir)
    text = _generate(page, "piano", 5, 1.0, mode="base only", expect="Error:")
    assert "text-only MusicGen" in text and "Traceback" not in text
    assert _newest_job(out_root) == job


def test_finished_run_shows_its_loss_curve_and_best_heldout_loss(page, out_root):
    page.get_by_role("tab", name="Train").click()
    _pick(page, "run_pick", str(out_root / "run1"))
    best = checkpoints.read_state(out_root / "run1" / "best_model")["best_metric"]
    text = _wait_text(page, "run_status", "best held-out loss")
    assert f"{best:.4f}" in text
    page.locator("#loss_plot img, #loss_plot svg, #loss_plot canvas").first.wait_for(state="visible")
    assert "step 4 / 4" in text
    _shot(page, "train")


def _newest_step(run: Path) -> int:
    ck = checkpoints.newest_checkpoint(run) if (run / "checkpoints").is_dir() else None
    return int(ck.name[5:]) if ck else -1


def _wait_for(cond, timeout_s: float, what: str):
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        if cond():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_run_started_from_the_form_checkpoints_stops_and_resumes(page, out_root, tiny_model_dir,
                                                                 example_data_dir):
    run = out_root / "run2"
    page.get_by_role("tab", name="Train").click()
    for key, value in (("output_dir", run), ("model_path", tiny_model_dir),
                       ("data_dir", example_data_dir),
                       # (so many steps that the run cannot end by itself before Stop, even unloaded)
                       ("max_steps", 20000), ("save_steps", 2), ("eval_steps", 20000), ("logging_steps", 1),
                       ("batch_size", 2), ("gradient_accumulation_steps", 1), ("mixed_precision", "no")):
        _fill(page, f"train_{key}", value)
    page.locator("#start_train").click()
    _wait_text(page, "train_msg", "Started")
    _wait_for(lambda: _newest_step(run) >= 2, 120, "a checkpoint of the run started from the form")
    _wait_text(page, "run_status", r"newest checkpoint: step-\d+", 30)
    page.locator("#stop_run").click()
    _wait_text(page, "train_msg", r"Stopped \(exit code 130\)", 90)
    stopped_at = _newest_step(run)
    ck = checkpoints.find_checkpoint(run, "latest")  # whole and loadable
    assert ck.state["global_step"] == stopped_at
    page.locator("#resume_run").click()
    _wait_text(page, "train_msg", "Resumed")
    _wait_for(lambda: _newest_step(run) > stopped_at, 120, "a checkpoint after the resume")
    page.locator("#stop_run").click()
    _wait_text(page, "train_msg", r"Stopped \(exit code 130\)", 90)
    steps = [json.loads(x)["step"] for x in (run / "logs" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == sorted(set(steps))  # resumed where it stopped: no step twice


def test_evaluate_tab_runs_compare_and_shows_the_report(page, server, out_root, tiny_model_dir,
                                                        example_data_dir):
    page.get_by_role("tab", name="Evaluate").click()
    _fill(page, "eval_model", tiny_model_dir)
    _pick(page, "eval_adapter", str(out_root / "run1" / "best_model"))
    _fill(page, "eval_data", example_data_dir)
    _fill(page, "eval_out", out_root / "evaluation")
    page.locator("#eval_quick input[type=checkbox]").check()
    page.locator("#eval_run").click()
    _wait_for(lambda: "held-out" in page.locator("#eval_summary textarea").input_value().lower(), 180,
              "the evaluation summary")
    results = json.loads((out_root / "evaluation" / "results.json").read_text())
    shown = page.locator("#eval_summary textarea").input_value()
    lk = results["likelihood"]
    assert f"{lk['lora']['ce']:.4f}" in shown and f"{lk['base']['ce']:.4f}" in shown
    frame = page.locator("#eval_report iframe")
    src = frame.get_attribute("src")
    assert page.request.get(server[1].rstrip("/") + src).status == 200
    # nothing outside the output folder is served
    assert page.request.get(server[1] + "gradio_api/file="
                            + str(Path(app.__file__).resolve())).status in (403, 404)
    _shot(page, "evaluate")
