"""Atomic result files (jaxvla/io/files.py)."""

from __future__ import annotations

import json
import os

import pytest

from jaxvla.io.files import atomic_path, write_json, write_text


def test_write_replaces_whole_files_and_creates_the_directory(tmp_path):
    path = tmp_path / "new" / "results.json"
    assert write_json(path, {"rate": 0.5, "n": 3}) == str(path)
    assert json.loads(path.read_text()) == {"rate": 0.5, "n": 3}
    write_text(path, "replaced\n")
    assert path.read_text() == "replaced\n"
    assert os.listdir(path.parent) == ["results.json"]  # no temporary file left


def test_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    path = tmp_path / "REPORT.md"
    write_text(path, "old\n")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(path) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("boom")
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["REPORT.md"]
