"""The shape of lora/: scripts at the top, the library in one package per pipeline stage, each
importing only the stages its ``__init__`` declares; short functions and modules, no import cycle,
MusicGen's internals in the family modules, no script imported by the library. Everything here is
read from the folders and the source (ast), so it holds for every file, including ones added
later."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.helpers import ROOT

LORA = ROOT / "lora"
BENCH = ROOT / "bench"
TESTS = ROOT / "tests"
# The test files at the top of tests/ besides tests/test_<script>.py: the schema (lora/config.py), the
# dataset (lora/dataset.py) and the project as a whole (layout, docs, install.sh).
# tests of the project as a whole: the plan modules, the layout, the docs' commands, the installer, the
# user's plan copied step by step, and the next-step hints every script prints
PROJECT_TESTS = {"test_config.py", "test_dataset.py", "test_layout.py", "test_docs.py", "test_install.py",
                 "test_install_dev.py", "test_user_plan.py", "test_next_step_hints.py"}
MAX_FUNCTION_LINES = 100
MAX_MODULE_LINES = 600
# The two modules the user's plan names beside its scripts, and the one bootstrap for running a
# script uninstalled.
PLAN_MODULES = {"config", "dataset"}
BOOTSTRAP = "_bootstrap"
# Names of MusicGen's internals that only the model family modules may spell out.
INTERNALS = ("enc_to_dec_proj", ".decoder.model.decoder", "encoder_outputs=", "audio_encoder.",
             "text_encoder(")


def _name(path: Path) -> str:
    """lora/training/step.py -> lora.training.step; lora/__init__.py -> lora."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _library() -> dict[str, ast.Module]:
    return {_name(p): ast.parse(p.read_text(encoding="utf-8")) for p in sorted(LORA.rglob("*.py"))}


def _defines_main(tree: ast.Module) -> bool:
    return any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body)


def _scripts() -> set[str]:
    """The scripts: the modules at the top of lora/ that define main()."""
    return {_name(p) for p in LORA.glob("*.py")
            if _defines_main(ast.parse(p.read_text(encoding="utf-8")))}


def _packages() -> list[Path]:
    return sorted(p.parent for p in LORA.glob("*/__init__.py"))


