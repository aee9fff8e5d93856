"""Every error of the command line is one line that names the file and the fix, never a traceback."""

from __future__ import annotations

import collections
import io
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from anomaly.models.safe_unpickle import CheckpointFormatError, safe_load
from anomaly.training.common import CheckpointError, load_checkpoint, save_checkpoint
from pipelines.cli import main
from pipelines.work import failure_reason
from tests.conftest import REPO, child_env, phantom, write_nifti


def _one_line_error(capsys: pytest.CaptureFixture[str], args: list[str], expected: str, code: int = 2) -> str:
    assert main(args) == code
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def scan(tmp_path: Path) -> Path:
    return write_nifti(tmp_path / "in" / "a.nii.gz", phantom((40, 48, 36)), np.diag([3.0, 3.0, 3.0, 1.0]))


def _score(scan: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["score", str(scan), "--model", "intensity", "--quiet", *extra]


def test_out_is_a_regular_file(tmp_path: Path, scan: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "file.txt"
    target.write_text("x")
    line = _one_line_error(capsys, _score(scan, tmp_path, "--out", str(target), "--db", str(tmp_path / "r.db")),
                           "is a file, not a folder")
    assert str(target) in line


def test_out_under_proc(tmp_path: Path, scan: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if not Path("/proc/self").exists():
        pytest.skip("no /proc here")
    _one_line_error(capsys, _score(scan, tmp_path, "--out", "/proc/anomaly-out", "--db", str(tmp_path / "r.db")),
                    "cannot write there")


def test_out_read_only(tmp_path: Path, scan: Path, capsys: pytest.CaptureFixture[str]) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root); a read-only folder cannot be made")
        _one_line_error(capsys, _score(scan, tmp_path, "--out", str(locked / "o"), "--db", str(tmp_path / "r.db")),
                        "cannot write there")
    finally:
        locked.chmod(0o755)


def test_db_is_a_text_file(tmp_path: Path, scan: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "notes.db"
    text.write_text("these are my notes, not a database\n" * 50)
    _one_line_error(capsys, _score(scan, tmp_path, "--out", str(tmp_path / "o"), "--db", str(text)),
                    "not a SQLite database")
    assert text.read_text().startswith("these are my notes")


def test_db_of_another_program(tmp_path: Path, scan: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other.db"
    con = sqlite3.connect(other)
    con.execute("create table runs (id integer primary key, what text)")
    con.execute("create table results (id integer primary key, value real)")
    con.execute("insert into runs (what) values ('theirs')")
    con.commit()
    con.close()
    _one_line_error(capsys, _score(scan, tmp_path, "--out", str(tmp_path / "o"), "--db", str(other)),
                    "another program")
    con = sqlite3.connect(other)
    assert con.execute("select what from runs").fetchall() == [("theirs",)]  # untouched
    con.close()


def test_csv_is_a_folder_refused_before_scoring(tmp_path: Path, scan: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "tables"
    folder.mkdir()
    _one_line_error(capsys, _score(scan, tmp_path, "--out", str(tmp_path / "o"), "--db", str(tmp_path / "r.db"),
                                   "--csv", str(folder)), "is a folder")
    assert not list((tmp_path / "o").glob("*_anomaly.nii.gz"))


def test_full_disk_gets_the_disk_hint_not_the_model_hint(tmp_path: Path) -> None:
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    with pytest.raises(OSError) as info, open("/dev/full", "wb") as full:  # a real ENOSPC from the kernel
        full.write(b"\0" * 65536)
        full.flush()
    reason = failure_reason(info.value, tmp_path)
    assert "disk is full" in reason and "free space" in reason
    assert "check the model" not in reason
    assert "check the model" in failure_reason(ValueError("bad shape"), tmp_path)


@pytest.mark.timeout(300)
def test_ctrl_c_in_the_first_seconds_ends_quietly(tmp_path: Path, scan: Path) -> None:
    """Ctrl-C while the command imports its libraries, opens the database or loads the model. The child
    says when the interpreter itself is up (a signal before that is the interpreter's, not ours)."""
    script = ("import runpy, sys\nsys.argv[0] = 'anomaly'\nsys.stderr.write('ready\\n')\nsys.stderr.flush()\n"
              "runpy.run_module('pipelines.cli', run_name='__main__')\n")
    args = [sys.executable, "-c", script, "score", str(scan), "--out", str(tmp_path / "o"), "--db",
            str(tmp_path / "r.db"), "--model", "intensity", "--quiet"]
    for delay in (0.2, 0.8, 2.0, 4.0):
        proc = subprocess.Popen(args, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        assert proc.stderr is not None and proc.stderr.readline() == "ready\n"
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=240)
        assert "Traceback" not in err, (delay, err)
        # 130, or death by SIGINT (-2) when the interrupt landed inside an extension's embedded Python
        # call (CPython then re-raises the signal at exit): either way the shell sees an interruption.
        assert proc.returncode in (0, 130, -signal.SIGINT), (delay, proc.returncode, err)
        if proc.returncode != 0:
            assert "interrupted" in err, (delay, err)


def _deep_checkpoint(path: Path, depth: int = 3000) -> Path:
    nested: dict[str, object] = {}
    inner = nested
    for _ in range(depth):
        inner["model"] = {}
        inner = inner["model"]  # type: ignore[assignment]
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 4 * depth))
    try:
        torch.save(nested, path)
    finally:
        sys.setrecursionlimit(limit)
    return path


def test_models_import_of_a_deeply_nested_pickle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    deep = _deep_checkpoint(tmp_path / "deep.pt")
    _one_line_error(capsys, ["models", "import", str(deep), "--out", str(tmp_path / "m")], "nested more than")


class _Declared:
    """Pickles as a 2 GiB float32 storage reference, so the archive can declare what it does not hold."""


def _zip_declaring(path: Path, numel: int) -> Path:
    """A torch.save-like zip whose pickle names one storage of ``numel`` float32 values, with a small
    record whose zip directory sizes are then patched to claim the whole storage."""
    marker = _Declared()

    class Writer(pickle.Pickler):
        def persistent_id(self, obj: object) -> object:
            if obj is marker:
                return ("storage", torch.FloatStorage, "0", "cpu", numel)
            return None

    class Tensor:
        def __reduce__(self) -> tuple[object, ...]:
            return (torch._utils._rebuild_tensor_v2, (marker, 0, (numel,), (1,), False, collections.OrderedDict()))

    buffer = io.BytesIO()
    Writer(buffer, protocol=2).dump({"state_dict": {"w": Tensor()}})
    record = b"\0" * (2 << 20)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/data/0", record)
    raw = bytearray(path.read_bytes())
    declared = (numel * 4).to_bytes(4, "little")
    start = 0
    while (start := raw.find(b"PK\x01\x02", start)) >= 0:  # central directory entries
        name_len = int.from_bytes(raw[start + 28:start + 30], "little")
        if raw[start + 46:start + 46 + name_len] == b"archive/data/0":
            raw[start + 20:start + 24] = declared
            raw[start + 24:start + 28] = declared
        start += 4
    path.write_bytes(bytes(raw))
    return path


def test_models_import_of_a_zip_declaring_2_gib_is_refused_before_allocating(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bomb = _zip_declaring(tmp_path / "bomb.pt", numel=(2 << 30) // 4 - 1)
    assert bomb.stat().st_size < 3 << 20
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointFormatError, match="declares"):
            safe_load(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20
    _one_line_error(capsys, ["models", "import", str(bomb), "--out", str(tmp_path / "m")], "declares")


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return (Path.touch, (self.marker,))


def test_training_checkpoints_load_weights_only(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    generator = torch.Generator().manual_seed(3)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
             "step": 7, "history": [{"step": 7.0, "val": 0.5}], "best": None, "best_val": float("inf"),
             "bad_checks": 0}
    save_checkpoint(tmp_path / "ck.pt", state)
    loaded = load_checkpoint(tmp_path / "ck.pt")
    assert loaded is not None and loaded["step"] == 7
    assert torch.equal(loaded["generator"], generator.get_state())
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path / "bad.pt", {"model": model})  # a module is not weights-only material

    marker = tmp_path / "ran"
    torch.save({"step": 1, "payload": _Payload(marker)}, tmp_path / "hostile.pt")
    with pytest.raises(CheckpointError, match="nothing in it was run"):
        load_checkpoint(tmp_path / "hostile.pt")
    assert not marker.exists()
