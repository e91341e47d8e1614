"""How a setting of the schema (lora/config.py) is declared, typed, range-checked and read: the
field helper, the value coercion of YAML and flag values, the YAML file reader and the flag parser's
error handling. Generic: the schema itself (the sections, their defaults and ranges) lives in
lora/config.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Callable, Optional

from lora.common.cli import UserError, clip_text, log


class ConfigError(UserError):
    """A user mistake in config.yaml or on the command line. The message names the key and the
    fix."""


# What the YAML reader accepts (a value is echoed in a message cut to a sane length: clip_text)
MAX_CONFIG_BYTES = 1_000_000   # a config file; config.yaml is ~10 KB
MAX_VALUE_CHARS = 10_000       # one text value (a path, a caption, a prompt)
MAX_LIST_ITEMS = 10_000        # one list value (prompts, adapters)


def _f(default, help: str, *, aliases=(), kind: str | None = None, choices=None, ge=None, gt=None,
       le=None, lt=None, also=(), hint: str = "", many: bool = False):
    """A schema field. ``kind`` is "path" (a file or folder) or "model" (a path, hub id or
    built-in). Its allowed values are declared here, once: ``choices``, or a range (``ge`` >=,
    ``gt`` >, ``le`` <=, ``lt`` <) plus single values ``also`` allowed outside it (e.g. -1 = off);
    ``hint`` is the rule of thumb an error message adds. null (None) is always allowed for an
    Optional field. ``many``: the field also takes a list of such values (a YAML list; several
    values after the flag); a single value stays a plain value."""
    md = {"help": help, "aliases": tuple(aliases), "kind": kind, "choices": choices, "ge": ge,
          "gt": gt, "le": le, "lt": lt, "also": tuple(also), "hint": hint, "many": many}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=md)
    return field(default=default, metadata=md)


def _base_type(tp):
    """(base type, optional?) for Optional[X] / X."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _type_name(tp) -> str:
    base, opt = _base_type(tp)
    name = {bool: "true/false", int: "integer", float: "number", str: "text",
            list: "list of text"}.get(base, str(base))
    return name + (" or null" if opt else "")


def _coerce(section: str, name: str, value, tp, meta, source: str):
    """Check and convert one value from YAML; raise ConfigError naming the key."""
    if meta.get("many") and isinstance(value, list) and len(value) <= MAX_LIST_ITEMS:
        if not value:
            raise ConfigError(f"{section}.{name}" + (f" in {source}" if source else "")
                              + ": the list is empty; "
                              "give one value or a list of values, or delete the line to use the "
                              "default.")
        return [_coerce(section, f"{name}[{i}]", v, tp, meta, source) for i, v in enumerate(value)]
    base, optional = _base_type(tp)
    where = f"{section}.{name}" + (f" in {source}" if source else "")
    shown = repr(clip_text(value, 100)) if isinstance(value, str) else clip_text(value, 100)
    bad = ConfigError(f"{where}: expected {_type_name(tp)}, got {shown}. Fix the value or delete the "
                      f"line to use the default.")
    if isinstance(value, str) and len(value) > MAX_VALUE_CHARS:
        raise ConfigError(f"{where}: the text is {len(value):,} characters long, more than "
                          f"{MAX_VALUE_CHARS:,} ({clip_text(value, 60)}). Fix the value.")
    if isinstance(value, list) and len(value) > MAX_LIST_ITEMS:
        raise ConfigError(f"{where}: the list has {len(value):,} items, more than "
                          f"{MAX_LIST_ITEMS:,}. Put long lists of prompts in a prompts_file.")
    if value is None:
        if optional:
            return None
        raise bad
    if base is bool:
        if isinstance(value, bool):
            out = value
        else:
            raise bad
    elif base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise bad
        out = value
    elif base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:
                    value = float(value)  # YAML reads "3e-4" as a string
                except ValueError:
                    raise bad from None
            else:
                raise bad
        out = float(value)
    elif base is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise bad
        out = value
    elif base is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad
        out = list(value)
    else:  # pragma: no cover - schema uses only the types above
        out = value
    _check_choice(where, out, meta)
    return out


