#!/usr/bin/env bash
# Install the MusicGen LoRA toolkit's dependencies into the ACTIVE Python environment
# (a virtualenv or conda env; create one first: python3 -m venv .venv && . .venv/bin/activate).
#
#   bash install.sh            runtime dependencies
#   bash install.sh --dev      + what the whole test suite needs (pytest, ruff; gradio and playwright for the web
#                              UI's browser tests, which also need chromium: it says how to get it; demucs for
#                              the vocal-removal tests, as --separation)
#   bash install.sh --extras   + optional decoders/extras (PyAV for m4a/aac)
#   bash install.sh --check    only say which torch is found (and where) and what would be installed
#   bash install.sh --ui       + the local web UI (gradio: python lora/app.py)
#   bash install.sh --separation  + vocal removal with demucs (prepare_data --separate)
#
# torch: an installed torch (CUDA or CPU) is kept as it is, and named with its path. With none in this
# environment, a torch of the box's own python (the venv's base, conda base) that this one does not see is
# warned about first (keep it: python3 -m venv --system-site-packages .venv); then a GPU machine (nvidia-smi
# works) gets the default CUDA build from the package index, one without a GPU $TORCH_CPU_SPEC (default
# torch==2.13.0). TORCH_INDEX_URL installs torch from another index, e.g. the CUDA build that matches the
# driver: https://download.pytorch.org/whl/cu124, or .../whl/cpu for the small CPU wheel.
# Safe to run again: it installs only what is missing or too old. From inside lora/ (the user's plan),
# bash install.sh runs this same file.
set -Eeuo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
step="start"
trap 'echo; echo "install.sh FAILED at step: ${step}" >&2; echo "Fix the error above and run bash install.sh again." >&2' ERR

dev=0; extras=0; check=0; ui=0; separation=0
for a in "$@"; do
  case "$a" in
    --dev) dev=1 ;;
    --extras) extras=1 ;;
    --check) check=1 ;;
    --ui) ui=1 ;;
    --separation) separation=1 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option '$a' (use --dev, --extras, --ui, --separation, --check or --help)" >&2; exit 2 ;;
  esac
done
if [ "$dev" = 1 ]; then separation=1; fi  # (the suite tests vocal removal with a random demucs model)

step="find python"
PY="${PYTHON:-python}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
command -v "$PY" >/dev/null 2>&1 || { echo "No python found. Install Python 3.10+ first." >&2; false; }
"$PY" - <<'PY'
import sys
if sys.version_info < (3, 10):
    sys.exit(f"Python 3.10 or newer is needed, this is {sys.version.split()[0]}")
PY
if [ -z "${VIRTUAL_ENV:-}" ] && [ -z "${CONDA_PREFIX:-}" ]; then
  echo "note: no virtualenv or conda env is active; installing into $("$PY" -c 'import sys; print(sys.prefix)')"
fi
PIP=("$PY" -m pip install --disable-pip-version-check)

step="torch"
# "<version> (CUDA <x> build | CPU build) at <folder>" of the torch a python imports, or nothing.
torch_of() {
  "$1" - 2>/dev/null <<'PY' || true
import os, torch
build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
print(f"{torch.__version__} ({build}) at {os.path.dirname(torch.__file__)}")
PY
}
prefix="$("$PY" -c 'import sys; print(sys.prefix)')"
found="$(torch_of "$PY")"
if [ -n "$found" ]; then
  echo "torch: keeping the installed $found"
else
  # A CUDA torch of the box's own python (the base of this venv, conda base) that this environment does not see.
  base="$("$PY" -c 'import sys; print(sys.base_prefix)')"
  for other in "$base/bin/python3" "${CONDA_PYTHON_EXE:-}" /opt/conda/bin/python /root/miniconda3/bin/python \
               /usr/local/bin/python3 /usr/bin/python3; do
    [ -n "$other" ] && [ -x "$other" ] || continue
    [ "$("$other" -c 'import sys; print(sys.prefix)' 2>/dev/null)" = "$prefix" ] && continue
    theirs="$(torch_of "$other")"
    case "$theirs" in *CUDA*)
      echo "WARNING: $other has torch $theirs, which this environment ($prefix) does not see." >&2
      echo "  Installing a second torch (several GB; the package index's CUDA build may not match the driver)." >&2
      echo "  To use the box's torch instead, stop now (Ctrl-C) and either install into the box's environment" >&2
      echo "  (deactivate this venv) or recreate it seeing the system packages:" >&2
      echo "    rm -rf .venv && python3 -m venv --system-site-packages .venv && . .venv/bin/activate && bash install.sh" >&2
      if [ "$check" = 0 ] && [ -t 0 ]; then echo "  Continuing in 10 s ..." >&2; sleep 10; fi
      break ;;
    esac
  done
  idx=()
  [ -n "${TORCH_INDEX_URL:-}" ] && idx=(--index-url "$TORCH_INDEX_URL")
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    spec=torch; what="a CUDA build of torch"; why="GPU found"
  else
    spec="${TORCH_CPU_SPEC:-torch==2.13.0}"; what="$spec (CPU)"; why="no GPU"
  fi
  echo "torch: none in $prefix, $why -> installing $what${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL}"
  [ "$check" = 1 ] || "${PIP[@]}" "${idx[@]}" "$spec"
