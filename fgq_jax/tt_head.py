"""TT and ternary-TT classifier heads on frozen features (issue 14, part 3).

The experiment behind ``python -m experiments.tt_head``:

1. Freeze a pretrained CIFAR ResNet and cache its pre-pool features (the input of the global
   average pool, e.g. ResNet-20's ``stage3_block2`` output [8, 8, 64], flattened in (h, w, c) order
   to 4,096 values) for the train and test splits. The features are captured with Flax's
   ``capture_intermediates`` during the unmodified forward; :func:`extract_features` checks that
   average-pooling them through the model's own ``fc`` reproduces its logits.
2. Train a wide full-precision head ``Dense(hidden) -> ReLU -> Dense(classes)`` on the cached
   features (Adam, no augmentation).
3. Replace ``fc1`` (4,096 x hidden) by a TT layer (:class:`fgq_jax.tt.TTDense`) at several ranks,
   initialised (``init="svd"``) by TT-SVD of the trained kernel (the FP head's fc1 bias and fc2
   kept); evaluate, fine-tune the cores, fc1's bias and ``fc2`` briefly, evaluate. Control
   (``init="random"``): the same TT head trained for as long from a random init.
4. Ternarize each trained TT head's cores with FGQ groups of N
   (:func:`fgq_jax.tt.ternarize_tt_cores`) and evaluate (stage "ptq"); for the inits in
   ``ste_from``, also after a short straight-through fine-tune from the float cores
   (``TTDense(quant=WeightQuant(...))``, stage "ste"). The dense fc1 is ternarized for reference.

Every row carries fc1's storage (``fc1_bits``: fp32 weights, or 2-bit codes + fp16 scales) and
``fc1_compression`` = dense fp32 bits / ``fc1_bits``; ``head_compression`` counts the whole head
(biases and fc2 stay fp32). ``fc1_macs`` is per example (:func:`fgq_jax.tt.tt_macs`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fgq_jax import fileio, tt
from fgq_jax.transforms import WeightQuant

COLUMNS = (
    "variant", "rank", "init", "group_size", "stage", "top1", "fc1_params", "fc1_bits", "fc1_compression",
    "head_compression", "fc1_macs", "fc1_rel_error", "epochs", "seconds",
)


@dataclasses.dataclass(frozen=True)
class TTHeadConfig:
    """The experiment (every field is stored in the results JSON).

    checkpoint: PyTorch checkpoint (or orbax directory) of ``model``; "{shared}" expands to the
      shared data root. feature_layer: the module whose output is the global pool's input.
    in_modes / out_modes: TT factorization of fc1 (prod = feature size / hidden).
    ranks: uniform internal TT-ranks to try. group_sizes: FGQ group sizes for the ternary cores.
    *_epochs: passes over the cached train features (FP head, TT fine-tune, STE fine-tune).
    dense_ste: also STE-fine-tune the ternarized dense fc1. random_init: also train each TT head
      from a random init (``TTDense``'s default init, fc2 too) for ``tt_epochs`` (rows with
      init "random"): the control for the TT-SVD init. ste_from: the inits ("svd", "random") whose
      trained TT heads get the STE fine-tune with ternary cores.
    train_limit / test_limit: n images of each split, as many of each class
      (:func:`fgq_jax.loading.load_labeled`; smoke tests only).
    """

    name: str = "tt_head"
    model: str = "resnet20"
    checkpoint: str = "{shared}/models/cifar-resnet/resnet20-12fca82f.th"
    dataset: str = "cifar10_jpeg"
    feature_layer: str = "stage3_block2"
    hidden: int = 1024
    in_modes: tuple = (8, 8, 8, 8)
    out_modes: tuple = (4, 8, 8, 4)
    ranks: tuple = (1, 2, 4, 8, 16)
    group_sizes: tuple = (4, 16)
    method: str = "exact"
    fp_epochs: int = 3
    tt_epochs: int = 2
    ste_epochs: int = 1
    dense_ste: bool = True
    random_init: bool = True
    ste_from: tuple = ("svd", "random")
    batch_size: int = 256
    lr: float = 1e-3
    tt_lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    extract_batch: int = 500
    train_limit: int | None = None
    test_limit: int | None = None

    def __post_init__(self):
        tt.check_tt_shape(self.in_modes, self.out_modes)
        if math.prod(self.out_modes) != self.hidden:
            raise ValueError(f"prod(out_modes={self.out_modes}) = {math.prod(self.out_modes)} != hidden = {self.hidden}")
        for r in self.ranks:
            tt.normalize_ranks(r, len(self.in_modes))


# ==================================================================================================
# features
# ==================================================================================================
def extract_features(module: nn.Module, variables: Any, images: np.ndarray, layer: str, *,
                     family: str = "cifar", batch_size: int = 500, fc: str = "fc",
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Pre-pool features and logits of a frozen model.

    Args:
      module, variables: the model (eval mode: ``train=False``) and its variables.
      images: uint8 [N, H, W, C]. layer: name of the module whose output is the global pool's input.
      fc: the model's classifier (Dense after the pool), used for the check below.
    Returns:
      (features float32 [N, h*w*c] flattened in (h, w, c) order, logits float32 [N, classes]).
    Raises ValueError when ``mean_hw(features) @ fc`` differs from the logits (then ``layer`` is not
    the pool's input).
    """
    from fgq_jax.data import batches, normalize

    kernel = variables["params"][fc]["kernel"]
    bias = variables["params"][fc]["bias"]

    @jax.jit
    def forward(x):
        logits, state = module.apply(
            variables, normalize(x, family), train=False, mutable=["intermediates"],
            capture_intermediates=lambda m, method: m.name == layer and method == "__call__")
        feat = state["intermediates"][layer]["__call__"][0]
        err = jnp.max(jnp.abs(jnp.mean(feat, axis=(1, 2)) @ kernel + bias - logits))
        return feat.reshape(feat.shape[0], -1), logits, err

    feats, logits, worst = [], [], 0.0
    for x, _, mask in batches(images, np.zeros(len(images), np.int32), batch_size):
        f, lg, err = forward(x)
        m = np.asarray(mask)
        feats.append(np.asarray(f)[m])
        logits.append(np.asarray(lg)[m])
        worst = max(worst, float(err))
    if worst > 1e-3:
        raise ValueError(f"average-pooled output of {layer!r} does not reproduce the logits "
                         f"(max |diff| {worst:.3g}): it is not the global pool's input")
    return np.concatenate(feats), np.concatenate(logits)


