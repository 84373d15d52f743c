"""The README's model table is the generated one, and the hub lists a model for every manifest entry."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from resnext_hub.models import VARIANTS, load_manifest
from tools import model_table

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_readme_table_is_in_sync():
    """The real command, as CI or a maintainer runs it."""
    result = subprocess.run(
        [sys.executable, "-m", "tools.model_table", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert model_table.readme_table() == model_table.render()


@pytest.mark.slow
def test_table_has_one_row_per_manifest_record():
    table = model_table.render()
    manifest = load_manifest()
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert len(rows) == len(manifest)
    for record, row in zip(manifest.values(), rows):
        assert f"{record.num_params:,}" in row
        assert record.source.file_name in row
        assert all(alt.file_name in row for alt in record.alternatives)
        top1 = record.metrics["imagenet-1k@224"]["top1"]
        assert f"| {top1} / " in row


def test_check_and_write_on_a_drifted_copy(tmp_path, capsys):
    readme = tmp_path / "README.md"
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    drifted = text.replace("45,251,128", "45,251,129", 1)
    assert drifted != text
    readme.write_text(drifted, encoding="utf-8")
    assert model_table.main(["--check", "--readme", str(readme)]) == 1
    assert "45,251,129" in capsys.readouterr().err  # the diff shows what is wrong
    assert model_table.main(["--write", "--readme", str(readme)]) == 0
    assert readme.read_text(encoding="utf-8") == text  # only the table changed, back to the truth
    assert model_table.main(["--check", "--readme", str(readme)]) == 0
    readme.write_text("# no table here\n", encoding="utf-8")
    assert model_table.main(["--check", "--readme", str(readme)]) == 2
    assert model_table.BEGIN in capsys.readouterr().err


def test_manifest_parameters_must_match_the_models():
    """A wrong count in the manifest makes generation fail instead of reaching the README."""
    records = dict(load_manifest())
    name = next(iter(records))
    records[name] = dataclasses.replace(records[name], num_params=records[name].num_params + 1)
    with pytest.raises(model_table.ModelTableError, match="parameters"):
        model_table.render(records)


def test_flops_are_counted_not_stored():
    """GFLOPs come from the model itself: a deeper variant counts more, in proportion to its blocks."""
    _, resnext101 = model_table.measure("resnext101_32x4d")
    _, se_resnext101 = model_table.measure("se_resnext101_32x4d")
    _, seresnext50 = model_table.measure("seresnext50_32x4d")
    assert 15.5 < resnext101 < se_resnext101 < 16.5  # SE adds a little; about 8 GMACs
    assert seresnext50 < resnext101 * 0.6


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> str:
    """This checkout as torch.hub's cache of a GitHub repo, so torch.hub.list works offline."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub").mkdir()
    os.symlink(ROOT, tmp_path / "hub" / "example_resnext-hub_main")
    return "example/resnext-hub:main"


def test_hub_list_covers_every_architecture(hub_cache):
    listed = torch.hub.list(hub_cache, trust_repo=True, verbose=False)
    assert listed == model_table.entry_points()
    assert "nvidia_convnets_processing_utils" in listed
    by_entry = model_table.model_entry_points()
    assert set(by_entry) == set(listed) - {"nvidia_convnets_processing_utils"}
    for name, architecture in by_entry.items():
        with torch.device("meta"):
            model = torch.hub.load(hub_cache, name, trust_repo=True, verbose=False, pretrained=False)
        assert model.architecture == architecture
    served = set(by_entry.values())
    assert {record.architecture for record in load_manifest().values()} <= served
    assert set(VARIANTS) <= served
