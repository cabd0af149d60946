"""fgq_jax.train: config validation, optimizer/schedule validation, weight-decay mask, distillation
loss, STE gradients, a tiny quantized fine-tune that learns, exact kill-and-resume, refused resumes,
interrupted writes, the CLI (also on 8 devices with --mesh) and the results files; and the
fine-tune's epoch 0 equals the sweep's point for the same recipe (real ResNet-20).

Everything else runs a tiny CNN (defined here) on a tiny synthetic set, so it takes seconds.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgq_jax import train as T
from fgq_jax.activations import Calibration
from fgq_jax.configfile import load_config, replace_config
from fgq_jax.data import augment_cifar, default_shared_dir, epoch_permutation
from fgq_jax.loading import balanced_subset
from fgq_jax.recipe import QuantRecipe

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent
if str(REPO) not in sys.path:  # experiments/ is not an installed package
    sys.path.insert(0, str(REPO))
SHAPE = (8, 8, 3)


# --------------------------------------------------------------------------------------------------
# a tiny model, data and variables (numpy-initialised: no RNG compile)
# --------------------------------------------------------------------------------------------------
class TinyCNN(nn.Module):
    """conv_init (FP first layer) -> conv_a, conv_b (quantized) -> fc (FP last layer), with BN."""

    num_classes: int = 5  # 5: the smallest head the Evaluator takes (it reports top-5)

    @nn.compact
    def __call__(self, x, train: bool = False):
        for name, ch, stride in (("conv_init", 8, 1), ("conv_a", 8, 1), ("conv_b", 16, 2)):
            x = nn.Conv(ch, (3, 3), strides=stride, use_bias=False, name=name)(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=f"bn_{name}")(x)
            x = nn.relu(x)
        return nn.Dense(self.num_classes, name="fc")(x.mean(axis=(1, 2)))


def tiny_spec(num_classes=None):
    return types.SimpleNamespace(
        module=TinyCNN(num_classes or 5), name="tiny", first_layer="conv_init", last_layer="fc",
        input_shape=SHAPE, num_classes=num_classes or 5, dataset_family="cifar",
    )


def np_init(module, seed=0):
    """Variables with the shapes of module.init, filled with numpy (He-normal kernels)."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, *SHAPE)), train=False))
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(s.shape[:-1]))
            return jnp.asarray(rng.normal(0, np.sqrt(2.0 / fan_in), s.shape), s.dtype)
        if name in ("scale", "var"):
            return jnp.ones(s.shape, s.dtype)
        return jnp.zeros(s.shape, s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def tiny_data():
    return T.synthetic_arrays(192, SHAPE, 5, split="train"), T.synthetic_arrays(96, SHAPE, 5, split="test")


# no repair: its compilations would double the tiny tests' time (the ResNet-20 epoch-0 test has them)
TINY_RECIPE = QuantRecipe.make(method="exact", group_size=4, act_bits=8, calibration=Calibration("max"),
                               num_calib=64, num_repair=96)
FP_RECIPE = QuantRecipe.make(method="fp", act_bits=None)


def tiny_config(**kw):
    """The tiny quantized run; ``kw``: config fields or recipe settings (flat names)."""
    base = T.TrainConfig(
        name="tiny", model="test_train:tiny_spec", dataset="synthetic", recipe=TINY_RECIPE,
        optimizer="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4, schedule="cosine",
        warmup_epochs=0.5, epochs=2, batch_size=32, seed=3, checkpoint_every=4, max_to_keep=3,
        eval_batch_size=48, progress=False, time_steps=0, train_subset=192, test_subset=96, export=False,
    )
    return replace_config(base, **kw)


def run_fit(cfg, workdir, **kw):
    (tr, te), spec = tiny_data(), tiny_spec()
    return T.fit(cfg, workdir, spec=spec, train_data=tr, test_data=te,
                 init_variables=np_init(spec.module), **kw)


def leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def tree_digest(root: Path) -> dict[str, str]:
    """path -> sha256 of every file under root (directories included as entries)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
    return out


def child_run(workdir: str, kill_at: int) -> None:
    """Run in a subprocess: the reference fine-tune, SIGKILLed right after step `kill_at`."""
    import signal

    def hook(step, state):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    run_fit(tiny_config(), workdir, hooks=[hook])
    raise AssertionError("the run should have been killed")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted quantized run (2 epochs x 6 steps, checkpoints every 4 steps)."""
    wd = tmp_path_factory.mktemp("ref")
    summary = run_fit(tiny_config(), wd)
    return wd, summary


# --------------------------------------------------------------------------------------------------
# optimizer, schedules, mask, losses
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, msg", [
    (dict(name="rmsprop"), "unknown optimizer"),
    (dict(schedule="linear"), "unknown schedule"),
    (dict(lr=0.0), "learning rate"),
    (dict(lr=-0.1), "learning rate"),
    (dict(lr=float("nan")), "learning rate"),
    (dict(lr="0.1"), "learning rate"),
    (dict(weight_decay=-1.0), "weight_decay"),
])
def test_make_optimizer_rejects_bad_input(kw, msg):
    args = dict(name="sgd", lr=0.1, schedule="cosine")
    args.update(kw)
    with pytest.raises(ValueError, match=msg):
        T.make_optimizer(args.pop("name"), args.pop("lr"), args.pop("schedule"), total_steps=10, **args)


