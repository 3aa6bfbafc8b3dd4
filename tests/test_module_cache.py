"""The generated-module cache: bounded by least recent use, and safe for processes sharing it."""

from __future__ import annotations

import os
import time

from mlxc.codegen import module as M


def _write(n: int) -> list:
    return [M.write_module(f"X = {i}\n") for i in range(n)]


def test_old_modules_beyond_the_limit_are_evicted_least_recent_first(tmp_path, monkeypatch):
    monkeypatch.setenv(M.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(M, "CACHE_LIMIT", 4)
    paths = _write(6)
    long_ago = time.time() - 2 * M.CACHE_GRACE_S
    for age, p in enumerate(paths):  # paths[0] used least recently
        os.utime(p, (long_ago + age, long_ago + age))
    newest = M.write_module("X = 'new'\n")
    left = sorted(p.name for p in (tmp_path / "modules").glob("mlxc_model_*.py"))
    assert len(left) == 4 and newest.name in left
    assert {p.name for p in paths[3:]} <= set(left) and not any(p.exists() for p in paths[:3])


def test_recently_used_modules_are_kept_over_the_limit(tmp_path, monkeypatch):
    """Another process may be about to import a module it just wrote: nothing used in the grace period goes."""
    monkeypatch.setenv(M.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(M, "CACHE_LIMIT", 2)
    paths = _write(5)
    assert all(p.exists() for p in paths)
    assert M.import_module(paths[0]).X == 0


def test_a_module_evicted_meanwhile_is_written_again(tmp_path, monkeypatch):
    monkeypatch.setenv(M.CACHE_ENV, str(tmp_path))
    path = M.write_module("X = 7\n")
    path.unlink()  # as another process's eviction would
    assert M.write_module("X = 7\n") == path and M.import_module(path).X == 7
