"""Maintainer tools (not part of what hub users load): the README's model table, the manifest's hashes,
and checkpoint files with random weights in the publishers' layouts for tests and benchmarks.

Run from the repo root: ``python -m tools.model_table --check``, ``python -m tools.manifest_tool FILE``.
"""