@pytest.mark.parametrize("field, value, msg", [
    ("optimizer", "lamb", "unknown optimizer"), ("schedule", "poly", "unknown schedule"),
    ("lr", 0, "learning rate"), ("lr", -1e-3, "learning rate"), ("distill_alpha", 1.5, "distill_alpha"),
    ("epochs", 0, "epochs"), ("train_subset", 0, "train_subset"), ("act_bits", 0, "act_bits"),
    ("first_last", "4", "first_last"), ("scale_fit", True, "STE forward re-ternarizes"),
])
def test_config_validation_and_cli_fail_fast(field, value, msg, tmp_path):
    with pytest.raises(ValueError, match=msg):  # at construction (recipe settings: by flat name)
        replace_config(T.TrainConfig(), **{field: value})
    from experiments import finetune

    with pytest.raises(SystemExit, match=msg):  # before any data or model is loaded
        finetune.main(["--config", str(REPO / "experiments/configs/finetune_resnet20_n64.py"),
                       "--set", f"{field}={value!r}", "--workdir", str(tmp_path / "w")])
    assert not (tmp_path / "w").exists()


def test_config_is_validated_whole_and_round_trips():
    from fgq_jax.train.config import _CHECKS

    fields = {f.name for f in dataclasses.fields(T.TrainConfig)}
    assert fields - set(_CHECKS) == {"lr"}  # every field has a check (lr: check_lr)
    c = tiny_config(group_size="channel", asymmetric=True, act_bits=4, calibration=Calibration("percentile"),
                    step_boundaries=(0.3, 0.6), distill=True)
    d = json.loads(json.dumps(c.to_dict()))
    assert T.TrainConfig.from_dict(d) == c and d["recipe"] == c.recipe.to_dict()
    assert T.TrainConfig(recipe={"group_size": 16}).recipe == QuantRecipe.make(group_size=16)
    with pytest.raises(ValueError, match="did you mean 'recipe'"):
        T.TrainConfig.from_dict({**d, "recipes": {}})
    with pytest.raises(ValueError, match="TrainConfig.recipe must be a QuantRecipe"):
        T.TrainConfig(recipe=3)
    assert not T.TrainConfig(recipe=FP_RECIPE).quantized and tiny_config().quantized