def _num(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def range_text(meta) -> str:
    """The allowed values of a field in words: 'at least 1', '>= 1', 'in [0, 1)', '> 0 and at most
    3600', ...; '' when the field declares no range."""
    ge, gt, le, lt = meta.get("ge"), meta.get("gt"), meta.get("le"), meta.get("lt")
    if ge is not None and (le is not None or lt is not None):
        text = f"in [{_num(ge)}, {_num(le if le is not None else lt)}{']' if le is not None else ')'}"
    else:
        lower = (f"at least {ge}" if isinstance(ge, int) else f">= {_num(ge)}") if ge is not None else \
            (f"> {_num(gt)}" if gt is not None else "")
        upper = f"at most {_num(le)}" if le is not None else (f"< {_num(lt)}" if lt is not None else "")
        text = " and ".join(t for t in (lower, upper) if t)
    if text and meta.get("also"):
        text += "".join(f", or {_num(v)}" for v in meta["also"])
    return text


def value_problem(meta, value, label: str) -> Optional[str]:
    """The problem with one value of a field (its declared range), in the user's words naming
    ``label``; None when the value is allowed."""
    import math

    if value is None or isinstance(value, bool) or not isinstance(value,
                                                                  (int, float)) or not range_text(meta):
        return None
    if value in meta.get("also", ()):
        return None
    ok = math.isfinite(value)
    for key, test in (("ge", lambda b: value >= b), ("gt", lambda b: value > b),
                      ("le", lambda b: value <= b), ("lt", lambda b: value < b)):
        if meta.get(key) is not None and ok:
            ok = test(meta[key])
    if ok:
        return None
    hint = meta.get("hint")
    text = range_text(meta)
    ge, le = meta.get("ge"), meta.get("le")
    if isinstance(ge, int) and isinstance(le, int) and math.isfinite(value):  # the side it crossed
        text = (f"at least {ge}" if value < ge else f"at most {le}") \
            + "".join(f", or {_num(v)}" for v in meta.get("also", ()))
    return f"{label} must be {text} (got {_num(value)})" + (f"; {hint}" if hint else "")


def _check_choice(where: str, value, meta):
    choices = meta.get("choices")
    if choices is not None and value is not None and value not in choices:
        raise ConfigError(f"{where}: {clip_text(value, 100)!r} is not allowed; choose one of "
                          f"{', '.join(map(str, choices))}.")


def _unknown_key_error(kind: str, key: str, allowed, where: str) -> ConfigError:
    import difflib

    close = difflib.get_close_matches(key, list(allowed), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"Unknown {kind} '{key}'{where}.{hint} Allowed: {', '.join(sorted(allowed))}.")


def _unique_mapping(loader, node, deep=False):
    """A YAML mapping whose keys are unique: a key (or section) given twice is refused, naming it
    and both lines (PyYAML would keep the last one without a word)."""
    import yaml

    loader.flatten_mapping(node)
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            first = seen.get(key)
        except TypeError:  # (an unhashable key: the constructor below says what is wrong)
            break
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"'{clip_text(str(key), 80)}' is given twice (first on line {first}); "
                f"keep one: a repeated key or section would silently replace the first",
                key_node.start_mark)
        seen[key] = key_node.start_mark.line + 1
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


def _unique_key_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)
    return Loader
def resolve_path(value: Optional[str], kind: Optional[str], base: Path, builtins=()) -> Optional[str]:
    """A setting's value as a path relative to ``base`` by its ``kind``: "path" always; "model" unless
    it is a built-in name or a hub id (org/name that is not an existing relative path);
    "name_or_path" (e.g. htdemucs) only when it exists or looks like a path."""
    if value is None or kind is None or value == "":
        return value
    expanded = os.path.expanduser(value)
    if kind == "model":
        if value in builtins:
            return value
        p = Path(expanded)
        if p.is_absolute():
            return str(p)
        candidate = (base / p)
        # A hub id looks like "org/name"; a relative path that exists wins over it.
        if candidate.exists() or value.startswith((".", "~")) or value.count("/") != 1:
            return os.path.normpath(candidate)
        return value
    if kind == "name_or_path":
        candidate = Path(expanded) if Path(expanded).is_absolute() else base / expanded
        if candidate.exists() or value.startswith((".", "~", "/")) or value.count("/") > 1:
            return os.path.normpath(candidate)
        return value
    p = Path(expanded)
    return os.path.normpath(p if p.is_absolute() else (base / p))


def load_yaml(path: str | os.PathLike) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"Config file not found: {p}. Pass --config PATH to an existing YAML "
                          f"file, or run from the repository that holds config.yaml.")
    size = p.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{p} is {size:,} bytes, more than a config file holds (at most "
                          f"{MAX_CONFIG_BYTES:,}): is it the right file? Pass --config PATH to "
                          f"your YAML config.")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(f"{p} is not UTF-8 text: byte {raw[e.start:e.start + 1]!r} on line "
                          f"{line} (a character saved in another encoding, e.g. Latin-1, even in a "
                          f"comment). Save the file as UTF-8 (your editor's encoding setting) and "
                          f"run again.") from None
    try:
        data = yaml.load(text, Loader=_unique_key_loader()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p} is not valid YAML: {clip_text(str(e), 500)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be sections (model:, lora:, data:, ...), got "
                          f"{type(data).__name__}.")
    return data


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    # argparse's default prints usage and exits 2; we raise with the message
    def error(self, message):
        if "unrecognized arguments" in message:
            import difflib

            known = [o for a in self._actions for o in a.option_strings]
            hints = []
            for tok in message.split(":", 1)[1].split():
                if tok.startswith("--"):
                    close = difflib.get_close_matches(tok.split("=")[0], known, n=1)
                    if close:
                        hints.append(f"did you mean {close[0]} (for {tok})?")
            message += (" (" + "; ".join(hints) + ")" if hints else "") + \
                ". Run with --help to list the flags this script accepts."
        raise ConfigError(message)


