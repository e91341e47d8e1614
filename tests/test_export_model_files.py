"""export_model.py writes an ordinary folder: every file with the usual permissions (today's main
leaves model.safetensors owner-only, 0600, the rest 0644)."""

from __future__ import annotations

import os
import stat

import pytest


@pytest.mark.slow
def test_exported_files_have_the_usual_permissions(tmp_path, tiny_model_dir, trained_output_dir):
    from lora import export_model

    out = tmp_path / "merged"
    assert export_model.main(["--base_model_path", str(tiny_model_dir), "--lora_model_path",
                              str(trained_output_dir / "best_model"), "--output_dir", str(out)]) == 0
    mask = os.umask(0o022)
    os.umask(mask)
    usual = 0o666 & ~mask
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in out.iterdir() if f.is_file()}
    assert "model.safetensors" in modes
    assert {n: m for n, m in modes.items() if m & usual != usual} == {}, {n: oct(m) for n, m in modes.items()}


def test_atomic_dir_gives_owner_only_files_the_usual_permissions(tmp_path):
    import tempfile

    from lora.common.files import atomic_dir

    with atomic_dir(tmp_path / "folder") as tmp:
        fd, name = tempfile.mkstemp(dir=tmp)  # (0600, as transformers' shard writer leaves them)
        os.close(fd)
        os.rename(name, tmp / "weights.bin")
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "folder" / "weights.bin").stat().st_mode) == 0o666 & ~mask