def test_load_config_configdict_and_overrides(tmp_path):
    f = tmp_path / "cfg.py"
    f.write_text("import ml_collections\n\ndef get_config():\n    c = ml_collections.ConfigDict()\n"
                 "    c.name = 'cd'\n    c.recipe = dict(group_size=16, act_bits=4)\n"
                 "    c.step_boundaries = (0.3, 0.6)\n    return c\n")
    c = load_config(f, ["lr=0.2", "group_size='channel'", "teacher_checkpoint=runs/x/export/variables"], T.TrainConfig)
    assert (c.name, c.recipe.weights.group_size, c.step_boundaries, c.lr) == ("cd", "channel", (0.3, 0.6), 0.2)
    assert c.recipe.activations.bits == 4 and c.teacher_checkpoint == "runs/x/export/variables"
    with pytest.raises(ValueError, match="'lrr' \\(did you mean 'lr'\\?\\)"):
        load_config(f, ["lrr=1"], T.TrainConfig)
    for cfg in sorted((REPO / "experiments" / "configs").glob("finetune_*.py")):
        c = load_config(cfg, [], T.TrainConfig)  # every shipped config loads, validates and names its command
        assert cfg.read_text().startswith("# python -m experiments.finetune --config experiments/configs/")
        assert c.recipe.repairs.names == (() if c.recipe.weights.method == "fp" else ("bn_reestimate", "bias_correct"))


def test_schedules():
    cos = T.make_schedule("cosine", 0.1, 100)
    assert float(cos(0)) == pytest.approx(0.1) and float(cos(100)) == pytest.approx(0.0, abs=1e-7)
    assert float(cos(50)) == pytest.approx(0.05, rel=1e-5)
    st = T.make_schedule("step", 0.1, 100, boundaries=(0.5, 0.75), factor=0.1)
    assert [float(st(s)) for s in (0, 49, 50, 74, 75, 99)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    wc = T.make_schedule("cosine", 0.1, 100, warmup_steps=10)
    assert float(wc(0)) == 0.0 and float(wc(5)) == pytest.approx(0.05) and float(wc(10)) == pytest.approx(0.1)
    assert float(T.make_schedule("constant", 0.3, 10)(7)) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="warmup_steps"):
        T.make_schedule("cosine", 0.1, 10, warmup_steps=10)


def test_weight_decay_only_on_kernels():
    spec = tiny_spec()
    params = np_init(spec.module)["params"]
    mask = T.decay_mask(params)
    flat = {"/".join(k.key for k in path): v for path, v in jax.tree_util.tree_leaves_with_path(mask)}
    assert flat["conv_a/kernel"] and flat["fc/kernel"] and flat["conv_init/kernel"]
    assert not flat["fc/bias"] and not flat["bn_conv_a/scale"] and not flat["bn_conv_a/bias"]
    zero = jax.tree.map(jnp.zeros_like, params)
    for name in T.OPTIMIZERS:
        tx = T.make_optimizer(name, 0.1, "constant", total_steps=10, weight_decay=0.5)
        upd, _ = jax.jit(lambda g, p: tx.update(g, tx.init(p), p))(zero, params)
        moved = {"/".join(k.key for k in p): bool(jnp.any(u != 0)) for p, u in jax.tree_util.tree_leaves_with_path(upd)}
        assert moved == {k: bool(v) and bool(np.any(np.asarray(_leaf(params, k)) != 0)) for k, v in flat.items()}, name


def _leaf(tree, path):
    for k in path.split("/"):
        tree = tree[k]
    return tree


def test_distillation_loss_matches_numpy():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(6, 5)) * 3, rng.normal(size=(6, 5)) * 3
    y = rng.integers(0, 5, 6)
    alpha, temp = 0.3, 4.0

    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    ce = -log_softmax(s)[np.arange(6), y].mean()
    p, lq = np.exp(log_softmax(t / temp)), log_softmax(s / temp)
    kl = (p * (np.log(p) - lq)).sum(-1).mean()
    want = alpha * ce + (1 - alpha) * temp**2 * kl
    got, (got_ce, got_kl) = T.distillation_loss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), jnp.asarray(y), alpha, temp)
    np.testing.assert_allclose([float(got), float(got_ce), float(got_kl)], [want, ce, kl], rtol=1e-5)
    # alpha = 1 is plain cross-entropy; the teacher gets no gradient
    assert float(T.distillation_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(y), 1.0, temp)[0]) == pytest.approx(ce, rel=1e-5)
    g = jax.grad(lambda tl: T.distillation_loss(jnp.asarray(s), tl, jnp.asarray(y), 0.0, temp)[0])(jnp.asarray(t))
    assert not np.any(np.asarray(g))


