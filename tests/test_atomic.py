from pathlib import Path

import pytest

from bnpipe.atomic import atomic_path, write_text_atomic
from bnpipe.errors import BnpipeError


def test_replaces_whole_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.txt"
    write_text_atomic(target, "one")
    write_text_atomic(target, "two")
    assert target.read_text() == "two" and [p.name for p in target.parent.iterdir()] == ["a.txt"]


def test_failure_keeps_old_content(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer died")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_unwritable_place_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(BnpipeError, match=r"file/a.txt: cannot write"):
        write_text_atomic(blocker / "a.txt", "data")  # a file where a folder should be


def test_check_writable_fails_early_and_touches_nothing(tmp_path: Path) -> None:
    from bnpipe.atomic import check_writable

    check_writable(tmp_path / "new" / "deeper" / "m.pt")
    assert list(tmp_path.iterdir()) == []  # the folders it made for the trial are gone: a later failure leaves none
    with pytest.raises(BnpipeError, match="the output path is empty"):
        check_writable("")
    with pytest.raises(BnpipeError, match="not a file name"):
        check_writable(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(BnpipeError, match=f"^{blocker / 'm.pt'}: cannot write: {blocker} is a file, not a folder$"):
        check_writable(blocker / "m.pt")
    with pytest.raises(BnpipeError, match=f"^{blocker}/deeper/m.pt: cannot write: {blocker} is a file, not a folder$"):
        check_writable(blocker / "deeper" / "m.pt")


def test_a_failed_write_removes_the_folders_it_made(tmp_path: Path) -> None:
    from bnpipe.atomic import atomic_path

    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "kept" / "new" / "deeper" / "m.onnx") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("verification failed")
    assert [p.name for p in tmp_path.rglob("*")] == ["kept"]  # the folder that was there stays