def _imports(tree: ast.AST, me: str) -> list[tuple[ast.stmt, str]]:
    """(node, lora module) for every import of this package anywhere in a tree; ``from lora import
    x`` names lora.x, and a relative import is resolved against ``me``."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = me.split(".")[:-node.level]
                mod = ".".join(base + ([mod] if mod else []))
            if mod == "lora":
                out += [(node, f"lora.{a.name}") for a in node.names]
            elif mod.startswith("lora."):
                out.append((node, mod))
        elif isinstance(node, ast.Import):
            out += [(node, a.name) for a in node.names if a.name.startswith("lora.")]
    return out


def _stage(module: str) -> str:
    """lora.training.step -> lora.training; lora.config -> lora.config."""
    return ".".join(module.split(".")[:2])


def _declared_imports(doc: str) -> set[str]:
    """The stages a module group may import, from the 'Imports:' line of its docstring."""
    m = re.search(r"^Imports: (.*?)\.?$(?:\n(?!\n)(.*?)\.?$)?", doc or "", flags=re.M)
    assert m, "no 'Imports:' line"
    text = " ".join(g for g in m.groups() if g)
    return set() if "nothing of lora" in text else {s.strip() for s in text.split(",")}


def test_top_of_lora_holds_the_scripts_and_the_plans_modules_only():
    top = {p.stem for p in LORA.glob("*.py")} - {"__init__"}
    others = top - {s.split('.')[1] for s in _scripts()} - PLAN_MODULES - {BOOTSTRAP}
    assert not others, (f"lora/ holds {sorted(others)}, which are neither scripts (a main()) nor "
                        f"the plan's config.py / dataset.py: move library code into the package of "
                        f"its stage")
    assert {"train_lora", "prepare_data", "inference_lora", "evaluate", "test_dataset",
            "test_model", "export_model", "app"} <= {s.split(".")[1] for s in _scripts()}


def test_every_package_says_what_it_owns_and_what_it_may_import():
    for pkg in _packages():
        doc = ast.get_docstring(ast.parse((pkg / "__init__.py").read_text(encoding="utf-8"))) or ""
        assert len(doc.split()) > 20, f"{pkg.name}/__init__.py: say in its docstring what the package owns"
        allowed = _declared_imports(doc)
        unknown = {a for a in allowed if not (LORA / a.split(".", 1)[1]).exists()
                   and not (LORA / (a.split(".", 1)[1] + ".py")).exists()}
        assert not unknown, f"{pkg.name}/__init__.py declares unknown stages {sorted(unknown)}"


def test_each_stage_imports_only_what_it_declares():
    """A package imports only the stages its __init__ lists; config.py and dataset.py only the ones
    their own docstrings list; the scripts (on top) anything but another script."""
    trees = _library()
    declared = {}
    for name, tree in trees.items():
        parts = name.split(".")
        if len(parts) == 2 and (LORA / parts[1]).is_dir() or (len(parts) == 2
                                                              and parts[1] in PLAN_MODULES):
            declared[name] = _declared_imports(ast.get_docstring(tree))
    bad = []
    for name, tree in trees.items():
        rules = declared.get(_stage(name))
        if rules is None:
            continue
        for node, mod in _imports(tree, name):
            target = _stage(mod)
            if target != _stage(name) and target not in rules:
                bad.append(f"{name}:{node.lineno} imports {mod} ({_stage(name)} may import "
                           f"{sorted(rules)})")
    assert not bad, "imports across stages that the stage does not declare:\n" + "\n".join(bad)


def test_the_library_never_imports_a_script():
    scripts = _scripts()
    bad = [f"{name}:{node.lineno} imports {mod}" for name, tree in _library().items()
           for node, mod in _imports(tree, name) if mod in scripts and mod != name]
    assert not bad, "a lora module (or script) imports a script:\n" + "\n".join(bad)


def test_no_function_or_module_is_too_long():
    too_long = []
    for path in sorted(LORA.rglob("*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        if len(lines) > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(ROOT)} has {len(lines)} lines (limit {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}() is {n} lines "
                                    f"(limit {MAX_FUNCTION_LINES})")
    assert not too_long, "split these into named steps or modules:\n" + "\n".join(too_long)


def test_no_import_cycle_and_library_imports_at_the_top():
    trees = _library()
    graph, inner = {}, []
    for name, tree in trees.items():
        graph[name] = {mod for _, mod in _imports(tree, name) if mod in trees} - {name}
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner += [f"{name}:{n.lineno} in {node.name}()" for n, _ in _imports(node, name)]
    assert not inner, "imports of this package go at the top of the module:\n" + "\n".join(inner)
    state: dict[str, int] = {}

    def visit(u, path):
        state[u] = 1
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path + [v]))
            if v not in state:
                visit(v, path + [v])
        state[u] = 2

    for u in sorted(graph):
        if u not in state:
            visit(u, [u])


def _family_files() -> set[Path]:
    """The model family modules (lora.modeling.loading.FAMILIES), and the modules only they
    import."""
    from lora.modeling.loading import FAMILIES

    family = {_name(Path(m.__file__)) for m in FAMILIES.values()}
    trees = _library()
    importers: dict[str, set[str]] = {}
    for name, tree in trees.items():
        for _, mod in _imports(tree, name):
            importers.setdefault(mod, set()).add(name)
    own = {m for m, who in importers.items() if m in trees and who <= family}
    return {ROOT / (m.replace(".", "/") + ".py") for m in family | own}


def test_musicgen_internals_only_in_the_family_modules():
    family = _family_files()
    # the family's decoding step is found as its own
    assert any(p.name == "fast_decode.py" for p in family)
    found = []
    for path in sorted([*LORA.rglob("*.py"), *BENCH.glob("*.py")]):
        if path in family:
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            found += [f"{path.relative_to(ROOT)}:{i}: {w!r}: {line.strip()}" for w in INTERNALS
                      if w in line]
    assert not found, ("MusicGen's internals belong in the family modules of lora/modeling (reach "
                       "them through lora.modeling.loading.family_for(...)):\n" + "\n".join(found))


def test_bench_takes_only_main_from_a_script():
    scripts = _scripts()
    bad = []
    for path in sorted(BENCH.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases = {}
        for node, mod in _imports(tree, "bench"):
            if mod not in scripts:
                continue
            names = [a.name for a in node.names] if node.module != "lora" else []
            if names and names != ["main"]:
                bad.append(f"bench/{path.name}:{node.lineno} takes {names} from {mod}")
            if node.module == "lora":  # `from lora import train_lora`: only .main may be used
                aliases |= {a.asname or a.name: mod for a in node.names if f"lora.{a.name}" == mod}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value,
                                                              ast.Name) and node.value.id in aliases \
                    and node.attr != "main":
                bad.append(f"bench/{path.name}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not bad, "bench/ may run a script's main() but take nothing else from it:\n" + "\n".join(bad)


def test_a_family_module_provides_what_the_toolkit_calls():
    """Every fam.<name> the toolkit calls through family_for exists in each registered family
    module, so a new family (a sibling module) knows the interface it must provide."""
    from lora.modeling.loading import FAMILIES

    used = set()
    for path in [*LORA.rglob("*.py"), *BENCH.glob("*.py")]:
        used |= set(re.findall(r"\bfam\.([A-Za-z_]\w*)", path.read_text(encoding="utf-8")))
    assert len(used) > 20  # the scan found the calls
    # What only melody-conditioned families provide (the toolkit calls it where ``fam.MELODY`` is
    # true).
    melody_only = {n for m in FAMILIES.values() if m.MELODY for n in m.MELODY_INTERFACE}
    for model_type, module in FAMILIES.items():
        need = used if module.MELODY else used - melody_only
        missing = sorted(n for n in need if not hasattr(module, n))
        assert not missing, f"family {model_type} ({module.__name__}) lacks {missing}"


def _uses_own_file(path: Path) -> bool:
    """Whether a test file finds folders from its own location (``Path(__file__)``...), which
    changes when the file moves."""
    return any(isinstance(n, ast.Call) and any(isinstance(a, ast.Name) and a.id == "__file__"
                                               for a in n.args)
               for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))))


def test_tests_mirror_the_packages_and_a_bare_pytest_collects_tests_only():
    """tests/<package>/ for each package of lora/ (and no other folder); at the top of tests/ only
    tests/test_<script>.py for a script of lora/ (read from lora/: the modules that define main())
    and the project's own test files; test file names unique across folders (pytest's default
    import mode, no __init__.py); the repository found through tests.helpers.ROOT. pytest's
    testpaths is tests/, so the diagnostics lora/test_dataset.py and lora/test_model.py are never
    collected by a bare `pytest`."""
    packages = {p.name for p in _packages()}
    folders = {p.name for p in TESTS.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))}
    assert folders - packages == set(), f"tests/ folders that mirror no package: {sorted(folders - packages)}"
    assert packages - folders == set(), f"packages without a tests/ folder: {sorted(packages - folders)}"
    scripts = [f"test_{s.split('.')[1]}" for s in _scripts()]
    stray = {p.name for p in TESTS.glob("test_*.py") if p.name not in PROJECT_TESTS
             and not any(p.stem == s or p.stem.startswith(s + "_") for s in scripts)}
    assert not stray, (f"tests/{sorted(stray)} test no script of lora/: put the tests of a module in "
                       f"tests/<package>/test_<module>.py, a script's end-to-end tests in "
                       f"tests/test_<script>.py (or tests/test_<script>_<topic>.py)")
    files = sorted(TESTS.rglob("test_*.py"))
    names = [p.name for p in files]
    same = sorted({n for n in names if names.count(n) > 1})
    assert not same, f"test files with the same name: {same}"
    assert not list(TESTS.rglob("__init__.py")), "tests/ holds no __init__.py (pytest's default import mode)"
    own_root = [str(p.relative_to(ROOT)) for p in files if _uses_own_file(p)]
    assert not own_root, f"{own_root}: find the repository with `from tests.helpers import ROOT`"
    section = (ROOT / "pyproject.toml").read_text(encoding="utf-8").split("[tool.pytest.ini_options]")[1]
    assert re.search(r'^testpaths = \["tests"\]$', section.split("\n[")[0], flags=re.M)