# --------------------------------------------------------------------------------------------------
# STE: gradients reach the latent weights
# --------------------------------------------------------------------------------------------------
def test_ste_gradient_reaches_latent_weights():
    from fgq_jax.activations import ActConfig

    cfg, spec = tiny_config(), tiny_spec()
    v = np_init(spec.module)
    wq = T.weight_quantizer(cfg.recipe, spec, ste=True)
    act_cfg = ActConfig((("conv_a", 8, False), ("conv_b", 8, False)))
    steps = {"conv_a": jnp.float32(0.05), "conv_b": jnp.float32(0.05)}
    apply = T.make_apply_fn(spec.module, act_cfg)
    (x, y), _ = tiny_data()
    x = jnp.asarray(x[:16], jnp.float32) / 255.0

    def loss_from_effective(params):  # loss as a function of the weights the forward sees
        logits, _ = apply({"params": params, "batch_stats": v["batch_stats"]}, x, steps, train=True, mutable=["batch_stats"])
        return T.cross_entropy(logits, jnp.asarray(y[:16]))

    g_latent = jax.jit(jax.grad(lambda p: loss_from_effective(wq(p))))(v["params"])
    q = jax.jit(wq)(v["params"])
    g_eff = jax.jit(jax.grad(loss_from_effective))(q)
    for layer in ("conv_a", "conv_b"):
        ql = np.asarray(q[layer]["kernel"])
        lat = np.asarray(v["params"][layer]["kernel"])
        assert not np.allclose(ql, lat), "the forward must see quantized weights"
        # straight-through: d loss / d latent == d loss / d (quantized weight), and it is non-zero
        np.testing.assert_allclose(g_latent[layer]["kernel"], g_eff[layer]["kernel"], rtol=1e-6, atol=1e-8)
        assert np.abs(np.asarray(g_latent[layer]["kernel"])).sum() > 0
        # ternary per group: each group of 4 holds at most {-a, 0, +a}
        groups = ql.reshape(-1, ql.shape[-1]).T.reshape(ql.shape[-1], -1, 4)
        assert all(len(np.unique(np.abs(g[g != 0]))) <= 1 for g in groups.reshape(-1, 4))
    # FP first/last layers are untouched and also get gradients
    np.testing.assert_array_equal(q["conv_init"]["kernel"], v["params"]["conv_init"]["kernel"])
    assert np.abs(np.asarray(g_latent["fc"]["kernel"])).sum() > 0


def test_binary_weights_and_activations_train_step_changes_params(tmp_path):
    """BNN / XNOR-Net: binary weights (per-channel scales) and 1-bit activations through the whole
    fine-tuning path (calibration, evaluation, one STE step)."""
    cfg = tiny_config(method="binary", group_size="channel", act_bits=1, calibration=Calibration("mean"),
                      epochs=1, steps_per_epoch=1, checkpoint_every=0)
    spec = tiny_spec()
    init = np_init(spec.module)
    s = run_fit(cfg, tmp_path / "w")
    assert s["act_layers"] == [["conv_a", 1, False], ["conv_b", 1, False]]  # both after a ReLU
    assert s["steps"] == 1 and 0.0 <= s["top1_start"] <= 100.0 and 0.0 <= s["top1_final"] <= 100.0
    # accounting (in the results JSON): conv_a 8x8x8 outputs x L=72 + conv_b 4x4x16 x 72 bit operations
    acc = s["accounting"]
    assert acc["binary_ops"] == 512 * 72 + 256 * 72 == 55296
    assert acc["binary_ops_pct"] == pytest.approx(100 * 55296 / acc["macs"])
    params = s["_state"].params
    for layer in ("conv_a", "conv_b", "fc"):
        new = np.asarray(params[layer]["kernel"])
        assert np.all(np.isfinite(new))
        assert not np.array_equal(new, np.asarray(init["params"][layer]["kernel"])), layer
    # the forward sees binary weights: one magnitude per output channel
    q = T.weight_quantizer(cfg.recipe, spec, ste=False)(params)
    k = np.asarray(q["conv_b"]["kernel"]).reshape(-1, 16)
    assert all(len(np.unique(np.abs(k[:, c]))) == 1 for c in range(16))