def _parse_bool(name):
    def conv(s: str) -> bool:
        t = s.strip().lower()
        if t in ("1", "true", "yes", "y", "on"):
            return True
        if t in ("0", "false", "no", "n", "off"):
            return False
        raise argparse.ArgumentTypeError(f"--{name} takes true or false, got {s!r}")
    return conv


def _argtype(name, base, optional):
    def conv(s: str):
        if optional and s.strip().lower() in ("none", "null", ""):
            return None
        try:
            return base(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--{name} takes {_type_name(base)}, got {s!r}") from None
    return conv


def _refuse_repeated_flags(parser: argparse.ArgumentParser, argv: list) -> None:
    """A flag given twice (or under two of its names) would silently keep the last value: refuse it.
    A list flag (--prompts) given twice keeps all the values, and says so."""
    by_flag = {o: a for a in parser._actions for o in a.option_strings}
    seen: dict[str, str] = {}
    for tok in map(str, argv):
        if tok == "--":
            break
        action = by_flag.get(tok.split("=", 1)[0]) if tok.startswith("--") else None
        if action is None or not action.option_strings:
            continue
        name = tok.split("=", 1)[0]
        if action.dest in seen and isinstance(action, argparse._ExtendAction):
            log.info("%s was given more than once: all of its values are used", name)
            continue
        if action.dest in seen:
            first = seen[action.dest]
            also = "" if first == name else f" (as {first} and {name})"
            raise ConfigError(f"{name} was given twice{also}; give it once.")
        seen[action.dest] = name


def apply_yaml(cfg, sections: dict[str, type], data: dict, source: str, resolve: Callable) -> None:
    """Validate a YAML mapping against the schema (``sections``: name -> section dataclass) and
    write its values into cfg (an object with one attribute per section); ``resolve(value, kind)``
    turns a path-like value into a path."""
    for section, values in data.items():
        if section not in sections:
            raise _unknown_key_error("section", str(section), sections, f" in {source}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{section} in {source}: expected a mapping of keys, got "
                              f"{clip_text(values, 100)}.")
        obj = getattr(cfg, section)
        hints = typing.get_type_hints(type(obj))
        fields = {f.name: f for f in dataclasses.fields(obj)}
        for key, value in values.items():
            if key not in fields:
                home = [name for name, cls in sections.items()
                        if key in {f.name for f in dataclasses.fields(cls)}]
                if home:
                    raise ConfigError(f"'{key}' is a key of section '{home[0]}', not of "
                                      f"'{section}' (in {source}): move it under '{home[0]}:'.")
                raise _unknown_key_error("key", f"{section}.{key}",
                                         [f"{section}.{k}" for k in fields], f" in {source}")
            md = fields[key].metadata
            v = _coerce(section, key, value, hints[key], md, source)
            if isinstance(v, str):
                v = resolve(v, md.get("kind"))
            elif isinstance(v, list) and md.get("many"):
                v = [resolve(x, md.get("kind")) if isinstance(x, str) else x for x in v]
            setattr(obj, key, v)


def build_parser(description: str, sections: dict[str, type], extra=None,
                 config_help: str = "YAML config file"
                 ) -> tuple[argparse.ArgumentParser, dict]:
    """An argparse parser whose flags come from the fields of ``sections`` (name -> section
    dataclass).

    When two listed sections have a field of the same name, the first section listed owns the flag.
    Returns the parser and a map dest -> (section, field name).
    """
    p = _Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                allow_abbrev=False)
    p.add_argument("--config", default=None,
                   help=config_help)
    owners: dict[str, tuple[str, str]] = {}
    taken: set[str] = {"config"}
    for section, cls in sections.items():
        hints = typing.get_type_hints(cls)
        group = p.add_argument_group(f"{section} (config.yaml section '{section}:')")
        for f in dataclasses.fields(cls):
            names = [f.name, *f.metadata.get("aliases", ())]
            names = [n for n in names if n not in taken]
            if f.name not in names:
                continue  # owned by an earlier section
            taken.update(names)
            dest = f"{section}__{f.name}"
            owners[dest] = (section, f.name)
            base, optional = _base_type(hints[f.name])
            flags = [f"--{n}" for n in names]
            kw: dict[str, Any] = dict(dest=dest, default=argparse.SUPPRESS,
                                      help=f.metadata.get("help", "").replace("%", "%%"))
            if base is bool:
                kw.update(nargs="?", const=True, type=_parse_bool(f.name), metavar="BOOL")
            elif base is list:
                # given twice: both lists are used
                kw.update(nargs="+", metavar="TEXT", action="extend")
            else:
                kw.update(type=_argtype(f.name, base, optional))
                if f.metadata.get("many"):
                    # one value or several (given twice: refused, like any other flag)
                    kw["nargs"] = "+"
                kw["metavar"] = {int: "N", float: "X"}.get(base, "PATH" if f.metadata.get("kind")
                                                           else "TEXT")
                if f.metadata.get("choices"):
                    kw["metavar"] = "{" + ",".join(map(str, f.metadata["choices"])) + "}"
            group.add_argument(*flags, **kw)
    if extra is not None:
        extra(p)
    return p, owners


