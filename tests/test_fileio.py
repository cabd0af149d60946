"""Tests of fgq_jax.fileio: atomic file/directory writes, CSV formatting and locked appends."""
import csv
import multiprocessing

import numpy as np
import pytest

from fgq_jax import fileio


def _point_rows(point: int) -> list[dict]:
    # 3 rows per point (e.g. fake-quant / rounded / integer); awkward values to exercise quoting
    rows = [dict(point=point, variant=v, top1=100.0 / (point + 3), note=f'a,"b"\n{point}')
            for v in ("fq", "rounded", "integer")]
    if point % 7 == 3:  # some workers bring a new column: forces the locked rewrite path
        for r in rows:
            r["extra"] = point
    return rows


def test_append_rows_locked_concurrent(tmp_path):
    path = str(tmp_path / "sweep" / "results.csv")
    points = list(range(48))
    # every point is submitted twice (a restarted worker), in different orders, by 4 processes
    tasks = [(path, _point_rows(p), ["point", "variant"]) for p in points + points[::-1]]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        results = pool.starmap(fileio.append_rows_locked, tasks, chunksize=1)
    assert sum(r.written for r in results) == 3 * len(points)
    # each call returned a consistent snapshot that contains its own rows
    for (_, rws, _), snap in zip(tasks, results):
        assert {(str(r["point"]), r["variant"]) for r in rws} <= {(r["point"], r["variant"]) for r in snap}
    rows = fileio.read_csv(path)
    with open(path, newline="") as f:
        body = list(csv.reader(f))
    assert len(body) == 1 + 3 * len(points)  # one header, no blank or torn lines
    assert all(len(r) == len(body[0]) for r in body)
    keys = [(r["point"], r["variant"]) for r in rows]
    assert len(keys) == len(set(keys)) == 3 * len(points)
    assert {int(p) for p, _ in keys} == set(points)
    r = next(r for r in rows if r["point"] == "10" and r["variant"] == "fq")
    assert r["note"] == 'a,"b"\n10' and r["top1"] == f"{100.0 / 13:.4f}"
    assert "extra" in body[0]
    assert next(r for r in rows if r["point"] == "3")["extra"] == "3"
    # appending the same rows again writes nothing and returns the whole file
    again = fileio.append_rows_locked(path, _point_rows(5), ["point", "variant"])
    assert again.written == 0 and len(again) == 3 * len(points)


def test_append_rows_locked_columns_and_formatting(tmp_path):
    path = tmp_path / "r.csv"
    cols = ["model", "n", "flag", "top1", "none"]
    out = fileio.append_rows_locked(path, [dict(top1=91.23456, n=4, model="r20", flag=True, none=None,
                                           more="x")], ["model", "n", "flag"], cols)
    assert out.written == 1
    with open(path) as f:
        assert f.readline().strip() == "model,n,flag,top1,none,more"
    assert out[0] == dict(model="r20", n="4", flag="true", top1="91.2346", none="", more="x")
    # same key spelled the same way by the sweep's point_key -> not appended twice
    assert fileio.append_rows_locked(path, [dict(model="r20", n=4, flag=True, top1=1.0)],
                                ["model", "n", "flag"], cols).written == 0
    # a file without a final newline (written by hand) still gets clean rows
    with open(path, "a") as f:
        f.write("r20,5,false,1.0,,")
    out = fileio.append_rows_locked(path, [dict(model="r20", n=6, flag=False)], ["model", "n", "flag"])
    assert [r["n"] for r in out] == ["4", "5", "6"] and out.written == 1


def test_then_runs_under_the_lock_with_the_snapshot(tmp_path):
    path = tmp_path / "r.csv"
    seen = []
    fileio.append_rows_locked(path, [dict(k=1)], ["k"], then=lambda rows: seen.append(
        (list(rows), open(f"{path}.lock").fileno() >= 0)))
    fileio.append_rows_locked(path, [dict(k=1)], ["k"], then=lambda rows: seen.append((list(rows), True)))
    assert [r for r, _ in seen] == [[{"k": "1"}], [{"k": "1"}]]  # also when nothing new is written


def test_atomic_writes_leave_old_file_on_failure(tmp_path):
    path = tmp_path / "a.txt"
    fileio.atomic_write_text(path, "old")
    with pytest.raises(RuntimeError):
        with fileio.atomic_file(path, "w") as f:
            f.write("half")
            raise RuntimeError("crash mid-write")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_replace_dir_swaps_whole_directories(tmp_path):
    d = tmp_path / "out"
    fileio.replace_dir(d, lambda p: (p / "x").write_text("1"))
    fileio.replace_dir(d, lambda p: (p / "y").write_text("2"))
    assert sorted(q.name for q in d.iterdir()) == ["y"]
    with pytest.raises(FileExistsError):
        fileio.replace_dir(d, lambda p: None, overwrite=False)

    def boom(p):
        (p / "z").write_text("3")
        raise OSError("disk full")

    with pytest.raises(OSError):
        fileio.replace_dir(d, boom)
    assert sorted(q.name for q in d.iterdir()) == ["y"]
    assert sorted(q.name for q in tmp_path.iterdir()) == ["out"]  # no temporaries left


def test_torn_last_row_is_skipped_with_a_warning_and_healed_by_the_next_append(tmp_path):
    path = tmp_path / "r.csv"
    fileio.append_rows_locked(path, [dict(k=1, top1=50.0), dict(k=2, top1=60.0)], ["k"])
    with open(path, "a") as f:
        f.write("3")  # power loss mid-row: one cell of two, no newline
    with pytest.warns(UserWarning, match=r"r.csv:4: row with 1 cells for 2 columns"):
        rows = fileio.read_csv(path)
    assert [r["k"] for r in rows] == ["1", "2"]
    with pytest.warns(UserWarning):
        out = fileio.append_rows_locked(path, [dict(k=4, top1=1.0)], ["k"])
    assert [r["k"] for r in out] == ["1", "2", "4"] and out.written == 1
    assert path.read_text() == "k,top1\n1,50.0000\n2,60.0000\n4,1.0000\n"  # healed
