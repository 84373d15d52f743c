"""hubconf.py as torch.hub uses it: entry points, quiet import, coexistence with other hub repos."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT

from tools.fake_checkpoints import NGC_FILES

ENTRY_POINTS = {
    "nvidia_convnets_processing_utils",
    "nvidia_resneXt",
    "nvidia_resnext101_32x4d",
    "nvidia_se_resnext101_32x4d",
    "seresnext26d_32x4d",
    "seresnext26t_32x4d",
    "seresnext50_32x4d",
}


def run_python(code: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-W", "error", "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


@pytest.mark.slow
def test_import_is_silent_and_lists_entry_points(tmp_path):
    # What torch.hub.list does: the public callables of hubconf.
    result = run_python(
        f"""
        import importlib.util, sys
        sys.path.insert(0, {str(ROOT)!r})
        spec = importlib.util.spec_from_file_location("hubconf", {str(ROOT / "hubconf.py")!r})
        hub = importlib.util.module_from_spec(spec); spec.loader.exec_module(hub)
        print(sorted(n for n in dir(hub) if callable(getattr(hub, n)) and not n.startswith("_")))
        print(hub.dependencies)
        print("models" in sys.modules, "processing" in sys.modules)
        """,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    names, dependencies, leaked = result.stdout.splitlines()
    assert set(eval(names)) == ENTRY_POINTS
    assert "torch" in dependencies
    assert leaked == "False False"


def test_help_shows_docstrings_with_examples():
    import torch

    hub = torch.hub._import_module("hubconf_for_help", str(ROOT / "hubconf.py"))
    for name in ENTRY_POINTS - {"nvidia_convnets_processing_utils"}:
        assert "pretrained_from_file (str)" in getattr(hub, name).__doc__, name
    for name in ("nvidia_resneXt", "nvidia_se_resnext101_32x4d", "nvidia_convnets_processing_utils"):
        assert "Example::" in getattr(hub, name).__doc__ and "torch.hub.load" in getattr(hub, name).__doc__


def _fake_repo(tmp_path):
    repo = tmp_path / "other-hub"
    (repo / "models").mkdir(parents=True)
    (repo / "processing").mkdir()
    (repo / "hubconf.py").write_text("dependencies = []\nfrom models.toy import toy\nfrom processing import tag\n")
    (repo / "models" / "__init__.py").write_text("")
    (repo / "models" / "toy.py").write_text("def toy():\n    return 'other repo toy'\n")
    (repo / "processing" / "__init__.py").write_text("def tag():\n    return 'other repo processing'\n")
    return repo


@pytest.mark.slow
@pytest.mark.parametrize("order", ["theirs_first", "ours_first"])
def test_other_hub_repo_with_models_package(tmp_path, ngc_dir, order):
    other = _fake_repo(tmp_path)
    checkpoint = ngc_dir / NGC_FILES["resnext101_32x4d"]
    ours = f"""
        m = torch.hub.load({str(ROOT)!r}, "nvidia_resneXt", source="local", pretrained_from_file={str(checkpoint)!r})
        u = torch.hub.load({str(ROOT)!r}, "nvidia_convnets_processing_utils", source="local")
        x = u.prepare_input_from_uri({str(ROOT / "assets/images/coffee.jpg")!r})
        with torch.no_grad():
            print(len(u.pick_n_best(torch.softmax(m(x[:, :, :64, :64]), 1), 2)[0]))
    """
    theirs = f"""
        print(torch.hub.load({str(other)!r}, "toy", source="local"))
        print(torch.hub.load({str(other)!r}, "tag", source="local"))
    """
    steps = [theirs, ours, theirs] if order == "theirs_first" else [ours, theirs, ours]
    code = "import torch\n" + "".join(textwrap.dedent(step) for step in steps)
    result = run_python(code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if not line.startswith("sample")]
    expected_theirs = ["other repo toy", "other repo processing"]
    expected = expected_theirs + ["2"] + expected_theirs if order == "theirs_first" else ["2"] + expected_theirs + ["2"]
    assert lines == expected