# --------------------------------------------------------------------------------------------------
# training, resume, checkpoints
# --------------------------------------------------------------------------------------------------
def test_quantized_finetune_learns(reference):
    wd, s = reference
    h = s["history"]
    assert [r["epoch"] for r in h] == [0, 1, 2] and s["steps"] == 12
    assert h[2]["loss"] < h[1]["loss"]
    assert s["top1_final"] > max(s["top1_start"], 40.0)  # 5 classes: chance is 20 %
    assert s["act_layers"] == [["conv_a", 8, False], ["conv_b", 8, False]]
    lines = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1, 2]
    assert {"loss", "train_top1", "test_top1", "images_per_s", "wall_s", "lr"} <= set(lines[1])
    assert s["overhead_pct"] == pytest.approx(100 * 12 * 32 / (182 * 50_000))
    # orbax kept the last max_to_keep=3 of the saves at 4, 6 (epoch end), 8, 12 (end)
    assert sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit()) == [6, 8, 12]


@pytest.mark.slow
def test_kill_and_resume_is_exact(reference, tmp_path):
    ref_wd, ref = reference
    wd = tmp_path / "run"
    code = f"import sys; sys.path.insert(0, {str(TESTS_DIR)!r}); import test_train; test_train.child_run({str(wd)!r}, 7)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    saved = sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and max(saved) <= 7
    # an interrupted write of a later step (what a kill during a save leaves) must be ignored
    partial = wd / "checkpoints" / "10.orbax-checkpoint-tmp-1700000000000000"
    shutil.copytree(wd / "checkpoints" / str(max(saved)), partial)
    for f in list(partial.rglob("*"))[::2]:
        if f.is_file():
            f.write_bytes(b"garbage")
    step, _ = T.latest_checkpoint_meta(wd)
    assert step == max(saved)

    res = run_fit(tiny_config(), wd, resume=True)
    assert res["resumed_from"] == max(saved)
    assert leaves_equal(res["_state"].params, ref["_state"].params)
    assert leaves_equal(res["_state"].batch_stats, ref["_state"].batch_stats)
    assert leaves_equal(res["_state"].opt_state, ref["_state"].opt_state)
    keys = ("epoch", "step", "loss", "train_top1", "test_top1", "lr")
    assert [{k: r.get(k) for k in keys} for r in res["history"]] == [{k: r.get(k) for k in keys} for r in ref["history"]]
    lines = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1, 2]


def test_resume_with_other_config_is_refused_and_touches_nothing(reference, tmp_path):
    ref_wd, _ = reference
    wd = tmp_path / "copy"
    shutil.copytree(ref_wd, wd)
    before = tree_digest(wd)
    for change, words in [(dict(group_size=8), "quantization recipe"), (dict(act_bits=4), "quantization recipe"),
                          (dict(model="test_train:other"), "architecture"), (dict(lr=0.1), "training")]:
        with pytest.raises(T.CheckpointMismatchError, match=words) as e:
            run_fit(tiny_config(**change), wd, resume=True)
        assert list(change)[0] in str(e.value) and "untouched" in str(e.value)
    with pytest.raises(FileExistsError, match="--resume"):  # a fresh run never reuses a run's workdir
        run_fit(tiny_config(), wd)
    assert tree_digest(wd) == before
    # run-time fields may change; a finished run resumes to the same result without training more
    res = run_fit(tiny_config(max_to_keep=5, progress=False), wd, resume=True)
    assert res["resumed_from"] == 12 and res["top1_final"] == reference[1]["top1_final"]


