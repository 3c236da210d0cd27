"""Files and folders written whole or not at all (megaprolong.runtime.files)."""

import pytest

from megaprolong.runtime.files import out_folder_problem, replace_text, whole_folder


def test_replace_text_leaves_the_new_text_and_nothing_beside_it(tmp_path):
    path = tmp_path / "progress.json"
    path.write_text("old")
    replace_text(path, "new")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["progress.json"]


def test_a_folder_appears_only_when_its_block_succeeds(tmp_path):
    out = tmp_path / "results"
    with pytest.raises(RuntimeError):
        with whole_folder(out, replace=False) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("the run failed half-way")
    assert list(tmp_path.iterdir()) == []
    with whole_folder(out, replace=False) as tmp:
        (tmp / "a.txt").write_text("first")
    assert (out / "a.txt").read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["results"]


def test_an_existing_folder_is_replaced_only_when_asked_and_kept_on_failure(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "a.txt").write_text("first")
    with pytest.raises(RuntimeError):
        with whole_folder(out, replace=True) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("the run failed half-way")
    assert (out / "a.txt").read_text() == "first"
    with whole_folder(out, replace=True) as tmp:
        (tmp / "b.txt").write_text("second")
    assert [p.name for p in out.iterdir()] == ["b.txt"] and [p.name for p in tmp_path.iterdir()] == ["results"]


def test_out_folder_problems_say_what_to_pass(tmp_path):
    assert out_folder_problem(None, force=False) == "--out is required"
    assert out_folder_problem(str(tmp_path / "new"), force=False) is None
    assert "pass --force" in out_folder_problem(str(tmp_path), force=False)
    assert out_folder_problem(str(tmp_path), force=True) is None
