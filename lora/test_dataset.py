"""Is my data ready for training? Checks the data folder, decodes a few batches, and (with --model_path)
reads it the way training does.

    cd lora && python test_dataset.py                 # the data_dir of config.yaml (../data)
    python lora/test_dataset.py --data_dir data --num_batches 5
    python lora/test_dataset.py --data_dir data --model_path tiny    # + the token path training reads

What it checks:

1. The folder: the same summary as ``prepare_data.py --validate`` (clips per split, hours, duration
   histogram, caption statistics, every problem found).
2. The audio: a few batches of clips decoded from their WAV files (padded to the longest clip), checked for
   NaN/inf, silence and samples beyond full scale. Training does not read audio: this checks the files.
3. With --model_path (a hub id, a local folder or tiny): what training reads. The model builds the token cache
   (EnCodec codes and text states, in data_dir/cache, reused by training) and a few training batches are drawn
   through the same Dataset, batching and collate as train_lora.py (lora.dataprep.data_check
   .check_token_batches). Without it, the token path is checked by test_model.py and train_lora.py.

Ends with a verdict and the next step. Exit code 0 = OK.
"""

from __future__ import annotations

import argparse
import sys

if not __package__:  # run as a file, maybe without `pip install -e .`: see lora/_bootstrap.py
    import _bootstrap

    _bootstrap.find_package()

from lora.common.cli import log, script_command, shown_model, shown_path
from lora.config import parse_config
from lora.dataprep.audio import AudioError, load_audio
from lora.dataprep.data_check import check_data_dir, check_token_batches
from lora.dataset import ClipRecord, data_dir_lock


class AudioClipDataset:
    """Records -> {"audio": float tensor (C, N), "text": str, "id": str}, cropped to max_seconds."""

    def __init__(self, records: list[ClipRecord], sample_rate: int, channels: int, max_seconds: float):
        self.records, self.sr, self.channels = records, sample_rate, channels
        self.max_seconds = max_seconds

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        import torch

        r = self.records[i]
        y = load_audio(r.path, self.sr, self.channels, duration=self.max_seconds)
        return {"audio": torch.from_numpy(y), "text": r.text, "id": r.id}


def collate_audio(items: list[dict]) -> dict:
    """Pad to the longest clip: audio (B, C, N), mask (B, N) (1 = real sample), lengths (B,),
    texts."""
    import torch

    n = max(it["audio"].shape[-1] for it in items)
    c = items[0]["audio"].shape[0]
    audio = torch.zeros(len(items), c, n)
    mask = torch.zeros(len(items), n, dtype=torch.long)
    for b, it in enumerate(items):
        k = it["audio"].shape[-1]
        audio[b, :, :k] = it["audio"]
        mask[b, :k] = 1
    return {"audio": audio, "mask": mask, "lengths": mask.sum(1), "texts": [it["text"] for it in items],
            "ids": [it["id"] for it in items]}


def _extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num_batches", type=int, default=3, help="Batches of audio to load and check")


def main(argv=None) -> int:
    cfg, ns = parse_config(argv, description=__doc__.split("\n\n")[0],
                           sections=("data", "training", "model"), extra=_extra,
                           rules=lambda cfg, ns: [f"--num_batches must be >= 0, got {ns.num_batches}"]
                           if ns.num_batches < 0 else [])
    d = cfg.data
    log.info("checking %s (metadata %s)", d.data_dir, d.metadata_file)
    with data_dir_lock(d.data_dir, writer=False):  # prepare_data waits for the check
        return check(cfg, ns, argv)


def check(cfg, ns, argv) -> int:
    """The data check, the audio batches and (with --model_path) the token batches."""
    d, t = cfg.data, cfg.training

    summary = check_data_dir(d.data_dir, d.metadata_file, sample_rate=d.sample_rate, hash_content=False)
    print(summary.text())
    load_problems: list[str] = []
    if summary.records and ns.num_batches:
        import torch
        from torch.utils.data import DataLoader

        ok_records = [r for r in summary.records if r.path.is_file()]
        channels = summary.channels or d.channels
        ds = AudioClipDataset(ok_records, d.sample_rate, channels, t.max_duration)
        loader = DataLoader(ds, batch_size=t.batch_size, shuffle=True, collate_fn=collate_audio,
                            generator=torch.Generator().manual_seed(t.seed))
        print(f"Loading {ns.num_batches} batch(es) of {t.batch_size} clip(s):")
        try:
            for i, batch in enumerate(loader):
                if i >= ns.num_batches:
                    break
                a = batch["audio"]
                secs = (batch["lengths"].float() / d.sample_rate).tolist()
                rms = [float(a[b, :, :int(k)].pow(2).mean().sqrt()) for b,
                       k in enumerate(batch["lengths"])]
                print(f"  batch {i}: audio {tuple(a.shape)} mask {tuple(batch['mask'].shape)}, "
                      f"seconds {', '.join(f'{s:.1f}' for s in secs)}, rms "
                      f"{', '.join(f'{r:.3f}' for r in rms)}")
                print(f"    texts: {batch['texts']}")
                if not torch.isfinite(a).all():
                    load_problems.append(f"batch {i} ({', '.join(batch['ids'])}): audio holds NaN or inf")
                for b, r in enumerate(rms):
                    if r < 1e-4:
                        load_problems.append(f"{batch['ids'][b]}: the clip is silent")
                if a.abs().max() > 1.0 + 1e-4:
                    load_problems.append(f"batch {i}: samples beyond [-1, 1]")
        except AudioError as e:
            load_problems.append(f"could not load a clip: {e}")
    token_check = summary.records and ns.num_batches and _model_given(argv)
    if token_check and not summary.problems:
        load_problems += check_token_batches(cfg, [r for r in summary.records if r.path.is_file()],
                                             ns.num_batches)
    problems = summary.problems + load_problems
    if problems:
        for p in load_problems:
            print(f"  - {p}")
        print(f"VERDICT: NOT READY — {len(problems)} problem(s) above. Fix them (or re-run "
              f"{script_command('prepare_data.py')} --input_dir YOUR_AUDIO --output_dir "
              f"{shown_path(d.data_dir)}), then run this again.")
        return 1
    print("Checked: the folder, the audio and the token batches training reads." if token_check else
          "Checked: the folder and the audio (add --model_path to check the token batches training reads).")
    model = shown_model(cfg.model.model_path)
    print(f"VERDICT: OK — next: {script_command('test_model.py')} --model_path {model}   (then "
          f"{script_command('train_lora.py')} --model_path {model} --data_dir {shown_path(d.data_dir)} ...)")
    return 0


def _model_given(argv) -> bool:
    """Whether --model_path (or its alias) was given on the command line."""
    args = sys.argv[1:] if argv is None else argv
    return any(str(a).split("=")[0] in ("--model_path", "--base_model_path") for a in args)


if __name__ == "__main__":
    from lora.common.cli import run_main

    sys.exit(run_main(main))
