"""flowaug._io.atomic_path: atomic writes whose files respect the umask."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from flowaug._io import atomic_path


@pytest.fixture
def umask():
    """Set the process umask for one test; restored afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda value: os.umask(value)
    os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


class TestAtomicPath:
    @pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664), (0o000, 0o666)])
    def test_new_file_respects_umask_like_open(self, tmp_path, umask, mask, expected):
        umask(mask)
        target = tmp_path / "out.txt"
        with atomic_path(str(target)) as tmp:
            with open(tmp, "w") as handle:
                handle.write("done")
        plain = tmp_path / "plain.txt"
        plain.write_text("done")
        assert mode(target) == expected == mode(plain)
        assert target.read_text() == "done"

    def test_writers_that_choose_format_by_extension_get_the_same_mode(self, tmp_path, umask):
        umask(0o022)
        target = tmp_path / "sub" / "data.npz"  # the folder is created
        with atomic_path(str(target)) as tmp:
            assert tmp.endswith(".npz") and os.path.dirname(tmp) == str(tmp_path / "sub")
            np.savez_compressed(tmp, x=np.arange(3))
        assert mode(target) == 0o644
        assert sorted(os.listdir(target.parent)) == ["data.npz"]
        assert np.load(target)["x"].tolist() == [0, 1, 2]

    @pytest.mark.parametrize("old_mode", [0o640, 0o444])  # 0o444: a read-only file must not block the writer
    def test_replaced_file_keeps_its_permissions(self, tmp_path, umask, old_mode):
        umask(0o022)
        target = tmp_path / "out.txt"
        target.write_text("old")
        os.chmod(target, old_mode)
        with atomic_path(str(target)) as tmp:
            with open(tmp, "w") as handle:
                handle.write("new")
        assert target.read_text() == "new" and mode(target) == old_mode

    def test_failure_mid_write_leaves_no_new_file_and_no_temp_file(self, tmp_path):
        target = tmp_path / "out.txt"
        with pytest.raises(RuntimeError, match="disk full"):
            with atomic_path(str(target)) as tmp:
                with open(tmp, "w") as handle:
                    handle.write("half")
                raise RuntimeError("disk full")
        assert os.listdir(tmp_path) == []

    def test_failure_mid_write_keeps_the_old_file(self, tmp_path):
        target = tmp_path / "out.txt"
        target.write_text("old")
        with pytest.raises(KeyboardInterrupt):
            with atomic_path(str(target)) as tmp:
                with open(tmp, "w") as handle:
                    handle.write("half")
                raise KeyboardInterrupt
        assert os.listdir(tmp_path) == ["out.txt"] and target.read_text() == "old"

    def test_temp_file_is_new_each_time(self, tmp_path):
        target = str(tmp_path / "out.txt")
        with atomic_path(target) as first, atomic_path(target) as second:
            assert first != second and os.path.exists(first) and os.path.exists(second)
