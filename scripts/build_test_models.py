#!/usr/bin/env python3
"""Build the test models once and cache them outside the repository.

    python scripts/build_test_models.py tiny       # tiny random-weight Phi-3-style model
    python scripts/build_test_models.py tiny-vision  # tiny random Phi-3.5-vision-style model
    python scripts/build_test_models.py smollm2    # real SmolLM2-135M-Instruct, int4
    python scripts/build_test_models.py phi35-2l   # Phi-3.5-mini-shaped, 2 layers, random, int4 (bench)

The last line printed on stdout is the model folder. A model is rebuilt only when its
recipe version changes (the version is part of the folder name) or the folder is
incomplete (no `.complete` marker, e.g. after an interrupted build).

Cache root: $EDGE_AGENT_MODEL_CACHE, else ~/.cache/edge-agent/models.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # the builder loads the runtime: no usage events

sys.path.insert(0, str(Path(__file__).resolve().parent))

RECIPES = {"tiny": "testmodels.tiny_phi3", "smollm2": "testmodels.smollm2", "tiny-vision": "testmodels.tiny_phi3v",
           "phi35-2l": "testmodels.phi35_shape"}  # the last for bench/fit.py only, built on demand
COMPLETE_MARKER = ".complete"


def cache_root() -> Path:
    env = os.environ.get("EDGE_AGENT_MODEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "edge-agent" / "models"


def ensure_model(name: str, force: bool = False) -> Path:
    recipe = importlib.import_module(RECIPES[name])
    target = cache_root() / f"{name}-r{recipe.RECIPE_VERSION}"
    if (target / COMPLETE_MARKER).exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build into a sibling temp folder and rename, so a half-built model is never used.
    work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        recipe.build(work)
        (work / COMPLETE_MARKER).write_text(str(recipe.RECIPE_VERSION))
        work.chmod(0o755)  # mkdtemp makes it 0700; a service user must be able to read it
        if target.exists():
            shutil.rmtree(target)
        work.rename(target)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=sorted(RECIPES))
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args()
    print(ensure_model(args.name, force=args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
