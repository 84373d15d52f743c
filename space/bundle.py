"""Lay out a Hugging Face Space from this repository: ``python space/bundle.py DIR``.

A Space runs ``app.py`` from the root of its own git repository. The bundle mirrors this
repository's layout: the ``space`` package, and the hub code it loads (``hubconf.py``,
``models/``, ``processing/``, ``resnext_hub/``, the manifest and the sample photos), side by side
in ``DIR``; the Space's root ``app.py`` only runs the demo's server (``space.server``), exactly as
``python -m space.app`` does here. The Space's README (its settings) and requirements go to the root
too. Commit ``DIR`` to the Space's repository and push.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# The Space reads these at its root.
SPACE_ROOT_FILES = ("requirements.txt", "README.md")
# Maintainer tools in this folder that the Space does not run.
TOOLS = ("bundle.py", "measure_latency.py")
REPO_PATHS = ("hubconf.py", "weights_manifest.json", "models", "processing", "resnext_hub", "assets/images")
ROOT_APP = '''"""The Space's entry point: the demo is the ``space`` package beside this file."""

from space.server import main

if __name__ == "__main__":
    main()
'''
_SKIP = ("__pycache__", "*.pyc", ".*")


def bundle(dest: Path) -> list[Path]:
    """Copy the Space into ``dest`` (new or empty); returns the top-level paths written."""
    if dest.exists() and any(p.name != ".git" for p in dest.iterdir()):
        raise SystemExit(f"{dest} is not empty; give a new folder or a fresh clone of the Space's repository")
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "app.py").write_text(ROOT_APP, encoding="utf-8")
    written = [dest / "app.py"]
    for name in SPACE_ROOT_FILES:
        written.append(Path(shutil.copy2(HERE / name, dest / name)))
    package = shutil.ignore_patterns(*_SKIP, *SPACE_ROOT_FILES, *TOOLS)
    written.append(Path(shutil.copytree(HERE, dest / "space", ignore=package)))
    for relative in REPO_PATHS:
        source, target = REPO / relative, dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns(*_SKIP))
        else:
            shutil.copy2(source, target)
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dest", type=Path, help="new folder, or a fresh clone of the Space's repository")
    args = parser.parse_args(argv)
    written = bundle(args.dest)
    sys.stdout.write(f"wrote {len(written)} paths to {args.dest}; commit them to the Space's repository\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
