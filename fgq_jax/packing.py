"""Packed 2-bit export of ternary networks.

Codes in {-1, 0, +1} are stored 4 per byte as their 2-bit two's-complement patterns
(0 -> 0b00, +1 -> 0b01, -1 -> 0b11; 0b10 is invalid), code ``i`` of the row-major flattened tensor in
bits ``2*(i % 4) .. 2*(i % 4)+1`` of byte ``i // 4`` (little-endian inside the byte; the last byte is
zero-padded). Unpacking is then a shift and a sign extension, with no lookup table.

A saved directory ``DIR`` (see :func:`save_ternary`)::

    DIR/fgq_ternary.json   # format, version, one entry per leaf: its tree path, kind and static fields
    DIR/arrays/            # orbax PyTreeCheckpointer checkpoint {"leaf_00000": {"packed": uint8 [..],
                           #   "scales": fp16 [G, cout], ...}, "leaf_00001": {"array": ...}, ...}

Scales are stored in fp16 by default (fp32 optional); loading returns them as float32 holding exactly
the stored values (``scales.astype(float16).astype(float32)``), codes are reproduced exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fgq_jax import checkpoint
from fgq_jax.fileio import replace_dir
from fgq_jax.ternary import TernaryTensor, is_ternary, scales_shape

__all__ = [
    "pack_codes",
    "unpack_codes",
    "packed_size",
    "save_ternary",
    "load_ternary",
    "export_size_report",
]

FORMAT = "fgq-jax-ternary"
FORMAT_VERSION = 1
META_FILE = "fgq_ternary.json"
ARRAYS_DIR = "arrays"
_SCALE_DTYPES = {"float16": np.float16, "float32": np.float32}


# --------------------------------------------------------------------------------------------------
# 2-bit packing
# --------------------------------------------------------------------------------------------------
def packed_size(num_codes: int) -> int:
    """Bytes holding ``num_codes`` packed codes: ``ceil(num_codes / 4)``."""
    return -(-int(num_codes) // 4)


def _xp(a):
    # numpy in, numpy out (host export); jax in (possibly traced), jax out.
    return jnp if isinstance(a, jax.Array) else np


def pack_codes(codes) -> np.ndarray | jax.Array:
    """Pack ternary codes 4 per byte.

    Args:
      codes: integer array of any shape with values in {-1, 0, 1} (e.g. ``TernaryTensor.codes``,
        int8). numpy or jax (jit-able; the value check is skipped on traced input).

    Returns:
      uint8 [ceil(codes.size / 4)], numpy for numpy input, jax otherwise.
    """
    xp = _xp(codes)
    c = xp.asarray(codes)
    if not (xp.issubdtype(c.dtype, xp.integer) or c.dtype == xp.bool_):
        raise TypeError(f"codes must be an integer array, got dtype {c.dtype}")
    c = c.reshape(-1).astype(xp.int8)
    if not isinstance(c, jax.core.Tracer) and c.size:
        lo, hi = int(c.min()), int(c.max())
        if lo < -1 or hi > 1:
            raise ValueError(f"codes must be in {{-1, 0, 1}}, found values in [{lo}, {hi}]")
    n = c.shape[0]
    pad = packed_size(n) * 4 - n
    # -1 (0xFF as int8) & 3 = 0b11, +1 -> 0b01, 0 -> 0b00: the 2-bit two's complement.
    bits = (c.astype(xp.uint8) & xp.uint8(3)).astype(xp.uint8)
    bits = xp.concatenate([bits, xp.zeros((pad,), xp.uint8)]).reshape(-1, 4)
    shifts = xp.asarray([0, 2, 4, 6], dtype=xp.uint8)
    # the four 2-bit fields do not overlap, so the sum is a bitwise OR
    return (bits << shifts).sum(axis=1, dtype=xp.uint8)


def unpack_codes(packed, shape: Sequence[int], *, validate: bool = True) -> np.ndarray | jax.Array:
    """Inverse of :func:`pack_codes`: int8 codes of ``shape`` (row-major).

    Args:
      packed: uint8 [ceil(prod(shape) / 4)].
      shape: the codes' shape.
      validate: raise ValueError on the invalid pattern 0b10 (a corrupt file), when not traced.
    """
    xp = _xp(packed)
    p = xp.asarray(packed)
    shape = tuple(int(d) for d in shape)
    n = math.prod(shape)
    if p.dtype != xp.uint8 or p.ndim != 1:
        raise TypeError(f"packed must be a 1-d uint8 array, got {p.dtype} {p.shape}")
    if p.shape[0] != packed_size(n):
        raise ValueError(f"{p.shape[0]} packed bytes cannot hold shape {shape} ({packed_size(n)} needed)")
    shifts = xp.asarray([0, 2, 4, 6], dtype=xp.uint8)
    fields = ((p[:, None] >> shifts) & xp.uint8(3)).reshape(-1)[:n]
    if validate and not isinstance(fields, jax.core.Tracer) and n and bool((fields == 2).any()):
        raise ValueError("packed codes contain the invalid 2-bit pattern 0b10 (corrupt data?)")
    # sign-extend the 2-bit field: 0b11 -> -1, 0b01 -> 1, 0b00 -> 0
    codes = (fields ^ xp.uint8(2)).astype(xp.int8) - xp.int8(2)
    return codes.reshape(shape)


# --------------------------------------------------------------------------------------------------
# TernaryTensor glue (fgq_jax.ternary)
# --------------------------------------------------------------------------------------------------
def _json_static(v):
    """Static fields (group_size may be an int, None or "channel") as JSON values."""
    if isinstance(v, (np.integer,)):
        return int(v)
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (tuple, list)):
        return [_json_static(u) for u in v]
    raise TypeError(f"cannot store static field value {v!r}")


def _make_ternary(codes, scales, neg_scales, static: dict):
    cls = TernaryTensor
    return cls(
        codes=jnp.asarray(codes, jnp.int8),
        scales=jnp.asarray(scales, jnp.float32),
        neg_scales=None if neg_scales is None else jnp.asarray(neg_scales, jnp.float32),
        shape=tuple(static["shape"]),
        group_size=static["group_size"],
        grouping=static["grouping"],
        method=static["method"],
    )


# --------------------------------------------------------------------------------------------------
# tree paths <-> JSON
# --------------------------------------------------------------------------------------------------
def _key_to_json(k) -> list:
    if isinstance(k, jax.tree_util.DictKey):
        if not isinstance(k.key, (str, int)) or isinstance(k.key, bool):
            raise TypeError(f"dict keys must be str or int to be saved, got {k.key!r}")
        return ["dict", k.key]
    if isinstance(k, jax.tree_util.SequenceKey):
        return ["seq", k.idx]
    if isinstance(k, jax.tree_util.GetAttrKey):
        return ["attr", k.name]
    raise TypeError(f"unsupported tree node key {k!r}")


def _path_str(path) -> str:
    return "/".join(str(k[1]) for k in path)


def _rebuild(entries: list[tuple[list, Any]]):
    """Nested dicts/lists from (json path, leaf) pairs (GetAttrKey nodes become dicts)."""
    if len(entries) == 1 and not entries[0][0]:
        return entries[0][1]
    root: dict = {}
    for path, leaf in entries:
        node = root
        for i, (_, key) in enumerate(path):
            if i == len(path) - 1:
                node[key] = leaf
            else:
                node = node.setdefault(key, {})

    # turn dicts whose keys came from sequences back into lists (keys 0..n-1 in order)
    seq_nodes = {tuple(k for _, k in p[:i]) for p, _ in entries for i, (kind, _) in enumerate(p) if kind == "seq"}

    def convert(node, prefix=()):
        if not isinstance(node, dict):
            return node
        out = {k: convert(v, prefix + (k,)) for k, v in node.items()}
        if prefix in seq_nodes:
            return [out[i] for i in sorted(out)]
        return out

    return convert(root)


# --------------------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------------------
def _check_target(path: Path) -> list[Path]:
    """Fail early (and clearly) on an existing or unwritable path; create missing parents.

    Returns the parent directories this call created (removed again if the save fails)."""
    if path.exists() or path.is_symlink():
        raise FileExistsError(f"{path} already exists; refusing to overwrite it")
    created = []
    parent = path.parent
    missing = []
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"cannot save to {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot save to {path}: directory {parent} is not writable")
    for d in reversed(missing):
        d.mkdir()
        created.append(d)
    return created


def _scales_to(scales, dtype, key: str) -> np.ndarray:
    """Scales cast to the export dtype; a value that float16 cannot hold (overflow to inf, or a
    nonzero scale that underflows to 0) is an error, never a silently different weight."""
    a = _to_host(scales).astype(np.float32)
    out = a.astype(dtype)
    bad = ~np.isfinite(out) | ((out == 0) & (a != 0))
    if bad.any():
        raise ValueError(
            f"{key}: {int(bad.sum())} scale(s) (e.g. {float(a[bad][0]):.3g}) do not fit "
            f"{np.dtype(dtype).name}; save with scale_dtype='float32'"
        )
    return out


def _leaves_digest(leaves_meta) -> str:
    """sha256 of the canonical JSON of the leaf metadata (shapes, group sizes, asymmetry...)."""
    return hashlib.sha256(json.dumps(leaves_meta, sort_keys=True).encode()).hexdigest()


def _to_host(x) -> np.ndarray:
    a = np.asarray(jax.device_get(x))
    if a.dtype == object:
        raise TypeError(f"cannot save a leaf of type {type(x).__name__}")
    return a


def save_ternary(path: str | os.PathLike, tree: Any, scale_dtype: str = "float16") -> Path:
    """Save a pytree whose leaves are ``TernaryTensor`` s (packed) or plain arrays (kept as they are).

    Args:
      path: the directory to create. It must not exist; missing parents are created.
      tree: nested dicts / lists / tuples (a Linen variables dict, a ``quantize_params(mode="ternary")``
        result, ...). Leaves: ``TernaryTensor`` (codes packed 4 per byte, scales cast to
        ``scale_dtype``), arrays (numpy / jax, any dtype, stored unchanged: BN statistics, biases, FP
        first/last layers) and Python scalars / strings (stored in the JSON).
      scale_dtype: "float16" (default) or "float32".

    Returns:
      the absolute path written.

    Atomic: everything is written into a temporary sibling directory renamed to ``path`` at the end;
    on any error the temporary directory (and any parent created here) is removed and nothing is
    left behind. Raises FileExistsError (path exists), PermissionError / NotADirectoryError (parent
    not writable / not a directory), TypeError (unsupported leaf), ValueError (bad scale_dtype or codes).
    """
    import orbax.checkpoint as ocp

    if scale_dtype not in _SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be one of {sorted(_SCALE_DTYPES)}, got {scale_dtype!r}")
    sdt = _SCALE_DTYPES[scale_dtype]
    path = Path(path).expanduser().absolute()

    # Build everything in memory first: a bad leaf fails before anything touches the disk.
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_ternary)
    arrays: dict[str, dict[str, np.ndarray]] = {}
    leaves_meta = []
    for i, (kpath, leaf) in enumerate(flat):
        name = f"leaf_{i:05d}"
        jpath = [_key_to_json(k) for k in kpath]
        entry: dict[str, Any] = {"name": name, "path": jpath, "key": _path_str(jpath)}
        if is_ternary(leaf):
            codes = _to_host(leaf.codes)
            shape = tuple(int(d) for d in leaf.shape)
            if codes.shape != shape:
                raise ValueError(f"{entry['key']}: codes shape {codes.shape} != TernaryTensor.shape {shape}")
            store = {"packed": pack_codes(codes), "scales": _scales_to(leaf.scales, sdt, entry["key"])}
            if leaf.neg_scales is not None:
                store["neg_scales"] = _scales_to(leaf.neg_scales, sdt, entry["key"])
            entry.update(
                kind="ternary",
                shape=list(shape),
                group_size=_json_static(leaf.group_size),
                grouping=_json_static(leaf.grouping),
                method=_json_static(leaf.method),
                scales_shape=list(store["scales"].shape),
                asymmetric=leaf.neg_scales is not None,
            )
            arrays[name] = store
            entry["digest"] = checkpoint.tree_digests(store)
        elif isinstance(leaf, (str, bool, int, float)) and not isinstance(leaf, np.generic):
            entry.update(kind="python", value=leaf)
        else:
            a = _to_host(leaf)
            entry.update(kind="array", shape=list(a.shape), dtype=a.dtype.str)
            if a.size == 0:
                entry["kind"] = "empty"  # orbax refuses zero-size arrays; shape+dtype say it all
            else:
                arrays[name] = {"array": a}
                entry["digest"] = checkpoint.tree_digests(arrays[name])
        leaves_meta.append(entry)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "scale_dtype": scale_dtype,
        "leaves": leaves_meta,
        "leaves_sha256": _leaves_digest(leaves_meta),
    }
    meta_text = json.dumps(meta, separators=(",", ":"))  # compact: it counts in the export size

    created = _check_target(path)

    def write(tmp: Path) -> None:
        if arrays:
            with ocp.PyTreeCheckpointer() as ckptr:
                ckptr.save(tmp / ARRAYS_DIR, arrays)
        (tmp / META_FILE).write_text(meta_text + "\n")

    try:
        return replace_dir(path, write, overwrite=False)
    except BaseException:
        for d in reversed(created):
            shutil.rmtree(d, ignore_errors=True)
        raise


def _read_meta(path: Path) -> dict:
    return checkpoint.read_format_metadata(
        path, META_FILE, FORMAT, FORMAT_VERSION,
        what="ternary export", writer="fgq_jax.packing.save_ternary",
    )


def _check_ternary_entry(e: dict, stored: dict, path: Path) -> None:
    """The stored scales must have the shape the metadata's grouping implies, and be present for
    both signs exactly when the entry says asymmetric."""
    want = list(scales_shape(e["shape"], e["group_size"], e["grouping"]))
    for name in ("scales", "neg_scales"):
        if name in stored and list(np.shape(stored[name])) != want:
            raise ValueError(f"{path} ({e['key']}): {name} of shape {list(np.shape(stored[name]))} do "
                             f"not fit group_size={e['group_size']!r}, grouping={e['grouping']!r} of "
                             f"a {e['shape']} kernel (expected {want}); metadata and arrays disagree")
    if bool(e.get("asymmetric")) != ("neg_scales" in stored):
        raise ValueError(f"{path} ({e['key']}): asymmetric={e.get('asymmetric')!r} but negative "
                         f"scales are {'present' if 'neg_scales' in stored else 'absent'}")


def load_ternary(path: str | os.PathLike, target: Any = None) -> Any:
    """Load what :func:`save_ternary` wrote.

    Ternary leaves come back as ``TernaryTensor`` (codes int8 exactly as saved; scales float32 equal
    to the stored fp16/fp32 values), arrays as numpy arrays with their saved dtype and shape.

    Args:
      target: optional tree with the saved structure (e.g. the tree that was saved); the leaves are
        then put back into its exact tree type (FrozenDict, tuples, dataclasses, ...). Without it the
        result is built from nested dicts (lists for sequences).
    """
    path = Path(path).expanduser().absolute()
    meta = _read_meta(path)
    if "leaves_sha256" in meta and _leaves_digest(meta["leaves"]) != meta["leaves_sha256"]:
        raise ValueError(f"{path / META_FILE}: the leaf metadata does not match its sha256 checksum "
                         "(edited or damaged); refusing to reinterpret the stored codes")
    restored: dict = {}
    if any(e["kind"] in ("ternary", "array") for e in meta["leaves"]):
        ckpt = path / ARRAYS_DIR
        if not ckpt.is_dir():
            raise ValueError(f"{path}: {ARRAYS_DIR}/ is missing (incomplete or damaged export)")
        restored = checkpoint.restore_numpy_tree(ckpt)

    entries = []
    for e in meta["leaves"]:
        kind = e["kind"]
        if e.get("digest") is not None:
            checkpoint.verify_digests(restored[e["name"]], e["digest"], f"{path} ({e['key']})")
        if kind == "ternary":
            st = restored[e["name"]]
            _check_ternary_entry(e, st, path)
            codes = unpack_codes(np.asarray(st["packed"], np.uint8), e["shape"])
            neg = st.get("neg_scales") if e.get("asymmetric") else None
            leaf = _make_ternary(
                codes,
                np.asarray(st["scales"]).astype(np.float32),
                None if neg is None else np.asarray(neg).astype(np.float32),
                e,
            )
        elif kind == "array":
            leaf = np.asarray(restored[e["name"]]["array"], dtype=np.dtype(e["dtype"])).reshape(e["shape"])
        elif kind == "empty":
            leaf = np.zeros(e["shape"], np.dtype(e["dtype"]))
        elif kind == "python":
            leaf = e["value"]
        else:
            raise ValueError(f"{path}: unknown leaf kind {kind!r}")
        entries.append((e["path"], leaf))

    if target is not None:
        treedef = jax.tree_util.tree_structure(target, is_leaf=is_ternary)
        if treedef.num_leaves != len(entries):
            raise ValueError(
                f"target has {treedef.num_leaves} leaves but the export holds {len(entries)}"
            )
        return jax.tree_util.tree_unflatten(treedef, [leaf for _, leaf in entries])
    if not entries:
        return {}
    return _rebuild(entries)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def export_size_report(path: str | os.PathLike) -> dict[str, Any]:
    """Sizes of a saved export.

    Returns a dict with
      bytes_on_disk: apparent size of every file under ``path`` (orbax container overhead included);
      num_weights: weights in all array/ternary leaves; num_ternary_weights: in ternary leaves;
      ternary_payload_bytes: packed codes + scales of the ternary leaves (what a runtime loads);
      bits_per_ternary_weight: ``8 * ternary_payload_bytes / num_ternary_weights`` (2 + scale bits/N);
      bits_per_weight_on_disk: ``8 * bytes_on_disk / num_weights`` (everything, FP leaves included);
      fp32_bytes: the same weights stored as float32, and compression (fp32_bytes / bytes_on_disk).
    """
    path = Path(path).expanduser().absolute()
    meta = _read_meta(path)
    sb = np.dtype(_SCALE_DTYPES[meta["scale_dtype"]]).itemsize
    n_all = n_tern = payload = 0
    for e in meta["leaves"]:
        if e["kind"] == "ternary":
            n = math.prod(e["shape"])
            n_tern += n
            n_all += n
            n_scales = math.prod(e["scales_shape"]) * (2 if e.get("asymmetric") else 1)
            payload += packed_size(n) + n_scales * sb
        elif e["kind"] in ("array", "empty"):
            n_all += math.prod(e["shape"])
    on_disk = _dir_bytes(path)
    return {
        "path": str(path),
        "bytes_on_disk": on_disk,
        "num_weights": n_all,
        "num_ternary_weights": n_tern,
        "ternary_payload_bytes": payload,
        "bits_per_ternary_weight": 8 * payload / n_tern if n_tern else 0.0,
        "bits_per_weight_on_disk": 8 * on_disk / n_all if n_all else 0.0,
        "fp32_bytes": 4 * n_all,
        "compression": 4 * n_all / on_disk if on_disk else 0.0,
        "scale_dtype": meta["scale_dtype"],
    }
