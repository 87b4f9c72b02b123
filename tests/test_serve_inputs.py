"""How `bnpipe predict` expands its PATHs: nothing found is skipped silently, nothing blocks."""

import os
from pathlib import Path

from bnpipe.serve.inputs import expand_inputs

def test_fifo_in_a_folder_is_reported_not_opened(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"x")
    os.mkfifo(tmp_path / "pipe")
    items = expand_inputs([str(tmp_path)])
    assert [(Path(i.name).name, i.error) for i in items] == [("a.png", None), ("pipe", "not a regular file")]

def test_linked_folders_are_followed_once(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (real / "d.png").write_bytes(b"x")
    top = tmp_path / "top"
    top.mkdir()
    (top / "link").symlink_to(real)
    (real / "back").symlink_to(real)  # a loop
    items = expand_inputs([str(top)])
    names = {str(Path(i.name).relative_to(top)): i.error for i in items}
    assert names["link/d.png"] is None
    assert names["link/back"] == "folder already walked through another link"
    assert len(items) == 2

def test_broken_link_is_reported(tmp_path: Path) -> None:
    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (item,) = expand_inputs([str(tmp_path)])
    assert item.error and item.error.startswith("cannot read")
