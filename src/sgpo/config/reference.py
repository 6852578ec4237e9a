"""The configuration reference, from the dataclasses themselves: every key's type, default, allowed values and the
documentation string under its field in ``schema.py``. ``sgpo config [SECTION]`` prints it; ``docs/config.md`` is
written from it (``python -m sgpo.config.reference > docs/config.md``) and a test keeps the two equal."""
from __future__ import annotations

import ast
import dataclasses
import inspect
import json
from dataclasses import dataclass

from sgpo.config import schema as config


@dataclass(frozen=True)
class Key:
    name: str      # dotted: dpo.beta
    type: str
    default: object
    doc: str
    allowed: str   # choices or bounds, "" when any value of the type goes


def _field_docs() -> dict[str, dict[str, str]]:
    """{class name: {field: the string literal that follows it}} from ``schema.py``'s source (a field a section
    inherits has its documentation under the class that declares it)."""
    tree = ast.parse(inspect.getsource(config))
    docs: dict[str, dict[str, str]] = {}
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        body, found = cls.body, {}
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                found[a.target.id] = " ".join(str(b.value.value).split())
        docs[cls.name] = found
    return docs


def _allowed(key: str) -> str:
    if key in config.CHOICES:
        return " | ".join(config.CHOICES[key])
    if key in config.AT_LEAST:
        return f"≥ {config.AT_LEAST[key]}"
    if key in config.IN_RANGE:
        low, high = config.IN_RANGE[key]
        return f"> {low}" if high == float("inf") else f"{low} … {high}"
    return ""


def keys(cls=config.Config, prefix: str = "", docs: dict | None = None) -> list[Key]:
    """Every key of ``cls`` (nested sections flattened, in declaration order)."""
    docs = _field_docs() if docs is None else docs
    hints, default = config.typing.get_type_hints(cls), cls()
    out = []
    for f in dataclasses.fields(cls):
        name, typ = prefix + f.name, hints[f.name]
        if dataclasses.is_dataclass(typ):
            out += keys(typ, name + ".", docs)
            continue
        doc = next((docs[c.__name__][f.name] for c in cls.__mro__ if f.name in docs.get(c.__name__, {})), "")
        out.append(Key(name, getattr(typ, "__name__", str(typ)), getattr(default, f.name), doc, _allowed(name)))
    return out


def sections() -> list[str]:
    """The top-level sections (``model``, ``data`` …); top-level keys are the section ``""``."""
    return [f.name for f in dataclasses.fields(config.Config) if dataclasses.is_dataclass(f.type)
            or dataclasses.is_dataclass(config.typing.get_type_hints(config.Config)[f.name])]


def _value(v) -> str:
    return json.dumps(v, ensure_ascii=False) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)


def text(section: str | None = None) -> str:
    """The reference as plain text (``sgpo config``): one block per key, of one section when ``section`` is given."""
    chosen = [k for k in keys() if section is None or k.name.startswith(section + ".")
              or (section == "" and "." not in k.name)]
    if not chosen:
        raise config.ConfigError(f"no config section '{section}' (sections: {', '.join(sections())})")
    lines = []
    for k in chosen:
        lines.append(f"{k.name}: {k.type} = {_value(k.default)}" + (f"   [{k.allowed}]" if k.allowed else ""))
        lines += [f"    {k.doc}", ""]
    return "\n".join(lines).rstrip() + "\n"


def markdown() -> str:
    """``docs/config.md``: a table per section."""
    out = ["# Configuration reference", "",
           "Every key of a run's YAML config (or `--set key=value`), with its type, default and allowed values.",
           "Generated from `src/sgpo/config/schema.py` by `python -m sgpo.config.reference > docs/config.md`; `sgpo config "
           "[SECTION]` prints the same in a terminal. A test fails when this file is out of date.", ""]
    groups: dict[str, list[Key]] = {}
    for k in keys():
        groups.setdefault(k.name.split(".")[0] if "." in k.name else "", []).append(k)
    for section, ks in groups.items():
        out += [f"## {section or 'top level'}", "", "| key | type | default | allowed | description |",
                "|---|---|---|---|---|"]
        out += [f"| `{k.name}` | {k.type} | `{_value(k.default)}` | {k.allowed.replace('|', 'or')} | "
                f"{k.doc.replace('|', '/')} |" for k in ks]
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown(), end="")