def cached_features(cfg: TTHeadConfig, split: str, cache_dir: Path | None = None):
    """(features float32 [N, F], labels int32 [N], model logits [N, classes]) of one split, cached
    under ``<repo>/.cache/tt_head/`` (keyed by model, checkpoint, layer, dataset, split, limit)."""
    from fgq_jax.loading import load_labeled, load_model

    limit = cfg.train_limit if split == "train" else cfg.test_limit
    key = "|".join(map(str, (cfg.model, cfg.checkpoint, cfg.feature_layer, cfg.dataset, split, limit)))
    cache_dir = Path(cache_dir) if cache_dir else fileio.REPO_ROOT / ".cache" / "tt_head"
    path = cache_dir / f"{cfg.model}_{cfg.dataset}_{split}_{hashlib.sha256(key.encode()).hexdigest()[:12]}.npz"
    if path.exists():
        with np.load(path) as z:
            return z["features"], z["labels"], z["logits"]
    images, labels = load_labeled(cfg.dataset, split, limit)
    spec, variables = load_model(cfg.model, cfg.checkpoint)
    feats, logits = extract_features(spec.module, variables, images, cfg.feature_layer,
                                     family=spec.dataset_family, batch_size=cfg.extract_batch)
    with fileio.atomic_file(path) as f:
        np.savez(f, features=feats, labels=labels.astype(np.int32), logits=logits)
    return feats, labels.astype(np.int32), logits


# ==================================================================================================
# heads
# ==================================================================================================
class Head(nn.Module):
    """``fc1 -> ReLU -> fc2``: fc1 a Dense (``ranks`` None) or a TTDense (optionally ternary-STE)."""

    hidden: int
    num_classes: int
    in_modes: tuple = ()
    out_modes: tuple = ()
    ranks: Any = None
    quant: Any = None  # WeightQuant: ternary fc1 (dense or TT cores) with straight-through gradients

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.ranks is None:
            if self.quant is None:
                h = nn.Dense(self.hidden, name="fc1")(x)
            else:
                from fgq_jax.ternary import ternarize_ste

                q = self.quant
                k = self.param("kernel_fc1", nn.initializers.lecun_normal(), (x.shape[-1], self.hidden))
                h = x @ ternarize_ste(k, q.group_size, q.method) + self.param(
                    "bias_fc1", nn.initializers.zeros, (self.hidden,))
        else:
            h = tt.TTDense(self.in_modes, self.out_modes, self.ranks, quant=self.quant, name="fc1")(x)
        return nn.Dense(self.num_classes, name="fc2")(nn.relu(h))


