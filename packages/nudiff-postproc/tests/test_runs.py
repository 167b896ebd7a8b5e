"""Output folders that remember their settings: a failed first try takes its claim back."""

from __future__ import annotations

import json

import pytest
from nudiff_postproc._runs import RUN_STAMP, claimed_output_folder


class _Failed(Exception):
    pass


def _fail_in(out, settings, write=None, interrupt=False, **options):
    with pytest.raises(KeyboardInterrupt if interrupt else _Failed):
        with claimed_output_folder(out, settings, **options) as folder:
            (folder / "maps").mkdir()
            if write:
                (folder / "maps" / write).write_text("x")
            raise KeyboardInterrupt if interrupt else _Failed


@pytest.mark.parametrize("interrupt", [False, True])
def test_a_first_try_that_fails_before_any_file_leaves_nothing(tmp_path, interrupt):
    out = tmp_path / "a" / "out"
    _fail_in(out, {"steps": 20}, interrupt=interrupt)
    assert not out.exists() and (tmp_path / "a").is_dir()  # the parent was the caller's
    with claimed_output_folder(out, {"steps": 10}) as folder:  # other settings: nothing to mix with
        (folder / "m.png").write_text("x")
    assert json.loads((out / RUN_STAMP).read_text()) == {"steps": 10}


def test_a_failure_after_the_first_file_keeps_the_record_for_the_resume(tmp_path):
    out = tmp_path / "out"
    _fail_in(out, {"steps": 20}, write="m0.png")
    assert (out / "maps" / "m0.png").is_file()
    assert json.loads((out / RUN_STAMP).read_text()) == {"steps": 20}
    with pytest.raises(ValueError, match="was started with --steps 20, this resume gives 10"):
        with claimed_output_folder(out, {"steps": 10}):
            pass


def test_a_resume_that_fails_keeps_its_record(tmp_path):
    out = tmp_path / "out"
    with claimed_output_folder(out, {"steps": 20}):
        pass  # a run that made nothing, but finished: its record stays
    _fail_in(out, {"steps": 20})
    assert json.loads((out / RUN_STAMP).read_text()) == {"steps": 20}


def test_the_users_folders_stay(tmp_path):
    out = tmp_path / "out"
    (out / "mine").mkdir(parents=True)  # made by the user before the run
    _fail_in(out, {"steps": 20})
    assert sorted(p.name for p in out.iterdir()) == ["mine"]


def test_a_failed_overwrite_takes_back_the_record_it_replaced(tmp_path):
    out = tmp_path / "out"
    with claimed_output_folder(out, {"steps": 20}):
        pass
    # --overwrite: the caller removed the old work; the new record replaces the old one
    _fail_in(out, {"steps": 10}, replace=True)
    assert sorted(p.name for p in out.iterdir()) == []


def test_a_folder_of_other_files_is_not_claimed(tmp_path):
    from nudiff_postproc._runs import claim_output_folder

    data = tmp_path / "dataset"
    (data / "instance_maps").mkdir(parents=True)
    (data / "instance_maps" / "t0.png").write_bytes(b"x")  # a user's dataset: samples would mix in
    with pytest.raises(ValueError, match=r"already holds files that no nudiff run recorded making \(e.g. '.*t0.png'\)"):
        claim_output_folder(data, {"steps": 20})
    assert not (data / RUN_STAMP).exists()
    claim_output_folder(data, {"steps": 20}, replace=True)  # --overwrite: the caller cleared what it makes
    # a record another rank is writing, and empty folders, are no strangers
    fresh = tmp_path / "fresh"
    (fresh / "maps").mkdir(parents=True)
    (fresh / f".{RUN_STAMP}.123.abc.part").write_text("{}")
    assert claim_output_folder(fresh, {"steps": 20}) == fresh


def test_an_output_folder_under_a_file_is_named(tmp_path):
    from nudiff_postproc._runs import claim_output_folder

    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile", tmp_path / "afile" / "out"):
        with pytest.raises(ValueError, match=r"output folder '.*': '.*afile' is a file, not a folder"):
            claim_output_folder(out, {"steps": 20})
