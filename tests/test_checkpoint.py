"""fgq_jax.checkpoint: saving and loading variable trees (orbax + metadata JSON), atomically, with
clear errors for everything that is not a complete save of a readable format.
(The round trip of a converted PyTorch checkpoint is in test_convert.py.)"""
from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest

from fgq_jax import checkpoint
from fgq_jax.checkpoint import load_variables, save_variables


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


def test_round_trip_empty_collection(tmp_path):
    variables = {
        "params": {"fc8": {"kernel": np.ones((3, 2), np.float32), "bias": np.zeros(2, np.float32)}},
        "batch_stats": {},
    }
    loaded, _ = load_variables(save_variables(tmp_path / "v", variables, {"model": "toy"}))
    assert loaded["batch_stats"] == {}
    _assert_trees_equal(loaded["params"], variables["params"])


def test_save_refuses_existing_dir(tmp_path):
    v1 = {"params": {"w": np.zeros(2, np.float32)}}
    v2 = {"params": {"w": np.ones(2, np.float32)}}
    d = save_variables(tmp_path / "out", v1, {})
    with pytest.raises(FileExistsError, match="overwrite"):
        save_variables(d, v2, {})
    np.testing.assert_array_equal(load_variables(d)[0]["params"]["w"], 0.0)  # untouched
    save_variables(d, v2, {}, overwrite=True)
    np.testing.assert_array_equal(load_variables(d)[0]["params"]["w"], 1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary leftovers


def test_save_never_replaces_foreign_dir(tmp_path):
    d = tmp_path / "home"
    d.mkdir()
    (d / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="not a saved-variables directory"):
        save_variables(d, {"params": {"w": np.zeros(2, np.float32)}}, {}, overwrite=True)
    assert (d / "thesis.tex").read_text() == "precious"


def test_save_rejects_bad_metadata_atomically(tmp_path):
    with pytest.raises(ValueError, match="JSON"):
        save_variables(tmp_path / "out", {"params": {"w": np.zeros(2, np.float32)}}, {"bad": object()})
    assert list(tmp_path.iterdir()) == []


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        load_variables(tmp_path / "nothing_here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="metadata.json is missing"):
        load_variables(tmp_path / "empty")
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "metadata.json").write_text("{not json")
    with pytest.raises(ValueError, match="unreadable metadata"):
        load_variables(tmp_path / "badjson")
    d = save_variables(tmp_path / "ok", {"params": {"w": np.zeros(2, np.float32)}}, {})
    shutil.rmtree(d / "variables")
    with pytest.raises(ValueError, match="variables/ is missing"):
        load_variables(d)


def _rewrite_metadata(d, **changes):
    meta = json.loads((d / checkpoint.METADATA_FILE).read_text())
    meta.update(changes)
    (d / checkpoint.METADATA_FILE).write_text(json.dumps(meta))


def test_load_refuses_other_format_and_newer_version(tmp_path):
    d = save_variables(tmp_path / "ok", {"params": {"w": np.zeros(2, np.float32)}}, {})
    _rewrite_metadata(d, format="someone-else")
    with pytest.raises(ValueError, match="not written by fgq_jax.checkpoint.save_variables"):
        load_variables(d)
    _rewrite_metadata(d, format=checkpoint.FORMAT, format_version=checkpoint.FORMAT_VERSION + 1)
    with pytest.raises(ValueError, match="newer than this code"):
        load_variables(d)
    (d / checkpoint.METADATA_FILE).write_text("[1, 2]")  # valid JSON, not an object
    with pytest.raises(ValueError, match="not written by"):
        load_variables(d)


def test_read_format_metadata_names_what_and_file(tmp_path):
    kw = dict(what="widget store", writer="save_widgets")
    with pytest.raises(FileNotFoundError, match="no widget store at .*absent"):
        checkpoint.read_format_metadata(tmp_path / "absent", "w.json", "widgets", 1, **kw)
    with pytest.raises(ValueError, match="not a widget store directory: w.json is missing"):
        checkpoint.read_format_metadata(tmp_path, "w.json", "widgets", 1, **kw)
    (tmp_path / "w.json").write_text(json.dumps({"format": "widgets", "format_version": 1, "n": 3}))
    assert checkpoint.read_format_metadata(tmp_path, "w.json", "widgets", 1, **kw)["n"] == 3
    with pytest.raises(ValueError, match="newer than this code"):
        checkpoint.read_format_metadata(tmp_path, "w.json", "widgets", 0, **kw)