def _dense_ste_params(params):
    """Head params with a plain Dense fc1 <-> the names of Head(quant=...) without ranks."""
    if "fc1" in params:
        return {"kernel_fc1": params["fc1"]["kernel"], "bias_fc1": params["fc1"]["bias"], "fc2": params["fc2"]}
    return {"fc1": {"kernel": params["kernel_fc1"], "bias": params["bias_fc1"]}, "fc2": params["fc2"]}


def evaluate(head: Head, params, feats: np.ndarray, labels: np.ndarray, batch_size: int = 1000) -> float:
    """Top-1 (%) of ``head`` on cached features."""
    from fgq_jax.data import batches

    @jax.jit
    def correct(p, x, y, m):
        return jnp.sum((jnp.argmax(head.apply({"params": p}, x), -1) == y) & m)

    total = sum(int(correct(params, x, y, m)) for x, y, m in batches(feats, labels, batch_size))
    return 100.0 * total / len(labels)


def train(head: Head, params, feats, labels, *, epochs: int, lr: float, weight_decay: float,
          batch_size: int, seed: int):
    """AdamW with a cosine schedule over ``epochs`` passes; returns the trained params."""
    from fgq_jax.data import num_batches, train_batches

    steps = max(1, epochs * num_batches(len(labels), batch_size, drop_remainder=True))
    opt = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=weight_decay)
    state = opt.init(params)

    @jax.jit
    def step(p, s, x, y):
        def loss(p):
            logits = head.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        g = jax.grad(loss)(p)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s

    for epoch in range(epochs):
        for x, y in train_batches(feats, labels, batch_size, seed, epoch):
            params, state = step(params, state, x, y)
    return params


# ==================================================================================================
# accounting of the head
# ==================================================================================================
def _fc1_storage(cfg: TTHeadConfig, rank: Any, group_size: Any, feat_dim: int) -> tuple[int, int, int]:
    """(fc1 weights, fc1 bits, fc1 MACs per example) of a dense (rank None) or TT fc1."""
    from fgq_jax import accounting

    if rank is None:
        layer = accounting.LayerShape("fc1", "dense", (feat_dim, cfg.hidden), (cfg.hidden,))
        rep = accounting.count_ops([layer], {"fc1": group_size})
        return layer.num_weights, rep.weight_bits, layer.macs
    return (tt.tt_params(cfg.in_modes, cfg.out_modes, rank),
            tt.tt_bits(cfg.in_modes, cfg.out_modes, rank, group_size),
            tt.tt_macs(cfg.in_modes, cfg.out_modes, rank))


def _row(cfg, variant, rank, group_size, stage, top1, feat_dim, classes, *, init=None, rel_error=None,
         epochs=0, seconds=0.0) -> dict:
    params, bits, macs = _fc1_storage(cfg, rank, group_size, feat_dim)
    dense_bits = 32 * feat_dim * cfg.hidden
    other_bits = 32 * (cfg.hidden + cfg.hidden * classes + classes)  # fc1 bias, fc2: fp32
    return {
        "variant": variant, "rank": rank, "init": init, "group_size": group_size, "stage": stage, "top1": top1,
        "fc1_params": params, "fc1_bits": bits, "fc1_compression": dense_bits / bits,
        "head_compression": (dense_bits + other_bits) / (bits + other_bits), "fc1_macs": macs,
        "fc1_rel_error": rel_error, "epochs": epochs, "seconds": seconds,
    }