def test_resume_skips_stray_and_damaged_checkpoints(reference, tmp_path, capfd):
    """A stray numbered directory and flipped bytes in the newest checkpoint: resume falls back to
    the newest intact step and says what it skipped and why (never a KeyError or silent damage)."""
    ref_wd, ref = reference
    wd = tmp_path / "copy"
    shutil.copytree(ref_wd, wd)
    (wd / "checkpoints" / "99").mkdir()  # a stray directory that looks like a step
    newest = wd / "checkpoints" / "12" / "state"
    data = max((f for f in newest.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    raw = bytearray(data.read_bytes())
    for i in range(len(raw) // 3, len(raw) // 3 + 16):
        raw[i] ^= 0x5A
    data.write_bytes(bytes(raw))
    assert [step for step, _ in T.readable_checkpoints(wd)][:2] == [12, 8]
    res = run_fit(tiny_config(), wd, resume=True)
    err = capfd.readouterr().err
    assert "skipping checkpoint 99" in err and "skipping checkpoint 12" in err
    assert res["resumed_from"] == 8
    assert leaves_equal(res["_state"].params, ref["_state"].params)  # retrained 8 -> 12: same numbers


@pytest.fixture(scope="module")
def fp_run(tmp_path_factory):
    """A 1-epoch full-precision fine-tune with distillation (the FP reference of the CLI test)."""
    cfg = tiny_config(name="tiny_fp", recipe=FP_RECIPE, epochs=1, distill=True, distill_alpha=0.5, time_steps=2)
    return run_fit(cfg, tmp_path_factory.mktemp("fp"))


def test_fp_mode_and_distillation_and_timing(fp_run):
    s = fp_run
    assert s["method"] == "fp" and not s["quantized"] and s["act_layers"] == []
    assert s["top1_start"] == s["fp_start_top1"]
    assert s["step_s_fp"] > 0 and s["step_s_quant"] is None
    t = T.time_train_steps({"a": lambda st, x: x * 2, "b": lambda st, x: x + 1}, None, (jnp.ones(3),), repeats=3)
    assert set(t) == {"a", "b"} and all(v["median_s"] > 0 and v["repeats"] == 3 for v in t.values())
    assert T.overhead_pct(3 * 50_000) == pytest.approx(1.6483516, rel=1e-6)


def test_data_order_and_augmentation_are_deterministic():
    a, b = epoch_permutation(100, 1, 0), epoch_permutation(100, 1, 0)
    assert np.array_equal(a, b) and not np.array_equal(a, epoch_permutation(100, 1, 1))
    x = jnp.asarray(np.random.default_rng(0).integers(0, 255, (4, 8, 8, 3)), jnp.uint8)
    k = jax.random.PRNGKey(0)
    y = augment_cifar(k, x)
    assert y.shape == x.shape and y.dtype == jnp.uint8 and np.array_equal(y, augment_cifar(k, x))


def test_test_subset_is_class_balanced_and_spread():
    labels = np.repeat(np.arange(10), 1000)  # stored class by class, as CIFAR-10-JPEG
    idx = balanced_subset(labels, 200)
    assert len(idx) == 200 and np.all(np.diff(idx) > 0)
    assert np.bincount(labels[idx]).tolist() == [20] * 10
    assert idx[:2].tolist() == [0, 50]  # evenly spaced within each class
    uneven = np.array([0] * 2 + [1] * 50 + [2] * 5)
    assert np.bincount(uneven[balanced_subset(uneven, 9)]).tolist() == [2, 4, 3]
    assert balanced_subset(labels, 10**6).tolist() == list(range(10_000))


# --------------------------------------------------------------------------------------------------
# CLI and results files
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_end_to_end_writes_results(tmp_path, fp_run, monkeypatch):
    from fgq_jax.checkpoint import save_variables

    from experiments import finetune

    save_variables(tmp_path / "init", np_init(TinyCNN()), {"model": "tiny"})
    cfg_file = tmp_path / "finetune_tiny.py"
    cfg_file.write_text(textwrap.dedent(f"""\
        # python -m experiments.finetune --config {cfg_file}
        from fgq_jax.activations import Calibration
        from fgq_jax.recipe import QuantRecipe
        from fgq_jax.train import TrainConfig

        def get_config():
            return TrainConfig(name="tiny_q", model="test_train:tiny_spec", dataset="synthetic",
                               init_checkpoint={str(tmp_path / "init")!r},
                               recipe=QuantRecipe.make(group_size=4, act_bits=8, calibration=Calibration("max"),
                                                       num_calib=64, num_repair=64),
                               epochs=1, batch_size=32, lr=0.05, train_subset=128, test_subset=64,
                               checkpoint_every=2, progress=False, time_steps=2, eval_batch_size=64,
                               fp_reference="tiny_fp")
        """))
    res_dir = tmp_path / "results"
    common = ["--config", str(cfg_file), "--results-dir", str(res_dir)]
    T.write_results(fp_run, res_dir)  # the FP reference run, as the FP config's CLI would write it
    # the run's metadata (git revision) is taken before training, not when the results are written
    from fgq_jax import results

    calls, real_meta, real_fit = [], results.run_metadata, T.fit
    monkeypatch.setattr(results, "run_metadata", lambda *a, **k: (calls.append("meta"), real_meta(*a, **k))[1])
    monkeypatch.setattr(T, "fit", lambda *a, **k: (calls.append("fit"), real_fit(*a, **k))[1])
    assert finetune.main([*common, "--workdir", str(tmp_path / "q")]) == 0
    assert calls == ["meta", "fit"]
    monkeypatch.undo()
    out = res_dir / "synthetic" / "tiny"
    rows = list(csv.DictReader(open(out / "finetune_tiny_q.csv")))
    assert len(rows) == 1
    r = rows[0]
    for col in ("model", "method", "group_size", "act_bits", "distill", "epochs", "top1_start",
                "top1_final", "fp_top1", "overhead_pct"):
        assert col in r
    assert r["method"] == "exact" and r["group_size"] == "4" and r["act_bits"] == "8"
    fp = json.loads((out / "finetune_tiny_fp.json").read_text())["runs"][0]
    assert float(r["fp_top1"]) == pytest.approx(fp["top1_final"], abs=1e-4)
    meta = json.loads((out / "finetune_tiny_q.json").read_text())["runs"][0]
    assert meta["meta"]["git_revision"] and meta["meta"]["packages"]["jax"] and meta["config"]["seed"] == 0
    assert meta["meta"]["command"].startswith("python -m experiments.finetune --config")
    assert meta["step_s_quant"] > 0 and meta["step_s_fp"] > 0 and meta["step_time_ratio"] > 0
    assert (out / "finetune_tiny_q.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "q" / "export" / "variables" / "metadata.json").is_file()
    # a rerun of the same seed replaces its row
    T.write_results(json.loads((out / "finetune_tiny_q.json").read_text())["runs"][0], res_dir)
    assert len(list(csv.DictReader(open(out / "finetune_tiny_q.csv")))) == 1
    # the real command line: --resume with another quantization config -> clear error, exit != 0,
    # checkpoints untouched
    before = tree_digest(tmp_path / "q" / "checkpoints")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS_DIR), str(REPO), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-m", "experiments.finetune", *common, "--workdir", str(tmp_path / "q"),
                        "--resume", "--set", "group_size=64"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "group_size" in p.stderr and "untouched" in p.stderr, p.stderr[-2000:]
    assert tree_digest(tmp_path / "q" / "checkpoints") == before


MESH_CONFIG = """\
# python -m experiments.finetune --config {path}
from fgq_jax.activations import Calibration
from fgq_jax.recipe import QuantRecipe
from fgq_jax.train import TrainConfig


def get_config():
    return TrainConfig(name="tiny_mesh", model="test_train:tiny_spec", dataset="synthetic",
                       recipe=QuantRecipe.make(group_size=4, act_bits=8, calibration=Calibration("max"),
                                               num_calib=64, num_repair=64),
                       epochs=1, steps_per_epoch=3, batch_size=32, lr=0.05, train_subset=128,
                       test_subset=64, eval_batch_size=64, checkpoint_every=0, progress=False,
                       time_steps=0, export=False)
"""


@pytest.mark.slow
def test_cli_on_8_devices_with_mesh_matches_one_device(tmp_path):
    """``python -m experiments.finetune --mesh`` on 8 forced CPU devices: each batch of 32 is
    sharded 4 per device; the epoch's numbers equal the unsharded run's (loss to float tolerance:
    the BatchNorm and loss reductions sum in another order)."""
    cfg_file = tmp_path / "finetune_tiny_mesh.py"
    cfg_file.write_text(MESH_CONFIG.format(path=cfg_file))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(TESTS_DIR), str(REPO), os.environ.get("PYTHONPATH", "")]))
    runs = {}
    for name, extra in (("one", []), ("mesh", ["--mesh"])):
        cmd = [sys.executable, "-m", "experiments.finetune", "--config", str(cfg_file), "--no-results",
               "--workdir", str(tmp_path / name), *extra]
        runs[name] = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    hist = {}
    for name, proc in runs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        hist[name] = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    one, mesh = hist["one"], hist["mesh"]
    assert [r["epoch"] for r in one] == [r["epoch"] for r in mesh] == [0, 1] and mesh[1]["step"] == 3
    assert mesh[0]["test_top1"] == one[0]["test_top1"]  # the quantized start, evaluated sharded
    assert (mesh[1]["test_top1"], mesh[1]["train_top1"]) == (one[1]["test_top1"], one[1]["train_top1"])
    assert mesh[1]["loss"] == pytest.approx(one[1]["loss"], rel=1e-5)


