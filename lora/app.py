"""A local web UI: generate with base model and fine-tune side by side (A/B, blind), watch and steer
training, read evaluations. ``bash install.sh --ui`` installs what it needs (gradio); then::

    python lora/app.py                       # http://127.0.0.1:7860, bound to this machine only
    python lora/app.py --model_path tiny     # any config key as a flag: the forms start from it
    python lora/app.py --listen --port 7860 --auth user:password     # reachable on the LAN (use --auth)

Like every script it reads config.yaml and takes the keys of its sections (model, training, lora, data,
generation, evaluation) as flags; the forms start from those values (the base model, the adapter:
generation.lora_model_path, output/best_model by default).

Nothing here decodes on its own: Generate runs lora.generation.engine.generate (the engine of
inference_lora.py) on ONE base model, loaded once and kept; adapters are loaded onto it with peft
(``load_adapter``/``set_adapter``) and the base side of an A/B runs inside peft's
``disable_adapter()``, so no second base is loaded; several adapters are a mix, all active at once,
each at its own strength (as inference_lora.py's ``load_adapters``). The files go under output/ui/
with the CLI's ManifestWriter (lora/generation/manifest.py: the same manifest fields) and a
``reproduce.sh`` holding the inference_lora.py command that regenerates them. Train and Evaluate run
train_lora.py / evaluate.py as subprocesses with flags, so UI runs and CLI runs are the same thing.
GPU work (generation, evaluation) goes through one queue, one job at a time; waiting jobs show their
place in it.
"""

from __future__ import annotations

import argparse
import html
import os
import random
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Optional

if not __package__:  # run as a file, maybe without `pip install -e .`: see lora/_bootstrap.py
    import _bootstrap

    _bootstrap.find_package()

from lora.common.cli import UserError, log, run_main, setup_logging
from lora.config import REPO_ROOT, Config, parse_config
from lora.modeling.adapter import trigger_note
from lora.scoring.plots import loss_figure
from lora.webui import data as data_tab
from lora.webui.engine import (
    MODES,
    UPLOADS,
    Engine,
    GenForm,
    Side,
    clean_ui_outputs,
    default_adapter,
    download_files,
    is_melody_base,
    list_adapters,
    run_generation,
)
from lora.webui.runs import (
    TRAIN_FIELDS,
    Processes,
    evaluation_summary,
    list_evaluations,
    list_runs,
    log_tail,
    md_text,
    newest_samples,
    page_message,
    read_metrics,
    resume_training,
    run_summary,
    start_evaluation,
    start_training,
    train_defaults,
    under_root,
)

MAX_UPLOAD = "200mb"  # one uploaded audio prompt or melody (an hour of 16-bit stereo is 690 MB)
MAX_QUEUE = 32        # requests waiting in the UI's queue at once


# ============================================================================================
# Server
# ============================================================================================
# the config sections whose keys are flags here (the forms' defaults); the first listed owns a shared
# name (--output_dir is training.output_dir: the Train form's)
SECTIONS = ("model", "training", "lora", "data", "generation", "evaluation")
# the Evaluate tab's summary is a table of aligned columns
CSS = "#eval_summary textarea { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }"


