"""Lay out a Hugging Face Space from this repository: ``python space/bundle.py DIR``.

A Space runs ``app.py`` from the root of its own git repository, so the demo and the hub code it
loads (``hubconf.py``, ``models/``, ``processing/``, ``resnext_hub/``, the manifest and the sample
photos) are copied side by side into ``DIR``. ``app.py`` finds ``hubconf.py`` beside itself there,
and one folder up in this repository, so the same file runs in both places. Commit ``DIR`` to the
Space's repository and push.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SPACE_FILES = ("app.py", "serving.py", "requirements.txt", "README.md")
REPO_PATHS = ("hubconf.py", "weights_manifest.json", "models", "processing", "resnext_hub", "assets/images")
_SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", ".*")


def bundle(dest: Path) -> list[Path]:
    """Copy the Space into ``dest`` (new or empty); returns the top-level paths written."""
    if dest.exists() and any(p.name != ".git" for p in dest.iterdir()):
        raise SystemExit(f"{dest} is not empty; give a new folder or a fresh clone of the Space's repository")
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name in SPACE_FILES:
        written.append(Path(shutil.copy2(HERE / name, dest / name)))
    for relative in REPO_PATHS:
        source, target = REPO / relative, dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=_SKIP)
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
