"""The documentation names what exists: every repository path a doc or a source file names, every stage directory a
run writes in the run-directory listings, and the README's account of how the paper configs differ.

Which names are checked (``repository_paths``), in README.md, docs/*.md, every file under src/, configs/, benchmarks/
and scripts/ (the whole text: docstrings, comments, help and messages alike):

1. A path that starts with a top-level folder of the repository — ``src/``, ``configs/``, ``docs/``, ``benchmarks/``,
   ``tests/``, ``scripts/`` — or with the package folder ``sgpo/`` (read as ``src/sgpo/``), where it is not the tail of
   a longer path (no letter, digit, ``.``, ``/``, ``-``, ``_``, ``~`` or ``:`` just before it). It ends at the first
   character that cannot be in a path (a space, a backtick, a quote, ``)``, ``:`` of ``tests/x.py::test``); a trailing
   ``.``, ``,`` or ``;`` is punctuation. A path followed by a placeholder (``<``, ``{``, ``*``, ``[``, ``…``), e.g.
   ``src/sgpo/methods/<name>.py``, is checked up to its last ``/``.
2. In the Markdown files, a link target that is not a URL, resolved from the file's folder (``#anchor`` dropped).
3. A document cited by a bare upper-case name (``README.md``, ``SGPO.md``: capitals, digits, ``_`` or ``-``, then
   ``.md``): a file of that name at the repository root.

Not checked, because they are not files of the repository: run-directory paths (``RUN/...``, ``runs/...``,
``OUTPUT/...``), the user's own paths (``data/my.jsonl``, ``my.yaml``), the files a run or a command writes
(``report.md``, ``config.yaml``, ``comparison.md``) and cache paths (``~/.cache/sgpo/...``).
"""
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TOP = ("src", "configs", "docs", "benchmarks", "tests", "scripts")
PATH = re.compile(r"(?<![\w./~:-])((?:%s|sgpo)/[\w./-]*)" % "|".join(TOP))
PLACEHOLDER = "<{*[…"
LINK = re.compile(r"\]\(([^)\s]+)\)")
UPPER_DOC = re.compile(r"(?<![\w./-])([A-Z][A-Z0-9_-]*\.md)\b")


def scanned() -> list[Path]:
    files = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    for folder in ("src", "configs", "benchmarks", "scripts"):
        files += sorted(p for p in (REPO / folder).rglob("*") if p.is_file() and p.suffix in (".py", ".yaml", ".sh"))
    return files


def repository_paths(text: str, markdown_dir: Path | None = None) -> list[tuple[str, Path]]:
    """(the name as written, the path it must be) for every name ``text`` gives that the rules above check;
    ``markdown_dir``: the folder a Markdown file's relative links start from (None: not Markdown)."""
    out = []
    for m in PATH.finditer(text):
        name = m.group(1).rstrip(".,;")
        rel = "src/" + name if name.startswith("sgpo/") else name
        after = text[m.end():m.end() + 1]
        if name == m.group(1) and after and after in PLACEHOLDER:  # a placeholder follows: its folder is checked
            rel = rel.rsplit("/", 1)[0]
        out.append((name, REPO / rel))
    if markdown_dir is not None:
        for m in LINK.finditer(text):
            target = m.group(1).split("#")[0]
            if target and "://" not in target and not target.startswith("mailto:"):
                out.append((target, markdown_dir / target))
    out += [(m.group(1), REPO / m.group(1)) for m in UPPER_DOC.finditer(text)]
    return out


def test_the_rules_check_repository_paths_and_leave_run_and_user_paths_alone():
    text = ("see src/sgpo/nope.py, `configs/paper/<method>-{a,b}.yaml`, tests/cli/test_cli.py::test_x and sgpo/models/templates.py; "
            "RUN/prepare/x.jsonl, runs/20250101-sgpo/, data/my.jsonl, ~/.cache/sgpo/answers, report.md (SGPO.md).")
    got = {name: path.relative_to(REPO).as_posix() for name, path in repository_paths(text)}
    assert got == {"src/sgpo/nope.py": "src/sgpo/nope.py", "configs/paper/": "configs/paper",
                   "tests/cli/test_cli.py": "tests/cli/test_cli.py", "sgpo/models/templates.py": "src/sgpo/models/templates.py",
                   "SGPO.md": "SGPO.md"}
    links = repository_paths("[a](judges.md#top) [b](https://x.org/y.md) [c](../README.md)", REPO / "docs")
    assert [(n, p.resolve()) for n, p in links] == [("judges.md", REPO / "docs" / "judges.md"),
                                                    ("../README.md", REPO / "README.md")]


def test_every_repository_path_named_in_the_docs_and_the_source_exists():
    missing, seen = [], set()
    for f in scanned():
        text = f.read_text()
        for name, path in repository_paths(text, f.parent if f.suffix == ".md" else None):
            seen.add(path)
            if not path.exists():
                line = text[:text.find(name)].count("\n") + 1
                missing.append(f"{f.relative_to(REPO)}:{line}: {name}")
    assert len(seen) > 60, "the scan found too few paths: is the pattern broken?"
    assert not missing, "named but not in the repository:\n" + "\n".join(missing)


def stage_names() -> set[str]:
    """The stage directories the source creates by name (``s.stage("sft", ...)``, ``ctx.run_stage("prepare", ...)``)."""
    found = set()
    for f in (REPO / "src" / "sgpo").rglob("*.py"):
        found |= set(re.findall(r"(?:\.stage|run_stage)\(\s*\"(\w+)\"", f.read_text()))
    return found


@pytest.mark.parametrize("doc", ["README.md", "docs/outputs.md", "src/sgpo/run/stages.py"])
def test_the_run_directory_listings_name_every_stage_directory(doc):
    names = stage_names()
    assert {"round_0", "sft", "improver", "prepare", "final", "test"} <= names
    text = (REPO / doc).read_text()
    listing = re.search(r"(?:```|::)\n\n?([ \t]*RUN/.*?)(?:\n```|\n\s*\n)", text, re.S)
    assert listing, f"{doc} has no run-directory listing"
    block = listing.group(1)
    absent = sorted(n for n in names if not re.search(rf"(?<![\w<]){n}/", block))
    assert not absent, f"{doc}'s run-directory listing leaves out {absent}"


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def test_the_readme_names_every_key_by_which_the_paper_configs_differ():
    paragraph = next(p for p in (REPO / "README.md").read_text().split("\n\n") if "`configs/paper/<method>-" in p)
    for sgpo in sorted((REPO / "configs" / "paper").glob("sgpo-*.yaml")):
        base = _flat(yaml.safe_load(sgpo.read_text()))
        for other in sorted(sgpo.parent.glob("*" + sgpo.name.removeprefix("sgpo"))):
            cfg = _flat(yaml.safe_load(other.read_text()))
            for key in sorted(k for k in set(base) | set(cfg) if base.get(k) != cfg.get(k)):
                assert f"`{key}`" in paragraph, f"{other.name} differs from {sgpo.name} in {key}; the README says not"