# ==================================================================================================
# the experiment
# ==================================================================================================
def run(cfg: TTHeadConfig, log=print) -> tuple[list[dict], dict]:
    """Run the experiment; returns (rows, extra facts for the JSON)."""
    t_start = time.perf_counter()
    xtr, ytr, _ = cached_features(cfg, "train")
    xte, yte, logits_te = cached_features(cfg, "test")
    feat_dim, classes = xtr.shape[1], int(logits_te.shape[1])
    if math.prod(cfg.in_modes) != feat_dim:
        raise ValueError(f"prod(in_modes={cfg.in_modes}) = {math.prod(cfg.in_modes)} != feature size {feat_dim}")
    model_top1 = 100.0 * float(np.mean(np.argmax(logits_te, -1) == yte))
    log(f"[tt_head] features {xtr.shape} / {xte.shape} in {time.perf_counter() - t_start:.0f} s; "
        f"{cfg.model} itself: {model_top1:.2f}%")
    fit = dict(weight_decay=cfg.weight_decay, batch_size=cfg.batch_size, seed=cfg.seed)
    rows = []

    def add(*args, **kw):
        rows.append(_row(cfg, *args, feat_dim, classes, **kw))
        r = rows[-1]
        log(f"[tt_head] {r['variant']:<10} rank={r['rank']!s:<4} init={r['init']!s:<6} N={r['group_size']!s:<4} "
            f"{r['stage']:<9} "
            f"top-1 {r['top1']:6.2f}%  fc1 x{r['fc1_compression']:,.1f}  ({r['seconds']:.0f} s)")

    # FP head
    dense = Head(cfg.hidden, classes)
    t = time.perf_counter()
    params = dense.init(jax.random.key(cfg.seed), jnp.zeros((1, feat_dim)))["params"]
    w0 = np.asarray(params["fc1"]["kernel"])
    params = train(dense, params, xtr, ytr, epochs=cfg.fp_epochs, lr=cfg.lr, **fit)
    add("dense", None, None, "trained", evaluate(dense, params, xte, yte),
        epochs=cfg.fp_epochs, seconds=time.perf_counter() - t)
    w1 = np.asarray(params["fc1"]["kernel"])

    # dense fc1 ternarized (reference points)
    for n in cfg.group_sizes:
        q = WeightQuant(cfg.method, n)
        qhead = Head(cfg.hidden, classes, quant=q)
        qp = _dense_ste_params(params)
        t = time.perf_counter()
        add("dense", None, n, "ptq", evaluate(qhead, qp, xte, yte), seconds=time.perf_counter() - t)
        if cfg.dense_ste and cfg.ste_epochs:
            t = time.perf_counter()
            qp = train(qhead, qp, xtr, ytr, epochs=cfg.ste_epochs, lr=cfg.tt_lr, **fit)
            add("dense", None, n, "ste", evaluate(qhead, qp, xte, yte), epochs=cfg.ste_epochs,
                seconds=time.perf_counter() - t)

    # TT fc1 at each rank
    for rank in cfg.ranks:
        ranks = tt.clip_ranks(rank, cfg.in_modes, cfg.out_modes)
        thead = Head(cfg.hidden, classes, cfg.in_modes, cfg.out_modes, ranks)
        tp = {"fc1": tt.tt_dense_params(w1, params["fc1"]["bias"], cfg.in_modes, cfg.out_modes, ranks),
              "fc2": params["fc2"]}
        rel = float(np.linalg.norm(np.asarray(tt.tt_to_dense(tt.tt_cores_of(tp["fc1"]))) - w1) / np.linalg.norm(w1))
        add("tt", rank, None, "svd", evaluate(thead, tp, xte, yte), init="svd", rel_error=rel)
        trained = {"svd": tp}
        if cfg.random_init:
            trained["random"] = thead.init(jax.random.key(cfg.seed + 1), jnp.zeros((1, feat_dim)))["params"]
        for init, p0 in trained.items():
            t = time.perf_counter()
            trained[init] = train(thead, p0, xtr, ytr, epochs=cfg.tt_epochs, lr=cfg.tt_lr, **fit)
            add("tt", rank, None, "finetuned", evaluate(thead, trained[init], xte, yte), init=init,
                rel_error=rel if init == "svd" else None, epochs=cfg.tt_epochs, seconds=time.perf_counter() - t)
        for init, tp in trained.items():
            for n in cfg.group_sizes:
                fake = tt.ternarize_tt_cores(tt.tt_cores_of(tp["fc1"]), n, cfg.method, mode="fake")
                qp = {"fc1": {**tp["fc1"], **{f"core{k}": c for k, c in enumerate(fake)}}, "fc2": tp["fc2"]}
                add("tt_ternary", rank, n, "ptq", evaluate(thead, qp, xte, yte), init=init)
                if cfg.ste_epochs and init in cfg.ste_from:
                    qhead = thead.clone(quant=WeightQuant(cfg.method, n))
                    t = time.perf_counter()
                    sp = train(qhead, tp, xtr, ytr, epochs=cfg.ste_epochs, lr=cfg.tt_lr, **fit)
                    add("tt_ternary", rank, n, "ste", evaluate(qhead, sp, xte, yte), init=init,
                        epochs=cfg.ste_epochs, seconds=time.perf_counter() - t)
    # how far training moved fc1 from its random init (what TT-SVD has to compress besides the init)
    update = float(np.linalg.norm(w1 - w0) / np.linalg.norm(w1))
    extra = {"model_top1": model_top1, "fc1_update_rel_norm": update, "num_train": int(len(ytr)), "num_test": int(len(yte)),
             "feature_dim": feat_dim, "num_classes": classes, "seconds": time.perf_counter() - t_start}
    return rows, extra


