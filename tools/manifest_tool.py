"""Maintainer command: record the SHA-256 and size of checkpoint files in the weights manifest.

    python -m tools.manifest_tool FILE [FILE ...]            # write sha256 + size_bytes
    python -m tools.manifest_tool --check FILE [FILE ...]    # compare, write nothing
    python -m tools.manifest_tool --manifest COPY.json FILE  # another manifest file

Each FILE is matched by its name to a source (``file_name``, primary or alternative) of
``weights_manifest.json``. Run it on files fetched from the publisher's URL and checked by
hand: from then on every download is checked against these values. A file whose name
carries a SHA-256 prefix (timm's) must match it; a recorded SHA-256 is only replaced with
``--force``. The result is validated before the manifest is atomically rewritten.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from resnext_hub.exit_codes import OK as EXIT_OK
from resnext_hub.exit_codes import SOME_FAILED as EXIT_MISMATCH
from resnext_hub.exit_codes import USAGE as EXIT_USAGE
from resnext_hub.models.integrity import HASH_IN_NAME, sha256_of
from resnext_hub.models.weights import MANIFEST_PATH, ManifestError, parse_manifest
from resnext_hub.processing.atomic import write_atomic


class ManifestToolError(ValueError):
    """A file cannot be recorded in the manifest (unknown name, hash conflict)."""


def _sources(manifest: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], bool]]:
    """(weights name, source entry, is primary) for every source in the manifest's JSON."""
    for name, entry in manifest.get("weights", {}).items():
        yield name, entry, True
        for alternative in entry.get("alternatives", []):
            yield name, alternative, False


def record_files(
    manifest: dict[str, Any], files: Sequence[Path], *, force: bool = False, today: str | None = None
) -> list[str]:
    """Write each file's sha256 and size_bytes into ``manifest`` (JSON, changed in place).

    Returns one line per change. Raises :class:`ManifestToolError` before changing anything
    if a file is unknown or conflicts with a recorded or published hash.
    """
    today = today or datetime.date.today().isoformat()
    planned = []
    for path in files:
        matches = [
            (name, entry, primary) for name, entry, primary in _sources(manifest) if entry.get("file_name") == path.name
        ]
        if not matches:
            known = sorted(entry.get("file_name", "?") for _, entry, _ in _sources(manifest))
            raise ManifestToolError(f"{path}: no manifest source has file_name {path.name!r}; known: {known}")
        digest, size = sha256_of(path), path.stat().st_size
        prefix = HASH_IN_NAME.search(path.name)
        if prefix and not digest.startswith(prefix.group(1)):
            raise ManifestToolError(
                f"{path}: sha256 {digest} does not start with {prefix.group(1)}, the prefix in its published name: "
                "the file is damaged or not the published one"
            )
        for name, entry, primary in matches:
            recorded = entry.get("sha256")
            if recorded not in (None, digest) and not force:
                raise ManifestToolError(
                    f"{path}: sha256 {digest}, but {name} records {recorded}; pass --force if the publisher "
                    "really replaced the file"
                )
            planned.append((path, name, entry, primary, digest, size))
    changes = []
    for path, name, entry, primary, digest, size in planned:
        if entry.get("sha256") == digest and entry.get("size_bytes") == size:
            continue
        entry["sha256"], entry["size_bytes"] = digest, size
        if primary:
            manifest["weights"][name]["integrity_note"] = (
                f"SHA-256 and size recorded by the maintainers with `python -m tools.manifest_tool` from the "
                f"published file on {today}; every download is checked against them."
            )
        changes.append(f"{name}: {path.name} sha256={digest} size_bytes={size}")
    return changes


def check_files(manifest: dict[str, Any], files: Sequence[Path]) -> list[str]:
    """Problems (empty if none) of ``files`` against the sha256/size the manifest records."""
    problems = []
    for path in files:
        entries = [entry for _, entry, _ in _sources(manifest) if entry.get("file_name") == path.name]
        if not entries:
            problems.append(f"{path}: not in the manifest")
            continue
        digest, size = sha256_of(path), path.stat().st_size
        for entry in entries:
            if entry.get("sha256") is None:
                problems.append(f"{path}: the manifest records no sha256 for it yet")
            elif (entry["sha256"], entry.get("size_bytes")) != (digest, size):
                problems.append(
                    f"{path}: sha256 {digest} size {size}, manifest {entry['sha256']} size {entry.get('size_bytes')}"
                )
    return problems


def write_manifest(manifest: dict[str, Any], path: Path) -> None:
    """Validate and atomically rewrite ``path`` (2-space JSON, as the repo keeps it)."""
    parse_manifest(manifest)
    write_atomic(path, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.manifest_tool",
        description="Record (or --check) the SHA-256 and size of checkpoint files in the weights manifest.",
    )
    parser.add_argument("files", nargs="+", type=Path, help="checkpoint files, named as in the manifest")
    parser.add_argument("--manifest", type=Path, default=MANIFEST_PATH, help="manifest to edit (default: the repo's)")
    parser.add_argument("--check", action="store_true", help="compare the files with the manifest; write nothing")
    parser.add_argument("--force", action="store_true", help="replace a recorded sha256 that differs")
    args = parser.parse_args(argv)
    missing = [str(f) for f in args.files if not f.is_file()]
    if missing:
        print(f"error: not a file: {', '.join(missing)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        manifest = json.loads(args.manifest.read_text(encoding="utf-8"))
        if args.check:
            problems = check_files(manifest, args.files)
            for line in problems or [f"{len(args.files)} file(s) match {args.manifest}"]:
                print(line, file=sys.stderr if problems else sys.stdout)
            return EXIT_MISMATCH if problems else EXIT_OK
        changes = record_files(manifest, args.files, force=args.force)
        if changes:
            write_manifest(manifest, args.manifest)
    except (OSError, ValueError) as error:  # ManifestToolError, ManifestError and bad JSON are ValueErrors
        kind = "manifest" if isinstance(error, ManifestError) else "error"
        print(f"{kind}: {error}", file=sys.stderr)
        return EXIT_USAGE
    for line in changes or [f"{args.manifest}: already up to date"]:
        print(line)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
