"""Resolves the README's install lines without installing anything and fails if they would
pull torch, triton, a CUDA wheel or an nvidia-* package (run by .ci/run)."""

import json
import subprocess
import sys
import tempfile

BANNED = ("torch", "triton", "jax-cuda12-plugin", "jax-cuda12-pjrt")


def resolve(requirement: str) -> list[str]:
    with tempfile.NamedTemporaryFile(suffix=".json") as report:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed",
             "--report", report.name, "-e", requirement],
            capture_output=True, text=True,
        )  # fmt: skip
        if done.returncode:
            sys.exit(f"no_cuda: resolving {requirement!r} failed:\n{done.stderr[-3000:]}")
        with open(report.name) as f:
            return [item["metadata"]["name"].lower() for item in json.load(f)["install"]]


failed = False
for requirement in (".", ".[test]"):
    names = resolve(requirement)
    bad = [n for n in names if n in BANNED or n.startswith("nvidia") or "cuda" in n]
    print(f"no_cuda: pip install -e '{requirement}' resolves {len(names)} packages; banned: {bad}")
    failed = failed or bool(bad)
sys.exit(1 if failed else 0)