def results_paths(cfg: TTHeadConfig, out_root: Path | None = None) -> dict[str, Path]:
    base = (Path(out_root) if out_root else fileio.REPO_ROOT / "results") / cfg.dataset / cfg.model / cfg.name
    return {s: base.with_suffix("." + s) for s in ("csv", "json", "png")}


def write_results(cfg: TTHeadConfig, rows, extra, meta, out_root: Path | None = None) -> dict[str, Path]:
    """results/<dataset>/<model>/<name>.{csv,json,png}."""
    paths = results_paths(cfg, out_root)
    fileio.write_csv(paths["csv"], rows, COLUMNS)
    fileio.write_json(paths["json"], {"metadata": meta, **extra, "rows": rows})
    replot(cfg, out_root)
    return paths


def replot(cfg: TTHeadConfig, out_root: Path | None = None) -> Path:
    """Draw <name>.png from the rows of an existing <name>.json."""
    import json

    paths = results_paths(cfg, out_root)
    saved = json.loads(paths["json"].read_text())
    return plot(saved["rows"], saved.get("model_top1"), paths["png"], title=f"{cfg.model} {cfg.dataset}: TT "
                f"fc1 of a {math.prod(cfg.in_modes)}-{cfg.hidden}-{saved.get('num_classes', '?')} head on frozen features")


def plot(rows, model_top1: float | None, path: Path, title: str = "") -> Path:
    """top-1 vs fc1 compression (log x): one curve per (variant, N, stage)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[tuple, list] = {}  # (colour key, dashed, label) -> points
    for r in rows:
        init = {"svd": "TT-SVD init", "random": "random init"}.get(r["init"], "")
        if r["variant"] == "dense":
            label = "dense FP head" if r["group_size"] is None else f"dense ternary N={r['group_size']} (post-training)"
        elif r["variant"] == "tt":
            label = "TT-SVD, no fine-tune" if r["stage"] == "svd" else f"TT, {init}, trained"
        else:
            how = "post-training" if r["stage"] == "ptq" else "STE fine-tune"
            label = f"TT ternary N={r['group_size']}, {init}, {how}"
        colour = (r["variant"], r["init"] if r["variant"] != "dense" else None, r["group_size"])
        curves.setdefault((colour, r["stage"] in ("ptq", "svd"), label), []).append((r["fc1_compression"], r["top1"]))
    colours = {}
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for (colour, dashed, label), pts in curves.items():
        pts.sort()
        c = plt.cm.tab10(len(colours) % 10) if colour not in colours else colours[colour]
        colours[colour] = c
        ax.plot(*zip(*pts), "--" if dashed else "-", color=c, marker="o", ms=4, label=label,
                alpha=0.55 if dashed else 1.0)
    if model_top1 is not None:
        ax.axhline(model_top1, color="gray", lw=0.8, label=f"model's own fc ({model_top1:.2f}%)")
    ax.set_xscale("log")
    ax.set_xlabel("fc1 compression (dense fp32 bits / stored bits)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6.5, loc="lower left")
    fig.tight_layout()
    with fileio.atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return path


def write_compression_table(out_root: Path | None = None, meta: dict | None = None) -> dict[str, Path]:
    """results/tt_compression.{md,json}: :func:`fgq_jax.tt.paper_fc_compression`."""
    root = Path(out_root) if out_root else fileio.REPO_ROOT / "results"
    table = tt.paper_fc_compression()
    paths = {"md": root / "tt_compression.md", "json": root / "tt_compression.json"}
    fileio.atomic_write_text(paths["md"], tt.compression_markdown(table))
    fileio.write_json(paths["json"], {"metadata": meta or {}, **table})
    return paths
