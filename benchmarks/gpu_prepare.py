"""Assemble what the GPU check needs into one small folder (default ``.gpu_carry/``, git-ignored), for a GPU
machine without internet: the SmolLM2 tokenizer (and config; no weights), prompts with references, and wheels of the
few pure-CPU packages such a machine may lack.

    python benchmarks/gpu_prepare.py [--out .gpu_carry] [--python-version 3.12]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from sgpo.data.records import load_records  # noqa: E402
from sgpo.models.loading import embedded_smollm2_path  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "config.json")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".gpu_carry")
    ap.add_argument("--python-version", default="3.12")
    ap.add_argument("--prompts", type=int, default=96)
    ap.add_argument("--no-wheels", action="store_true", help="no wheels (a check on this machine needs none)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    smol = out / "smollm2-arch"
    smol.mkdir(exist_ok=True)
    for name in TOKENIZER_FILES:
        src = embedded_smollm2_path() / name
        if src.exists():
            shutil.copy(src, smol / name)

    recs, _ = load_records("sgpo:arena-hard-v2", need="reference")
    rows = [{"prompt": r.prompt_text, "response": r.reference} for r in recs[:args.prompts]]
    (out / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    wheels = out / "wheels"
    wheels.mkdir(exist_ok=True)
    if not args.no_wheels:
        download_wheels(wheels, args.python_version)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{out}: {size / 2**20:.1f} MiB")


def download_wheels(wheels: Path, python_version: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--no-deps",
                    "--python-version", python_version, "--platform", "manylinux2014_x86_64",
                    "--platform", "manylinux_2_17_x86_64", "-d", str(wheels), "rapidfuzz"], check=True)


if __name__ == "__main__":
    main()