fi
# The torch version pinned while the rest installs, read from its metadata: importing torch here, before numpy is
# installed, would print torch's "Failed to initialize NumPy" warning on a first install.
torch_version() {
  "$PY" -c 'import importlib.metadata as m; print(m.version("torch").split("+")[0])' 2>/dev/null || true
}
# Debian's chromium, which the web UI's browser tests drive (tests/test_app.py skips them without it).
chromium_note() {
  local c; c="$(command -v chromium || command -v chromium-browser || true)"
  if [ -n "$c" ]; then echo "chromium     $c (the web UI's browser tests)"; else
    echo "chromium     not found: the web UI's browser tests (tests/test_app.py) skip without it (CI installs it):"
    echo "             sudo apt-get install chromium   (Debian/Ubuntu; the tests look for chromium on PATH)"; fi
}
if [ "$check" = 1 ]; then
  tv="$(torch_version)"
  [ -z "$tv" ] || echo "torch: pinned at ${tv} while the requirements install"
  wants="requirements.txt"; [ "$dev" = 1 ] && wants+=", requirements-dev.txt (with requirements-ui.txt)"
  [ "$ui" = 1 ] && wants+=", requirements-ui.txt"; [ "$extras" = 1 ] && wants+=", av"
  echo "would install: $wants"
  [ "$dev" = 1 ] && chromium_note
  echo "install.sh --check: nothing was installed"; exit 0
fi

step="requirements.txt"
# The constraint keeps pip from swapping the installed torch for another build while resolving.
tv="$(torch_version)"
cons="$(mktemp)"; echo "torch==${tv}" > "$cons"
"${PIP[@]}" -c "$cons" -r "$here/requirements.txt"
# The project itself, editable (pyproject.toml): `import lora` then finds this checkout from anywhere, so the
# scripts, tests and bench/ import the library with no sys.path edits. Its dependencies are the ones just installed.
step="the project (pip install -e .)"
"${PIP[@]}" --no-deps -e "$here" >/dev/null
if [ "$dev" = 1 ]; then step="requirements-dev.txt"; "${PIP[@]}" -c "$cons" -r "$here/requirements-dev.txt"; fi
if [ "$extras" = 1 ]; then step="extras (av)"; "${PIP[@]}" -c "$cons" av; fi
if [ "$ui" = 1 ]; then step="requirements-ui.txt"; "${PIP[@]}" -c "$cons" -r "$here/requirements-ui.txt"; fi
if [ "$separation" = 1 ]; then
  step="requirements-separation.txt"; "${PIP[@]}" -c "$cons" -r "$here/requirements-separation.txt"
fi
rm -f "$cons"

step="check imports"
"$PY" - <<'PY'
import importlib, shutil, sys
mods = ["torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "soundfile", "soxr",
        "librosa", "numpy", "scipy", "yaml", "tqdm", "tensorboard", "matplotlib", "pyloudnorm"]
bad = []
for m in mods:
    try:
        importlib.import_module(m)
    except Exception as e:  # report every failing import, then fail
        bad.append(f"{m}: {e}")
if bad:
    sys.exit("These imports fail:\n  " + "\n  ".join(bad))
import torch, transformers, peft, accelerate, soundfile
print()
print(f"Python       {sys.version.split()[0]} ({sys.prefix})")
print(f"torch        {torch.__version__}  transformers {transformers.__version__}  peft {peft.__version__}  "
      f"accelerate {accelerate.__version__}")
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"GPU {i}        {p.name}, {p.total_memory / 2**30:.1f} GiB, CUDA {torch.version.cuda}, "
              f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}")
else:
    print("GPU          none (CPU only: fine for the quick start and tests; real training wants a GPU)")
print(f"libsndfile   {soundfile.__libsndfile_version__} (mp3 {'yes' if 'MP3' in soundfile.available_formats() else 'no'})")
try:
    import av  # optional decoder for m4a/aac
    print(f"PyAV         {av.__version__} (m4a/aac decoding available)")
except ImportError:
    print("PyAV         not installed (m4a/aac need it: bash install.sh --extras)")
free = shutil.disk_usage(".").free / 2**30
print(f"free disk    {free:.1f} GiB here" + ("  (musicgen-small needs ~3 GiB, large ~14 GiB)" if free < 20 else ""))
print("install.sh: all imports OK")
PY
if [ "$separation" = 1 ]; then
  step="check demucs"
  "$PY" -c "import demucs.hf; from importlib.metadata import version; print(f'demucs       {version(\"demucs\")} (prepare_data --separate)')"
fi
if [ "$ui" = 1 ] || [ "$dev" = 1 ]; then
  step="check the web UI"
  "$PY" -c "import gradio; print(f'gradio       {gradio.__version__} (web UI: python lora/app.py)')"
fi
if [ "$dev" = 1 ]; then chromium_note; fi
