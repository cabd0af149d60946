"""Fault injection: damaged artifacts end in a clear error or in the correct result, never in
silently different numbers or a later crash.

For each persisted artifact (results CSV, converted-checkpoint directory, packed ternary export,
dataset array cache) the file bytes are truncated at random offsets or have random bytes flipped
(hypothesis, bounded examples), then the artifact is read back the way the library reads it.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fgq_jax import checkpoint, fileio, packing
from fgq_jax.data import pipeline
from fgq_jax.ternary import is_ternary, ternarize

SETTINGS = dict(max_examples=12, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
CLEAR_ERRORS = (ValueError, OSError)  # FileNotFoundError is an OSError


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.stat().st_size > 0)


def _damage(root: Path, data, mode: str) -> None:
    """Truncate one file of `root` at a random offset, or flip 1-8 random bytes of it."""
    files = _files(root)
    target = files[data.draw(st.integers(0, len(files) - 1), label="file")]
    raw = bytearray(target.read_bytes())
    if mode == "truncate":
        cut = data.draw(st.integers(0, len(raw) - 1), label="offset")
        target.write_bytes(bytes(raw[:cut]))
        return
    for _ in range(data.draw(st.integers(1, 8), label="flips")):
        i = data.draw(st.integers(0, len(raw) - 1), label="offset")
        raw[i] ^= data.draw(st.integers(1, 255), label="mask")
    target.write_bytes(bytes(raw))


def _same(a, b) -> bool:
    la, ta = jax.tree_util.tree_flatten(a, is_leaf=is_ternary)
    lb, tb = jax.tree_util.tree_flatten(b, is_leaf=is_ternary)
    if ta != tb or len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if is_ternary(x):
            x, y = (x.codes, x.scales, x.neg_scales), (y.codes, y.scales, y.neg_scales)
            if not _same(x, y):
                return False
        elif np.shape(x) != np.shape(y) or not np.array_equal(np.asarray(x), np.asarray(y)):
            return False
    return True


def _variables():
    rng = np.random.default_rng(0)
    return {"params": {"conv": {"kernel": rng.normal(size=(3, 3, 8, 16)).astype(np.float32)},
                       "fc": {"kernel": rng.normal(size=(16, 10)).astype(np.float32),
                              "bias": rng.normal(size=(10,)).astype(np.float32)}},
            "batch_stats": {"bn": {"mean": rng.normal(size=(16,)).astype(np.float32),
                                   "var": rng.uniform(0.5, 2, size=(16,)).astype(np.float32)}}}


@pytest.fixture(scope="module")
def saved_variables(tmp_path_factory):
    d = tmp_path_factory.mktemp("vars") / "ckpt"
    checkpoint.save_variables(d, _variables())
    return d


@pytest.fixture(scope="module")
def saved_export(tmp_path_factory):
    v = _variables()
    tree = {"params": {"conv": {"kernel": ternarize(v["params"]["conv"]["kernel"], 4)},
                       "fc": {"kernel": ternarize(v["params"]["fc"]["kernel"], 8, asymmetric=True),
                              "bias": v["params"]["fc"]["bias"]}},
            "batch_stats": v["batch_stats"]}
    d = tmp_path_factory.mktemp("export") / "tern"
    packing.save_ternary(d, tree)
    return d, packing.load_ternary(d)


@pytest.mark.parametrize("mode", ["flip", "truncate"])
@settings(**SETTINGS)
@given(data=st.data())
def test_converted_checkpoint(saved_variables, tmp_path_factory, mode, data):
    d = tmp_path_factory.mktemp("case") / "ckpt"
    shutil.copytree(saved_variables, d)
    _damage(d, data, mode)
    try:
        loaded, _ = checkpoint.load_variables(d)
    except CLEAR_ERRORS as e:
        assert str(d) in str(e) or "metadata" in str(e)
        return
    assert _same(jax.tree.map(np.asarray, loaded), _variables())


@pytest.mark.parametrize("mode", ["flip", "truncate"])
@settings(**SETTINGS)
@given(data=st.data())
def test_packed_export(saved_export, tmp_path_factory, mode, data):
    src, reference = saved_export
    d = tmp_path_factory.mktemp("case") / "tern"
    shutil.copytree(src, d)
    _damage(d, data, mode)
    try:
        loaded = packing.load_ternary(d)
    except CLEAR_ERRORS as e:
        assert str(d) in str(e)
        return
    assert _same(loaded, reference)


def test_export_metadata_edits_are_caught(saved_export, tmp_path):
    """Editing group_size or asymmetric in the JSON would reinterpret the codes (issue 13)."""
    src, _ = saved_export
    for key, edit in (("params/conv/kernel", {"group_size": 8}), ("params/fc/kernel", {"asymmetric": False})):
        d = tmp_path / f"e{len(list(tmp_path.iterdir()))}"
        shutil.copytree(src, d)
        meta_path = d / packing.META_FILE
        meta = json.loads(meta_path.read_text())
        leaf = next(e for e in meta["leaves"] if e["key"] == key)
        leaf.update(edit)
        meta_path.write_text(json.dumps(meta))
        with pytest.raises(ValueError, match="checksum"):
            packing.load_ternary(d)
        del meta["leaves_sha256"]  # even without the checksum, the arrays contradict the edit
        meta_path.write_text(json.dumps(meta))
        with pytest.raises(ValueError, match="disagree|asymmetric"):
            packing.load_ternary(d)


def test_fp16_scale_overflow_is_an_error_at_save(tmp_path):
    w = np.zeros((8, 2), np.float32)
    w[0, 0] = 1e6  # scale 1e6 > float16's 65504
    with pytest.raises(ValueError, match="float16"):
        packing.save_ternary(tmp_path / "x", {"k": ternarize(w, 4)})
    assert not (tmp_path / "x").exists()
    packing.save_ternary(tmp_path / "y", {"k": ternarize(w, 4)}, scale_dtype="float32")


@pytest.mark.parametrize("mode", ["flip", "truncate"])
@settings(**SETTINGS)
@given(data=st.data())
def test_results_csv(tmp_path_factory, mode, data):
    root = tmp_path_factory.mktemp("csv")
    path = root / "r.csv"
    rows = [dict(model="r20", n=n, top1=50.0 + n) for n in range(6)]
    fileio.append_rows_locked(path, rows, ["model", "n"])
    _damage(root, data, mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torn rows are skipped with a warning
        try:
            got = fileio.read_csv(path)
        except ValueError as e:  # bytes that are not text: a clear error, and appends refuse too
            assert str(path) in str(e)
            with pytest.raises(ValueError, match="damaged"):
                fileio.append_rows_locked(path, [dict(model="r20", n=99)], ["model", "n"])
            return
        # every row read back is complete (no None cell that would crash a later float())
        assert all(None not in r.values() and None not in r for r in got)
        # and the next append still works and leaves a clean file
        out = fileio.append_rows_locked(path, [dict(model="r20", n=99, top1=1.0)], ["model", "n"])
    assert out.written in (0, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fileio.read_csv(path) == list(out)


@pytest.mark.parametrize("mode", ["flip", "truncate"])
@settings(**SETTINGS)
@given(data=st.data())
def test_dataset_cache(tmp_path_factory, mode, data):
    root = tmp_path_factory.mktemp("cache")
    path = root / "arrays.npz"
    rng = np.random.default_rng(0)
    arrays = (rng.integers(0, 256, (20, 4, 4, 3), dtype=np.uint8),
              rng.integers(0, 10, 20).astype(np.int32), np.arange(20).astype(str))
    pipeline._write_cache(path, arrays, {"format": pipeline._CACHE_FORMAT})
    _damage(root, data, mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = pipeline._read_cache(path)  # None = unreadable: the caller rebuilds it
    if got is not None:
        assert all(np.array_equal(a, b) for a, b in zip(got, arrays))
    assert os.path.exists(path)


@pytest.fixture(scope="module")
def saved_train_checkpoints(tmp_path_factory):
    """Two fine-tuning checkpoints (steps 1, 2) of a small TrainState, as fit saves them."""
    import optax

    from fgq_jax.train.checkpointing import Checkpointer
    from fgq_jax.train.state import create_train_state

    wd = tmp_path_factory.mktemp("train")
    v = _variables()
    state = create_train_state(v, optax.sgd(0.1, momentum=0.9), 0, {"fc": 0.5})
    states = {}
    with Checkpointer(wd, 5, {"config": {}, "act_layers": [["fc", 8, False]]}) as ckpt:
        for step in (1, 2):
            state = state.replace(step=state.step + 1,
                                  params=jax.tree.map(lambda a: a + 0.01 * step, state.params))
            states[step] = jax.device_get(state)
            ckpt.save(step, state)
    return wd, states, state


@pytest.mark.parametrize("mode", ["flip", "truncate"])
@settings(**SETTINGS)
@given(data=st.data())
def test_finetune_checkpoint(saved_train_checkpoints, tmp_path_factory, mode, data):
    """Damage the newest checkpoint: resume restores an intact step exactly, or says none is."""
    from fgq_jax.checkpoint import CheckpointMismatchError
    from fgq_jax.train.checkpointing import readable_checkpoints, restore_newest_intact

    src, states, like = saved_train_checkpoints
    wd = tmp_path_factory.mktemp("case")
    shutil.copytree(src, wd, dirs_exist_ok=True)
    _damage(wd / "checkpoints" / "2", data, mode)
    try:
        step, _, state = restore_newest_intact(wd, readable_checkpoints(wd), like)
    except CLEAR_ERRORS + (CheckpointMismatchError,) as e:
        assert "checkpoint" in str(e)
        return
    assert step in (1, 2)
    assert _same(jax.device_get(state.params), states[step].params)
    assert _same(jax.device_get(state.opt_state), states[step].opt_state)
