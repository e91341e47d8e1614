"""The shape of lora/: one module per concern, the model family's internals in one place, short functions, no
script imported by a module, no import cycle. These are read from the source (ast), so they hold for every file,
including ones added later."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LORA = ROOT / "lora"
BENCH = ROOT / "bench"
SCRIPTS = {"prepare_data", "train_lora", "inference_lora", "evaluate", "test_dataset", "test_model", "export_model"}
FAMILY_MODULES = {"musicgen.py", "musicgen_melody.py", "fast_decode.py"}  # the model families, the decoding step
# Names of MusicGen's internals that only the family module may spell out.
INTERNALS = ("enc_to_dec_proj", ".decoder.model.decoder", "encoder_outputs=", "audio_encoder.", "text_encoder(")
MAX_LINES = 100
MAX_LOOP_LINES = 150  # the training loop's function (train_lora.train_loop) reads top to bottom
LOOP = ("train_lora.py", "train_loop")


def _modules(folder: Path) -> dict[str, ast.Module]:
    return {p.name: ast.parse(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.py"))}


def _lora_imports(tree: ast.Module) -> list[tuple[ast.stmt, str, list[str]]]:
    """(node, lora module imported, names taken from it) for every import of this package anywhere in a file."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 1:
                mod = f"lora.{mod}" if mod else "lora"
            if mod == "lora":
                out += [(node, f"lora.{a.name}", []) for a in node.names]
            elif mod.startswith("lora."):
                out.append((node, mod, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(node, a.name, []) for a in node.names if a.name.startswith("lora.")]
    return out


def test_no_function_is_too_long():
    too_long = []
    for name, tree in _modules(LORA).items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                limit = MAX_LOOP_LINES if (name, node.name) == LOOP else MAX_LINES
                if n > limit:
                    too_long.append(f"lora/{name}:{node.lineno} {node.name}() is {n} lines (limit {limit})")
    assert not too_long, "split these functions into named steps:\n" + "\n".join(too_long)


def test_musicgen_internals_only_in_the_family_module():
    found = []
    for folder in (LORA, BENCH):
        for path in sorted(folder.glob("*.py")):
            if folder == LORA and path.name in FAMILY_MODULES:
                continue
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                for word in INTERNALS:
                    if word in line:
                        found.append(f"{path.relative_to(ROOT)}:{i}: {word!r}: {line.strip()}")
    assert not found, ("MusicGen's internals belong in lora/musicgen.py (reach them through "
                       "lora.loading.family_for(...)):\n" + "\n".join(found))


def test_modules_never_import_a_script():
    bad = []
    for name, tree in _modules(LORA).items():
        for node, mod, _ in _lora_imports(tree):
            target = mod.split(".")[1]
            if target in SCRIPTS and target != name[:-3]:
                bad.append(f"lora/{name}:{node.lineno} imports {mod}")
    assert not bad, "a lora/ module (or script) imports a task script:\n" + "\n".join(bad)


def test_bench_takes_only_main_from_a_script():
    bad = []
    for name, tree in _modules(BENCH).items():
        aliases = {}
        for node, mod, names in _lora_imports(tree):
            target = mod.split(".")[1]
            if target not in SCRIPTS:
                continue
            if names and names != ["main"]:
                bad.append(f"bench/{name}:{node.lineno} takes {names} from {mod}")
            if not names:  # `from lora import train_lora`: only .main may be used
                for a in node.names:
                    if f"lora.{a.name}" == mod:
                        aliases[a.asname or a.name] = mod
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                    and node.attr != "main":
                bad.append(f"bench/{name}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not bad, "bench/ may run a script's main() but take nothing else from it:\n" + "\n".join(bad)


def test_no_import_cycle_and_package_imports_at_the_top():
    graph, inner = {}, []
    for name, tree in _modules(LORA).items():
        me = name[:-3]
        graph[me] = {mod.split(".")[1] for _, mod, _ in _lora_imports(tree)} - {me}
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner += [f"lora/{name}:{n.lineno} in {node.name}()" for n, _, _ in _lora_imports(node)]
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


def test_a_family_module_provides_what_the_toolkit_calls():
    """Every fam.<name> the toolkit calls through lora.loading.family_for exists in each registered family module,
    so a new family (a sibling module) knows the interface it must provide."""
    from lora.loading import FAMILIES

    used = set()
    for folder in (LORA, BENCH):
        for path in folder.glob("*.py"):
            used |= set(re.findall(r"\bfam\.([A-Za-z_]\w*)", path.read_text(encoding="utf-8")))
    assert len(used) > 20  # the scan found the calls
    # What only melody-conditioned families provide (the toolkit calls it where ``fam.MELODY`` is true).
    melody_only = {n for m in FAMILIES.values() if m.MELODY for n in m.MELODY_INTERFACE}
    for model_type, module in FAMILIES.items():
        need = used if module.MELODY else used - melody_only
        missing = sorted(n for n in need if not hasattr(module, n))
        assert not missing, f"family {model_type} ({module.__name__}) lacks {missing}"
