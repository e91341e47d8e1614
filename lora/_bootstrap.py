"""The one bootstrap, for a user who runs a script without installing the project.

``bash install.sh`` installs this project in editable mode (``pip install -e .``), and then ``import
lora`` finds this package from anywhere and this module changes nothing. Run as a file without that
(``python lora/train_lora.py``, or ``cd lora && python train_lora.py`` as the user's plan does),
Python puts only lora/ itself on ``sys.path``; each script calls ``find_package()`` before it
imports the library, which puts the folder above lora/ there. It does the same when another copy of
the project is the one installed, so a script always runs the library that sits beside it.
"""

import importlib.util
import sys
from pathlib import Path


def find_package() -> None:
    """Make ``import lora`` load the package this file belongs to."""
    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.find_spec("lora")
    if spec is None or spec.origin is None or Path(spec.origin).resolve() != root / "lora" / "__init__.py":
        sys.path.insert(0, str(root))