def _server_flags(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("app (the server)")
    g.add_argument("--output_root", default=str(REPO_ROOT / "output"),
                   help="Folder whose runs and adapters are listed; UI files go to OUTPUT_ROOT/ui")
    g.add_argument("--listen", action="store_true",
                   help="Bind 0.0.0.0 (reachable from the LAN); default 127.0.0.1")
    g.add_argument("--port", type=int, default=7860)
    g.add_argument("--auth", default=None, help="user:password required to open the UI")
    g.add_argument("--max_ui_age_days", type=float, default=7.0,
                   help="Delete UI outputs older than this")
    g.add_argument("--max_ui_gb", type=float, default=5.0, help="Keep UI outputs under this total size")


def _server_problems(cfg: Config, ns) -> list[str]:
    user, _, password = (ns.auth or "").partition(":")
    return ["--auth must be user:password"] if ns.auth is not None and not (user and password) else []


def parse_args(argv=None):
    """The server's flags and the schema's (ns.cfg: the resolved config, defaults < config.yaml <
    flags)."""
    cfg, ns = parse_config(argv, description="Local web UI: generate (A/B base vs fine-tune), train, "
                                             "evaluate.", sections=SECTIONS, extra=_server_flags,
                           rules=_server_problems)
    ns.cfg = cfg
    return ns


def load_config(config_file: Optional[str]) -> Config:
    argv = ["--config", config_file] if config_file else []
    cfg, _ = parse_config(argv, description="app")
    return cfg


def _gradio():
    """gradio, imported only when the UI is built (bash install.sh --ui), offline: no analytics."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    try:
        import gradio as gr
    except ImportError:
        raise UserError("The web UI needs gradio: bash install.sh --ui (pip install -r "
                        "requirements-ui.txt).") \
            from None
    return gr


def _pairs(sides: list[Side]) -> list[dict]:
    """Per sample (prompt, seed): {label: file} of each side."""
    rows: dict = {}
    for side in sides:
        for e in side.entries:
            key = f"{e['prompt'][:60]} · seed {e['seed']}"
            rows.setdefault(key, {})[side.label] = str(side.folder / e["file"])
    return [dict(key=k, files=v) for k, v in rows.items()]


def _player_updates(gr, state: dict, key: Optional[str]):
    row = next((r for r in state.get("pairs", []) if r["key"] == key), None)
    order = state.get("order", [])
    out = []
    for i in range(2):
        label = order[i] if i < len(order) else None
        path = row["files"].get(label) if row and label else None
        name = state["names"][i] if i < len(state.get("names", [])) else ""
        out.append(gr.update(value=path, label=name, visible=label is not None))
    return out


def _generate_handler(gr, engine: Engine, out_root: Path, ns):
    def on_generate(prompts, model_path, adapter, lora_scale, duration, guidance, temperature,
                    top_k, top_p, seed,
                    num_samples, audio_prompt, mode, blind, melody, progress=gr.Progress()):
        f = GenForm(prompts or "", model_path or "", adapter or [], lora_scale, duration, guidance,
                    temperature,
                    top_k, top_p, seed, num_samples, audio_prompt, mode, bool(blind), melody or None)
        last = [0.0]

        def report(label, w, nw, s, n):
            if time.time() - last[0] > 0.25 or s == n:
                last[0] = time.time()
                progress((s, n), desc=f"{label}: window {w + 1}/{nw}", unit="steps")

        empty = {"pairs": [], "order": [], "names": []}
        try:
            clean_ui_outputs(out_root / "ui", ns.max_ui_age_days * 86400, ns.max_ui_gb * 2 ** 30,
                             keep=[audio_prompt, melody])
            sides, first_seed, stopped = run_generation(engine, f, out_root, report)
        # every failure becomes a message in the page; the server keeps serving
        except Exception as e:
            return (md_text(page_message(e)), *_player_updates(gr, empty, None), gr.update(choices=[], value=None),
                    gr.update(visible=False), None, empty)
        done = [s for s in sides if s.entries]
        order = [s.label for s in done]
        if f.blind and len(order) == 2:
            random.shuffle(order)
        by_label = {s.label: s for s in done}
        names = [("A" if i == 0 else "B") if f.blind else _side_name(by_label[lab], f) for i,
                 lab in enumerate(order)]
        state = {"pairs": _pairs(done), "order": order, "names": names, "blind": f.blind
                 and len(order) == 2, "real": [_side_name(by_label[lab], f) for lab in order]}
        n_files = sum(len(s.entries) for s in sides)
        lines = [("Stopped: " if stopped else "Done: ") + f"{n_files} file(s), seed {first_seed}"
                 + (f"–{first_seed + int(f.num_samples) - 1}" if int(f.num_samples) > 1 else "")
                 + f", {float(f.duration):g} s each."]
        for s in sides:
            lines.append(f"- {s.label}: {md_text(s.folder / 'manifest.json')}  \n  CLI: "
                         f"{md_text(s.command)}")
        keys = [r["key"] for r in state["pairs"]]
        state["downloads"] = download_files(done)  # (named by side: base_..., fine-tune_...)
        files = state["downloads"] if not state["blind"] else None
        return ("\n".join(lines), *_player_updates(gr, state, keys[0] if keys else None),
                gr.update(choices=keys, value=keys[0] if keys else None),
                gr.update(visible=state["blind"]), files, state)

    return on_generate


def _side_name(side: Side, f: GenForm) -> str:
    if not side.adapters:
        return f"Base model ({f.model_path.strip()})"
    if len(side.adapters) == 1:
        return f"Fine-tune ({Path(side.adapters[0]).name}, lora_scale {side.scales[0]:g})"
    return "Fine-tune (" + " + ".join(f"{Path(a).name} × {s:g}" for a,
                                      s in zip(side.adapters, side.scales)) + ")"


def _generate_tab(gr, cfg: Config, engine: Engine, out_root: Path, ns) -> None:
    adapters = list_adapters(out_root) if out_root.is_dir() else []
    first = default_adapter(adapters, cfg)
    g = cfg.generation
    scale = " ".join(f"{float(x):g}"
                     for x in (g.lora_scale if isinstance(g.lora_scale, list) else [g.lora_scale]))
    with gr.Row():
        with gr.Column(scale=1):
            prompts = gr.Textbox(label="Prompts (one per line)", lines=3, elem_id="prompts",
                                 placeholder="lofi hip hop beat with warm piano")
            model_path = gr.Textbox(label="Base model (hub id, folder or 'tiny')",
                                    value=cfg.model.model_path, elem_id="model_path")
            with gr.Row():
                adapter = gr.Dropdown(label="Adapters (pick or type a folder; several = a mix; "
                                            "none = base model)",
                                      choices=adapters, value=[first] if first else [], multiselect=True,
                                      allow_custom_value=True, elem_id="adapter", scale=4)
                refresh = gr.Button("Refresh list", elem_id="refresh_adapters", scale=1)
            trigger = gr.Markdown(_trigger_notes(adapters[:1]), elem_id="adapter_trigger")
            mode = gr.Radio(list(MODES), value=MODES[0], label="Mode", elem_id="mode")
            blind = gr.Checkbox(label="Blind A/B: hide which is which until revealed", elem_id="blind")
            with gr.Row():
                lora_scale = gr.Textbox(value=scale,
                                        label="Strength per adapter (lora_scale; e.g. 1 or 0.7, 0.4)",
                                        elem_id="lora_scale")
                duration = gr.Number(value=g.duration, label="Duration, s (over 30 s: windowed)",
                                     elem_id="duration")
                num_samples = gr.Number(value=g.num_samples, precision=0, label="Samples per prompt",
                                        elem_id="num_samples")
            with gr.Row():
                guidance = gr.Number(value=g.guidance_scale, label="Guidance", elem_id="guidance")
                temperature = gr.Number(value=g.temperature, label="Temperature", elem_id="temperature")
                top_k = gr.Number(value=g.top_k, precision=0, label="Top-k", elem_id="top_k")
                top_p = gr.Number(value=g.top_p, label="Top-p", elem_id="top_p")
                seed = gr.Textbox(value="random", label="Seed (number or 'random')", elem_id="seed")
            audio_prompt = gr.File(label="Audio prompt to continue (optional; WAV/FLAC/MP3/OGG)",
                                   type="filepath", elem_id="audio_prompt")
            melody = gr.File(label="Melody to follow (melody models; WAV/FLAC/MP3/OGG)", type="filepath",
                             elem_id="melody_audio", visible=is_melody_base(cfg.model.model_path))
            with gr.Row():
                go = gr.Button("Generate", variant="primary", elem_id="generate_btn")
                stop = gr.Button("Stop", variant="stop", elem_id="stop_btn")
        with gr.Column(scale=1):
            status = gr.Markdown(elem_id="gen_status")
            with gr.Row():
                player_a = gr.Audio(label="A", type="filepath", interactive=False, elem_id="player_a")
                player_b = gr.Audio(label="B", type="filepath", interactive=False, elem_id="player_b")
            sample = gr.Dropdown(label="Sample", choices=[], elem_id="sample_pick")
            reveal = gr.Button("Reveal which is which", visible=False, elem_id="reveal_btn")
            files = gr.File(label="Downloads", file_count="multiple", interactive=False,
                            elem_id="downloads")
            state = gr.State({})
    inputs = [prompts, model_path, adapter, lora_scale, duration, guidance, temperature, top_k,
              top_p, seed, num_samples, audio_prompt, mode, blind, melody]
    go.click(_generate_handler(gr, engine, out_root, ns), inputs,
             [status, player_a, player_b, sample, reveal, files, state], concurrency_id="gpu",
             concurrency_limit=1, show_progress_on=[status])
    # (no output: the running job's own result, "Stopped: ...", is what the page shows; a reply here
    # could arrive after it and overwrite it)
    stop.click(engine.stop.set, None, None, queue=False)
    refresh.click(lambda: gr.update(choices=list_adapters(out_root)), None, [adapter], queue=False)
    adapter.change(_trigger_notes, [adapter], [trigger], queue=False)
    # the melody upload: shown for a melody base, and while it holds a file (so that it can be
    # cleared)
    model_path.change(lambda path, mel: gr.update(visible=is_melody_base(path) or bool(mel)),
                      [model_path, melody], [melody], queue=False)
    sample.change(lambda st, key: _player_updates(gr, st, key), [state, sample],
                  [player_a, player_b], queue=False)

    def on_reveal(st, key):
        if not st.get("blind"):
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        st = dict(st, names=st["real"], blind=False)
        a, b = _player_updates(gr, st, key)
        files = st.get("downloads")
        return (f"A = {md_text(st['real'][0])}  \nB = {md_text(st['real'][1])}", a, b, files)

    reveal.click(on_reveal, [state, sample], [status, player_a, player_b, files], queue=False)


def _trigger_notes(adapters) -> str:
    """The trigger word of each picked adapter (what inference_lora.py says too)."""
    notes = [trigger_note(a) for a in (adapters or []) if a and Path(str(a)).expanduser().is_dir()]
    return "  \n".join(f"Trigger word: {n}" for n in notes if n)


def _train_tab(gr, cfg: Config, out_root: Path, procs: Processes, config_file: Optional[str]) -> dict:
    runs = list_runs(out_root) if out_root.is_dir() else []
    with gr.Row():
        run = gr.Dropdown(label="Run (pick, or type its output folder)", choices=runs, value=runs[0]
                          if runs else None, allow_custom_value=True, elem_id="run_pick", scale=4)
        refresh = gr.Button("Refresh list", elem_id="refresh_runs", scale=1)
    run_status = gr.Markdown(elem_id="run_status")
    plot = gr.Plot(label="Loss (train and held-out), redrawn while it trains", elem_id="loss_plot")
    with gr.Row():
        stop = gr.Button("Stop run (keeps its checkpoints)", variant="stop", elem_id="stop_run")
        resume = gr.Button("Resume from newest checkpoint", elem_id="resume_run")
    msg = gr.Markdown(elem_id="train_msg")
    log_box = gr.Textbox(label="Log of the run started here", lines=6, interactive=False,
                         elem_id="train_log")
    seen = gr.State(None)
    _samples_view(gr, run)
    with gr.Accordion("Start a new run (train_lora.py with these flags; the rest from config.yaml)",
                      open=True):
        defaults = train_defaults(cfg, out_root)
        boxes = []
        with gr.Row(equal_height=True):
            for key in TRAIN_FIELDS:
                v = defaults[key]
                kind = gr.Number if isinstance(v, (int, float)) and not isinstance(v,
                                                                                   bool) else gr.Textbox
                boxes.append(kind(value=v, label=key, elem_id=f"train_{key}", min_width=160))
        start = gr.Button("Start training", variant="primary", elem_id="start_train")

    def refresh_run(name, last):
        if not name:
            return "Pick a run, or start one below.", gr.skip(), "", last
        folder = Path(name).expanduser()
        history = read_metrics(folder)
        state, p = procs.state(str(folder))
        sig = (str(folder), len(history), state)
        fig = loss_figure(history) if sig != last else gr.skip()
        return run_summary(folder, history, state), fig, log_tail(p.log_path) if p else "", sig

    def on_start(*values):
        try:  # checked as train_lora.py checks it, before anything starts
            out, command = start_training(procs, dict(zip(TRAIN_FIELDS, values)), config_file)
        except Exception as e:
            return md_text(page_message(e)), gr.skip()
        return (md_text(f"Started: {command}"), gr.update(choices=list_runs(out_root) + [out], value=out))

    def on_stop(name):
        return md_text(procs.stop(str(Path(name).expanduser()))) if name else "Pick a run first."

    def on_resume(name):
        try:
            return md_text(f"Resumed: {resume_training(procs, str(Path(name).expanduser()))}") if name \
                else "Pick a run."
        except Exception as e:
            return md_text(page_message(e))

    timer = gr.Timer(2.0)
    timer.tick(refresh_run, [run, seen], [run_status, plot, log_box, seen], concurrency_id="poll",
               concurrency_limit=None, show_progress="hidden")
    run.change(refresh_run, [run, seen], [run_status, plot, log_box, seen], concurrency_id="poll",
               concurrency_limit=None)
    refresh.click(lambda: gr.update(choices=list_runs(out_root)), None, [run], queue=False)
    start.click(on_start, boxes, [msg, run], concurrency_id="procs", concurrency_limit=None)
    stop.click(on_stop, [run], [msg], concurrency_id="procs", concurrency_limit=None)
    resume.click(on_resume, [run], [msg], concurrency_id="procs", concurrency_limit=None)
    return dict(zip(TRAIN_FIELDS, boxes), msg=msg)


def _samples_view(gr, run) -> None:
    """Hear it learn: the run's newest training samples beside step 0's (the base model), same
    prompt and seed, refreshed while it trains."""
    with gr.Group():
        status = gr.Markdown("No training samples yet.", elem_id="samples_status")
        pick = gr.Dropdown(label="Training sample (prompt · seed)", choices=[], elem_id="train_sample_pick")
        with gr.Row():
            base = gr.Audio(label="step 0 (base model)", type="filepath", interactive=False,
                            elem_id="sample_base")
            now = gr.Audio(label="newest step", type="filepath", interactive=False, elem_id="sample_now")
    state = gr.State(None)

    def players(st, label):
        row = next((r for r in (st or {}).get("rows", []) if r["label"] == label), None)
        if row is None:
            return gr.update(value=None), gr.update(value=None, label="newest step"), ""
        return (gr.update(value=row["base"]), gr.update(value=row["now"], label=f"step {st['step']} (now)"),
                row["copy"])

    def refresh(name, st, label):
        found = newest_samples(Path(name).expanduser()) if name else None
        if found == st:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), st
        if found is None:
            return ("No training samples yet (samples/ is written at step 0 and at every validation).",
                    gr.update(choices=[], value=None), gr.update(value=None), gr.update(value=None), None)
        labels = [r["label"] for r in found["rows"]]
        label = label if label in labels else (labels[0] if labels else None)
        a, b, copy = players(found, label)
        text = (f"Samples at step 0 (the base model) and step {found['step']}, same prompts and "
                f"seeds: listen for your style arriving. {copy}")
        return text, gr.update(choices=labels, value=label), a, b, found

    timer = gr.Timer(3.0)
    outs = [status, pick, base, now, state]
    timer.tick(refresh, [run, state, pick], outs, concurrency_id="poll", concurrency_limit=None,
               show_progress="hidden")
    run.change(refresh, [run, state, pick], outs, concurrency_id="poll", concurrency_limit=None)
    pick.change(lambda st, label: players(st, label)[:2], [state, pick], [base, now], queue=False)


def _report_html(folder: Path) -> str:
    """The evaluation's report.html in a frame: its path URL-quoted and HTML-escaped (a folder name
    is never markup), and the frame sandboxed without scripts (a report.html that is not
    evaluate.py's cannot run code in the UI's page)."""
    report = folder / "report.html"
    if not report.is_file():
        return ""
    src = html.escape("/gradio_api/file=" + urllib.parse.quote(str(report)), quote=True)
    return (f'<iframe src="{src}" title="report.html" sandbox="allow-same-origin" '
            f'style="width:100%;height:640px;border:1px solid #ccc"></iframe>')


def _evaluate_tab(gr, cfg: Config, out_root: Path, procs: Processes) -> None:
    evals = list_evaluations(out_root) if out_root.is_dir() else []
    adapters = list_adapters(out_root) if out_root.is_dir() else []
    first = default_adapter(adapters, cfg)
    pick = gr.Dropdown(label="Evaluation (a folder with results.json)", choices=evals,
                       value=evals[0] if evals else None, allow_custom_value=True, elem_id="eval_pick")
    summary = gr.Textbox(label="Summary (results.json)", lines=10, interactive=False,
                         elem_id="eval_summary")
    report = gr.HTML(elem_id="eval_report")
    with gr.Accordion("Run evaluate.py --compare (base vs adapter)", open=True):
        with gr.Row():
            model = gr.Textbox(value=cfg.model.model_path, label="Base model", elem_id="eval_model")
            adapter = gr.Dropdown(choices=adapters, value=first,
                                  allow_custom_value=True, label="Adapter", elem_id="eval_adapter")
            data = gr.Textbox(value=cfg.data.data_dir, label="Data folder", elem_id="eval_data")
            out = gr.Textbox(value=str(out_root / "evaluation"), label="Output folder",
                             elem_id="eval_out")
            quick = gr.Checkbox(label="Held-out likelihood only (fast)", elem_id="eval_quick")
        run_btn = gr.Button("Run evaluate.py --compare", variant="primary", elem_id="eval_run")
    msg = gr.Textbox(label="evaluate.py", lines=6, interactive=False, elem_id="eval_msg")

    def show(folder):
        if not folder:
            return "No evaluation yet: run one below.", ""
        folder = Path(folder).expanduser()
        return evaluation_summary(folder), _report_html(folder)

    def on_run(model_path, adapter_path, data_dir, out_dir, fast):
        """Runs in the GPU queue (a generation waits for it), streaming the log; the form is checked
        as evaluate.py checks it before anything starts."""
        try:
            folder = str(under_root(out_dir, out_root, "output folder"))
            p = start_evaluation(procs, model_path, adapter_path, data_dir, folder, bool(fast))
        except Exception as e:
            yield page_message(e), gr.skip(), gr.skip(), gr.skip()
            return
        while p.popen.poll() is None:
            time.sleep(1.0)
            yield log_tail(p.log_path), gr.skip(), gr.skip(), gr.skip()
        text = f"$ {p.command}\n(exit code {p.popen.returncode})\n{log_tail(p.log_path)}"
        if p.popen.returncode != 0:
            yield text, gr.skip(), gr.skip(), gr.skip()
            return
        yield (text, gr.update(choices=list_evaluations(out_root) + [folder], value=folder),
               *show(folder))

    pick.change(show, [pick], [summary, report], queue=False)
    run_btn.click(on_run, [model, adapter, data, out, quick], [msg, pick, summary, report],
                  concurrency_id="gpu", concurrency_limit=1)
    return pick, summary, report, show


def build_ui(cfg: Config, out_root: Path, ns):
    """The Blocks app (not yet launched)."""
    out_root.mkdir(parents=True, exist_ok=True)
    # uploads and served copies
    os.environ.setdefault("GRADIO_TEMP_DIR", str(out_root / "ui" / UPLOADS))
    gr = _gradio()
    engine, procs = Engine(cfg), Processes(out_root)
    with gr.Blocks(title="MusicGen LoRA", analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        gr.Markdown(f"### MusicGen LoRA · outputs in {md_text(out_root)}")
        with gr.Tabs() as tabs:
            with gr.Tab("Generate", id="generate", elem_id="tab_generate"):
                _generate_tab(gr, cfg, engine, out_root, ns)
            with gr.Tab("Data", id="data", elem_id="tab_data"):
                to_train, data_dir = data_tab.build_tab(gr, cfg, procs, ns.config, out_root)
            with gr.Tab("Train", id="train", elem_id="tab_train"):
                train = _train_tab(gr, cfg, out_root, procs, ns.config)
            with gr.Tab("Evaluate", id="evaluate", elem_id="tab_evaluate"):
                pick, summary, report, show = _evaluate_tab(gr, cfg, out_root, procs)
        demo.load(show, [pick], [summary, report])
        # "train on this": the Train form gets the prepared folder, and the Train tab opens
        def on_to_train(folder):
            try:
                path = data_tab.data_folder(folder, out_root)
                note = data_tab.trigger_of(folder, out_root)
            except Exception as e:
                return gr.skip(), md_text(page_message(e)), gr.skip()
            return (gr.update(value=str(path)), f"Data folder from the Data tab: {md_text(path)} {note}",
                    gr.Tabs(selected="train"))

        to_train.click(on_to_train, [data_dir], [train["data_dir"], train["msg"], tabs], queue=False)
    demo.engine, demo.procs = engine, procs
    return demo


def launch(demo, ns, out_root: Path, block: bool = False):
    """Serve on 127.0.0.1 (0.0.0.0 with --listen); only out_root's files (and gradio's own copies)
    are served."""
    auth = tuple(ns.auth.split(":", 1)) if ns.auth else None
    host = "0.0.0.0" if ns.listen else "127.0.0.1"
    if ns.listen and not auth:
        log.warning("--listen without --auth: anyone on the network can use this UI")
    # bounded: requests waiting at once, and the size of one upload
    demo.queue(default_concurrency_limit=1, max_size=MAX_QUEUE)
    # quiet: gradio's own start-up lines end with its share-link hint, a link this UI never makes
    demo.launch(server_name=host, server_port=ns.port, auth=auth, share=False, inbrowser=False,
                allowed_paths=[str(out_root)], prevent_thread_lock=True, ssr_mode=False,
                mcp_server=False, footer_links=[], quiet=True, css=CSS, max_file_size=MAX_UPLOAD)
    log.info("Web UI on http://%s:%d%s (outputs in %s)", "127.0.0.1" if not ns.listen else host,
             ns.port, "" if not block else "; Ctrl-C stops it", out_root)
    if block:
        try:
            demo.block_thread()
        finally:
            demo.procs.stop_all()
    return demo


def main(argv=None) -> int:
    setup_logging()
    ns = parse_args(argv)
    demo = build_ui(ns.cfg, Path(ns.output_root).resolve(), ns)
    launch(demo, ns, Path(ns.output_root).resolve(), block=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