# --------------------------------------------------------------------------------------------------
# the fine-tune's start is the sweep's point (real ResNet-20, shared weights and data)
# --------------------------------------------------------------------------------------------------
SHARED = default_shared_dir()
R20 = SHARED / "models" / "cifar-resnet" / "resnet20-12fca82f.th"
needs_shared = pytest.mark.skipif(
    not (R20.exists() and (SHARED / "data" / "cifar10-jpeg" / "test.tar.gz").exists()),
    reason=f"shared weights/data not found under {SHARED}",
)


@pytest.mark.slow
@needs_shared
def test_epoch0_top1_is_the_sweeps_top1_for_the_same_recipe(tmp_path):
    """quantize_model(recipe) is where fine-tuning starts: its epoch-0 top-1 equals, exactly, the
    sweep's top-1 for that recipe on the same test images (a "BN+bias" a8 point with small budgets,
    N=8 because groups of <= 8 compile fast; one training step of batch 8)."""
    from fgq_jax import sweep
    from fgq_jax.data import load_arrays
    from fgq_jax.loading import load_model

    recipe = QuantRecipe.make(method="exact", group_size=8, act_bits=8, bn_reestimate=True,
                              bias_correct=True, num_calib=64, num_repair=128)
    n_test, batch = 200, 100
    sweep_cfg = sweep.SweepConfig(
        name="epoch0", model="resnet20", checkpoint=str(R20), group_sizes=(8,), act_bits=(8,),
        methods=("exact",), repairs=(("bn_reestimate", "bias_correct"),), include_fp=False,
        recipe=recipe, test_limit=n_test, batch_size=batch,
    )
    assert sweep_cfg.points() == [recipe]
    csv_path = sweep.run_sweep(sweep_cfg, out_root=tmp_path / "sweep", plots=False, progress=False)
    (row,) = list(csv.DictReader(open(csv_path)))

    spec, fp_variables = load_model("resnet20", str(R20))
    cfg = T.TrainConfig(
        name="epoch0", model="resnet20", dataset="cifar10_jpeg", recipe=recipe, epochs=1,
        steps_per_epoch=1, batch_size=8, test_subset=n_test, eval_batch_size=batch,
        checkpoint_every=0, progress=False, time_steps=0, export=False,
    )
    summary = T.fit(cfg, tmp_path / "ft", spec=spec, train_data=load_arrays("cifar10_jpeg", "train"),
                    test_data=load_arrays("cifar10_jpeg", "test"), init_variables=fp_variables)
    start = summary["history"][0]
    assert summary["n_test"] == int(row["num_test"]) == n_test
    assert start["test_top1"] == float(row["top1"]), (start, row["top1"])  # k / 200: exact in the CSV