def markdown_reference(sections: dict[str, type]) -> str:
    """Every key and flag of ``sections`` as Markdown tables (USAGE.md embeds the schema's; a test
    keeps it in step)."""
    out = []
    for name, cls in sections.items():
        out.append(f"#### `{name}:`\n")
        out.append("| key / flag | default | meaning |")
        out.append("| --- | --- | --- |")
        defaults = cls()
        for f in dataclasses.fields(cls):
            flags = " ".join(f"`--{n}`" for n in (f.name, *f.metadata.get("aliases", ())))
            d = getattr(defaults, f.name)
            d = "null" if d is None else ("[]" if d == [] else str(d).lower() if isinstance(d, bool)
                                          else d)
            helptext = f.metadata.get("help", "").replace("|", "\\|")
            if f.metadata.get("choices"):
                helptext += " (" + " \\| ".join(map(str, f.metadata["choices"])) + ")"
            if range_text(f.metadata):
                helptext += f" (range: {range_text(f.metadata)})"
            out.append(f"| {flags} | `{d}` | {helptext} |")
        out.append("")
    return "\n".join(out)


def replace_section(path: Path, name: str, text: str) -> None:
    """Rewrite what lies between ``<!-- name:start -->`` and ``<!-- name:end -->`` in a Markdown
    file (USAGE.md's generated reference)."""
    import re

    doc = Path(path).read_text(encoding="utf-8")
    new = re.sub(rf"<!-- {name}:start -->.*<!-- {name}:end -->",
                 lambda m: f"<!-- {name}:start -->\n{text}\n<!-- {name}:end -->", doc, flags=re.S)
    Path(path).write_text(new, encoding="utf-8")


def parse_into(cfg, sections: dict, argv, parser: argparse.ArgumentParser, owners: dict,
               default_config: Path, defaults_base: Path,
               resolve: Callable[[Optional[str], Optional[str], Path], Optional[str]]) -> argparse.Namespace:
    """Write defaults < YAML < flags into ``cfg`` (its ``sections``: name -> dataclass): defaults'
    paths relative to ``defaults_base``, a YAML file's relative to its folder (``--config``, else
    ``default_config`` when it exists; recorded in ``cfg.config_file``), flags' relative to the
    current directory; ``resolve(value, kind, base)`` makes a setting's value a path by its kind.
    Returns the namespace of the arguments that are not settings (``owners``: flag dest -> (section,
    name), from build_parser)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _refuse_repeated_flags(parser, argv)
    ns = parser.parse_args(argv)
    for section in sections:
        obj = getattr(cfg, section)
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if isinstance(v, str):
                setattr(obj, f.name, resolve(v, f.metadata.get("kind"), defaults_base))
    cfg_path = ns.config
    if cfg_path is None and default_config.is_file():
        cfg_path = str(default_config)
    if cfg_path is not None:
        path = Path(cfg_path).expanduser().resolve()
        apply_yaml(cfg, sections, load_yaml(path), str(path), lambda v, kind: resolve(v, kind, path.parent))
        cfg.config_file = str(path)
    cwd = Path.cwd()
    for dest, (section, name) in owners.items():
        if not hasattr(ns, dest):
            continue
        value = getattr(ns, dest)
        delattr(ns, dest)
        obj = getattr(cfg, section)
        md = next(f.metadata for f in dataclasses.fields(obj) if f.name == name)
        if md.get("many") and isinstance(value, list):
            value = [resolve(v, md.get("kind"), cwd) if isinstance(v, str) else v for v in value]
            value = value[0] if len(value) == 1 else value
        _check_choice(f"--{name}", value, md)
        if isinstance(value, str):
            value = resolve(value, md.get("kind"), cwd)
        setattr(obj, name, value)
    return ns
