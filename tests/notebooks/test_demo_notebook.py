"""The demo notebook runs headless, top to bottom, offline with a weights mirror."""

from __future__ import annotations

import nbformat
import pytest
from conftest import ROOT
from nbclient import NotebookClient

pytestmark = pytest.mark.slow  # runs the notebook

NOTEBOOK = ROOT / "notebooks" / "demo.ipynb"


def test_notebook_runs_offline_with_mirror(ngc_dir, torch_home, monkeypatch):
    monkeypatch.setenv("RESNEXT_HUB_WEIGHTS_MIRROR", str(ngc_dir))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    before = sorted(NOTEBOOK.parent.iterdir())
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "Using cpu for inference" in text or "Using cuda for inference" in text
    samples = [line for line in text.splitlines() if line.startswith("sample ")]
    assert len(samples) == 5 and samples[4].startswith("sample 4: [('")
    figures = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(figures) == 6  # the top-5 of each photo, and one explanation overlay
    assert sorted(NOTEBOOK.parent.iterdir()) == before  # nothing (e.g. a class list) written beside it
