"""The one atomic file write: whole or nothing, a plain file's mode, the final name inside, no leftovers."""

from __future__ import annotations

import os
import stat
import zipfile

import pytest

from resnext_hub.processing.atomic import install_folders, open_atomic, staged, staging_folder, write_atomic


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_files_get_the_mode_a_plain_open_gives(tmp_path, umask_022):
    (tmp_path / "plain").write_bytes(b"")
    write_atomic(tmp_path / "text.json", "{}\n")
    write_atomic(tmp_path / "bytes.bin", b"\x00\x01", fsync=True)
    with staged(tmp_path / "model.onnx") as staging:
        staging.write_bytes(b"onnx")
    for name in ("text.json", "bytes.bin", "model.onnx"):
        assert _mode(tmp_path / name) == _mode(tmp_path / "plain") == 0o644, name
    assert (tmp_path / "bytes.bin").read_bytes() == b"\x00\x01" and (tmp_path / "model.onnx").read_bytes() == b"onnx"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bytes.bin", "model.onnx", "plain", "text.json"]


def test_the_staged_file_has_the_final_name_so_archives_record_it(tmp_path):
    with staged(tmp_path / "model.pt") as staging:
        assert staging.name == "model.pt" and staging.parent.parent == tmp_path
        assert staging.parent.name.startswith(".model.pt.")  # a private folder beside the target
        with zipfile.ZipFile(staging, "w") as archive:  # as torch.jit.save names its folder: after the file
            archive.writestr(f"{staging.stem}/data.pkl", b"x")
    assert zipfile.ZipFile(tmp_path / "model.pt").namelist() == ["model/data.pkl"]


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_a_failure_inside_leaves_the_old_file_and_nothing_else(tmp_path, error):
    target = tmp_path / "out.jsonl"
    target.write_text("old\n")
    with pytest.raises(error):
        with open_atomic(target, "w", encoding="utf-8") as handle:
            handle.write("half a new fi")
            raise error()
    with pytest.raises(error):
        with staged(tmp_path / "new.pt2") as staging:
            (staging.parent / "scratch.onnx").write_bytes(b"intermediate")  # the folder is the caller's
            staging.write_bytes(b"half")
            raise error()
    with pytest.raises(error):
        with staging_folder(tmp_path / "repo") as folder:
            (folder / "model" / "1").mkdir(parents=True)
            raise error()
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_an_existing_file_is_replaced_and_missing_folders_are_made(tmp_path):
    target = tmp_path / "a" / "b" / "manifest.json"
    write_atomic(target, "one")
    write_atomic(target, "two")
    assert target.read_text() == "two" and [p.name for p in target.parent.iterdir()] == ["manifest.json"]
    with pytest.raises(ValueError, match="mode must start with 'w'"):
        with open_atomic(target, "a"):
            pass


def test_staged_folders_are_installed_whole_or_not_at_all(tmp_path):
    destination = tmp_path / "repository"
    (destination / "a").mkdir(parents=True)
    (destination / "a" / "old").write_text("a's old model")
    (destination / "other").mkdir()
    with staging_folder(destination / "a") as staging:
        for name in ("a", "b"):
            (staging / name).mkdir()
            (staging / name / "new").write_text(f"{name}'s new model")
        with pytest.raises(FileExistsError):
            install_folders(staging, destination, ["a", "b"])  # "a" exists: refused unless replace
        # A failure on the way ("c" was never staged) puts back what was there and takes out what was new.
        with pytest.raises(FileNotFoundError):
            install_folders(staging, destination, ["a", "b", "c"], replace=True)
        models = sorted(name for name in os.listdir(destination) if not name.startswith("."))  # not the staging
        assert models == ["a", "other"] and os.listdir(destination / "a") == ["old"]
        install_folders(staging, destination, ["a", "b"], replace=True)
    assert sorted(os.listdir(destination)) == ["a", "b", "other"]  # no staging folder left either
    assert (destination / "a" / "new").read_text() == "a's new model" and os.listdir(destination / "a") == ["new"]


def test_a_staged_folder_replaces_the_old_one_whole(tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with staged(target) as staging:
        staging.mkdir()
        (staging / "new.txt").write_text("new")
        assert sorted(os.listdir(target)) == ["old.txt"]  # the old folder stays whole until the block succeeds
    assert sorted(os.listdir(target)) == ["new.txt"]
    with pytest.raises(FileExistsError), staged(target, replace=False) as staging:
        staging.mkdir()
    assert sorted(os.listdir(tmp_path)) == ["export"] and sorted(os.listdir(target)) == ["new.txt"]
