"""Tests for fgq_jax.distributed: data-parallel evaluation and fine-tuning on 8 simulated CPU devices
equal the 1-device run; evaluation with whole batches in turn on 2 CPU devices equals the 1-device
run; multi-process initialisation; sweep partitioning and the locked CSV merge."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from fgq_jax import distributed as D

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script: str, env_extra: dict, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "TPU_"))}
    for k in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
              "NUM_PROCESSES", "JAX_PROCESS_ID", "PROCESS_ID", "FGQ_DISTRIBUTED"):
        env.pop(k, None)
    env.update({"JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO, **env_extra})
    return subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


# The 8-device run and the 1-device run happen in one process with 8 simulated devices: the
# reference is the same jitted function on an unsharded (single-device) input.
SPMD_SCRIPT = textwrap.dedent(
    r"""
    import json
    import jax, jax.numpy as jnp, numpy as np, optax
    import flax.linen as nn
    from fgq_jax import distributed as D

    assert jax.device_count() == 8, jax.devices()
    mesh = D.data_mesh()
    out = {}

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            x = nn.relu(nn.Conv(8, (3, 3), name="conv0")(x))
            x = nn.Conv(16, (3, 3), strides=(2, 2), use_bias=False, name="conv1")(x)
            x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x))
            return nn.Dense(10, name="fc")(jnp.mean(x, axis=(1, 2)))

    rng = np.random.default_rng(0)
    model = CNN()
    n = 100  # not a multiple of 8: shard_batch pads
    x = rng.normal(size=(n, 12, 12, 3)).astype(np.float32)
    y = rng.integers(0, 10, n).astype(np.int32)
    variables = jax.jit(model.init)(jax.random.key(0), x[:1])

    @jax.jit
    def eval_step(v, x, y, valid):
        logits = model.apply(v, x, train=False)
        return logits, jnp.sum((jnp.argmax(logits, -1) == y) & valid)

    valid = np.ones(n, bool)
    l1, c1 = eval_step(variables, x, y, valid)
    xs, ys, vs = D.shard_batch((x, y, valid), mesh)
    assert xs.shape[0] == 104 and len(xs.sharding.device_set) == 8, (xs.shape, xs.sharding)
    assert xs.sharding.spec == jax.sharding.PartitionSpec("data")
    l8, c8 = eval_step(D.replicate(variables, mesh), xs, ys, vs)
    assert len(l8.sharding.device_set) == 8
    out["cnn_eval"] = dict(c1=int(c1), c8=int(c8),
                           maxdiff=float(np.abs(np.asarray(l8)[:n] - np.asarray(l1)).max()))

    # two SGD (momentum) fine-tuning steps with BatchNorm statistics updates
    tx = optax.sgd(0.05, momentum=0.9)

    @jax.jit
    def train_step(params, stats, opt_state, x, y):
        def loss_fn(p):
            logits, upd = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                                      mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd
        (loss, upd), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), upd["batch_stats"], opt_state, loss

    xb, yb = x[:64], y[:64]
    def run(params, stats, put_batch):
        opt = tx.init(params)
        losses = []
        for _ in range(2):
            params, stats, opt, loss = train_step(params, stats, opt, *put_batch((xb, yb)))
            losses.append(float(loss))
        return params, stats, losses
    p1, s1, loss1 = run(variables["params"], variables["batch_stats"], lambda b: b)
    p8, s8, loss8 = run(D.replicate(variables["params"], mesh),
                        D.replicate(variables["batch_stats"], mesh),
                        lambda b: D.shard_batch(b, mesh))
    leaf = jax.tree.leaves(p8)[0]
    assert leaf.sharding.is_fully_replicated, leaf.sharding
    diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
               for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p8, s8))))
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(variables["params"])))
    out["train"] = dict(loss1=loss1, loss8=loss8, maxdiff=diff, moved=moved)

    # the real ResNet-20 through the lead's Evaluator, with activation quantization
    try:
        from fgq_jax.activations import ActConfig
        from fgq_jax.evaluate import Evaluator
        from fgq_jax.intercept import linear_layer_paths
        from fgq_jax.models import get_model
    except ImportError as e:
        out["resnet"] = dict(skipped=str(e))
    else:
        spec = get_model("resnet20")
        v = jax.jit(spec.module.init)(jax.random.key(1), jnp.zeros((1, *spec.input_shape)))
        layers = [p for p in linear_layer_paths(spec.module, v, spec.input_shape)
                  if p != spec.first_layer]
        cfg = ActConfig(tuple((p, 8, False) for p in layers))
        steps = {p: jnp.float32(0.02) for p in layers}
        imgs = rng.integers(0, 256, (90, 32, 32, 3)).astype(np.uint8)
        labels = rng.integers(0, 10, 90).astype(np.int32)
        kw = dict(batch_size=50, progress=False)  # tail batch padded; 50 -> 56 rows on 8 devices
        r1 = Evaluator(spec.module, spec.dataset_family, cfg)(v, imgs, labels, steps, **kw)
        r8 = Evaluator(spec.module, spec.dataset_family, cfg, mesh=mesh)(v, imgs, labels, steps, **kw)
        out["resnet"] = dict(c1=[r1.correct1, r1.correct5], c8=[r8.correct1, r8.correct5],
                             n=[r1.num_images, r8.num_images])
    print("RESULT" + json.dumps(out))
    """
)


def test_eval_and_training_on_8_devices_equal_1_device():
    proc = _run(SPMD_SCRIPT, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    out = json.loads(line[len("RESULT"):])
    ev = out["cnn_eval"]
    assert ev["c1"] == ev["c8"], ev
    assert ev["maxdiff"] < 1e-4, ev
    tr = out["train"]
    assert tr["moved"] > 1e-3, tr  # the steps really changed the weights
    assert tr["maxdiff"] < 1e-4, tr
    assert abs(tr["loss1"][1] - tr["loss8"][1]) < 1e-4, tr
    rn = out["resnet"]
    if "skipped" in rn:
        pytest.skip(f"ResNet-20 / evaluate not available: {rn['skipped']}")
    assert rn["c1"] == rn["c8"] and rn["n"] == [90, 90], rn


# ------------------------------------------------------------------------------------------ 2 hosts
MULTIPROCESS_SCRIPT = textwrap.dedent(
    r"""
    import json, os
    from fgq_jax import distributed as D
    assert D.maybe_initialize_distributed()
    import jax, jax.numpy as jnp, numpy as np
    assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
    mesh = D.data_mesh()
    pid = jax.process_index()
    local = np.arange(3, dtype=np.float32) + 10 * pid  # 3 rows per process -> padded to 4
    x = D.shard_batch(local, mesh)
    w = D.replicate(np.float32(2.0), mesh)
    total = jax.jit(lambda x, w: jnp.sum(x * w))(x, w)
    print("RESULT" + json.dumps(dict(pid=pid, shape=list(x.shape), total=float(total))))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_initialize_and_shard():
    """jax.distributed.initialize from the environment, 2 processes x 2 CPU devices on localhost."""
    port = _free_port()
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "NUM_PROCESSES": "2"}
    procs = []
    for pid in range(2):
        e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "TPU_"))}
        e.update({"JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO, **env, "PROCESS_ID": str(pid)})
        procs.append(subprocess.Popen([sys.executable, "-c", MULTIPROCESS_SCRIPT], env=e, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    try:
        for p in procs:
            so, se = p.communicate(timeout=120)
            if p.returncode != 0 and "collective" in se.lower() and "not" in se.lower():
                pytest.skip(f"CPU cross-process collectives unavailable: {se[-500:]}")
            assert p.returncode == 0, se[-3000:]
            outs.append(json.loads([ln for ln in so.splitlines() if ln.startswith("RESULT")][-1][6:]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    # global batch = 2 processes x (3 rows padded to 4); padding rows are zeros
    expected = 2.0 * (sum(range(3)) + sum(range(10, 13)))
    for o in outs:
        assert o["shape"] == [8] and o["total"] == expected, o


# ------------------------------------------------------------------------------------------ env
def test_distributed_env_rules():
    assert D.distributed_env({}) is None
    assert D.distributed_env({"JAX_COORDINATOR_ADDRESS": "h:1234", "NUM_PROCESSES": "4",
                              "PROCESS_ID": "2"}) == dict(coordinator_address="h:1234",
                                                          num_processes=4, process_id=2)
    assert D.distributed_env({"COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "1",
                              "JAX_PROCESS_ID": "0"}) is None
    assert D.distributed_env({"JAX_COORDINATOR_ADDRESS": "h:1"}) == {}
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0"}
    assert D.distributed_env({**slurm, "SLURM_NTASKS": "2"}) == {}
    assert D.distributed_env({**slurm, "SLURM_NTASKS": "1"}) is None
    assert D.distributed_env({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "4"}) == {}
    assert D.distributed_env({"TPU_WORKER_HOSTNAMES": "a,b"}) == {}
    assert D.distributed_env({"TPU_WORKER_HOSTNAMES": "a"}) is None
    assert D.distributed_env({**slurm, "SLURM_NTASKS": "2", "FGQ_DISTRIBUTED": "0"}) is None
    assert D.distributed_env({"FGQ_DISTRIBUTED": "1"}) == {}


def test_single_process_helpers():
    import jax
    import numpy as np

    assert D.maybe_initialize_distributed() is False or jax.process_count() >= 1
    mesh = D.data_mesh()
    assert mesh.axis_names == ("data",) and mesh.devices.size == jax.device_count()
    batch, n = D.pad_batch({"x": np.ones((5, 2)), "m": np.ones(5, bool)}, 4)
    assert n == 5 and batch["x"].shape == (8, 2) and batch["m"][5:].sum() == 0
    xs = D.shard_batch(np.arange(6.0), mesh)
    assert np.asarray(xs)[:6].tolist() == list(range(6))
    with pytest.raises(ValueError):
        D.pad_batch({"a": np.ones(3), "b": np.ones(4)}, 2)


# ------------------------------------------------------------------------------------------ sweeps
def test_partition_points_disjoint_and_complete():
    pts = [dict(n=n, m=m) for n in (4, 16, 64, None) for m in ("exact", "twn", "absmean")]
    for k in (1, 2, 5, 12, 20):
        shares = [D.partition_points(pts, i, k) for i in range(k)]
        flat = [p for s in shares for p in s]
        assert len(flat) == len(pts) and all(p in flat for p in pts)
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ValueError):
        D.partition_points(pts, 3, 3)
    assert D.worker_from_env({"FGQ_WORKER_INDEX": "2", "FGQ_NUM_WORKERS": "5"}) == (2, 5)
    assert D.worker_from_env({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "1",
                              "SLURM_ARRAY_TASK_COUNT": "8"}) == (3, 8)
    assert D.worker_from_env({}) == (0, 1)


# Two CPU devices in a fresh process (the device count is fixed when JAX starts its backends).
ROUND_ROBIN_SCRIPT = textwrap.dedent(
    r"""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from fgq_jax.activations import ActConfig
    from fgq_jax.evaluate import Evaluator
    from fgq_jax.intercept import linear_layer_paths
    from fgq_jax.models import get_model

    spec = get_model("resnet20")
    v = jax.jit(spec.module.init)(jax.random.key(1), jnp.zeros((1, *spec.input_shape)))
    layers = [p for p in linear_layer_paths(spec.module, v, spec.input_shape) if p != spec.first_layer]
    cfg = ActConfig(tuple((p, 4, False) for p in layers))
    steps = {p: jnp.float32(0.05) for p in layers}
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (70, 32, 32, 3)).astype(np.uint8)
    labels = rng.integers(0, 10, 70).astype(np.int32)
    out = {"devices": len(jax.devices())}
    for name, devices in (("one", jax.devices()[:1]), ("all", None)):
        ev = Evaluator(spec.module, spec.dataset_family, cfg, devices=devices)
        seen, step = [], ev._step
        def spy(*args, step=step, seen=seen):
            seen.append(next(iter(args[-3].devices())).id)  # the images' device
            return step(*args)
        ev._step = spy
        r = ev(v, imgs, labels, steps, batch_size=16, progress=False)  # 5 batches, the last padded
        out[name] = dict(counts=[r.correct1, r.correct5, r.num_images], seen=seen,
                         compilations=ev.compilations)
    print("RESULT" + json.dumps(out))
    """
)


def test_evaluation_with_whole_batches_in_turn_on_two_cpu_devices_equals_one_device():
    """The Evaluator gives 2 CPU devices whole batches in turn: the counts are the 1-device ones,
    the step is traced once, and the batches really alternate (5 batches: devices 0, 1, 0, 1, 0)."""
    proc = _run(ROUND_ROBIN_SCRIPT, {"JAX_NUM_CPU_DEVICES": "2", "XLA_FLAGS": ""}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1][6:])
    assert out["devices"] == 2
    assert out["all"]["counts"] == out["one"]["counts"] and out["one"]["counts"][2] == 70
    assert out["one"]["seen"] == [0] * 5 and out["all"]["seen"] == [0, 1, 0, 1, 0]
    assert out["one"]["compilations"] == out["all"]["compilations"] == 1
