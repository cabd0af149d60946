"""Tests of experiments.cli: the CPU split into JAX devices (``--cpu-devices``)."""
import os
import subprocess
import sys

import pytest

from experiments import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("env, mesh", [
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}, False),  # the user's count stays
    ({"JAX_NUM_CPU_DEVICES": "3"}, False),
    ({}, True),  # --mesh: one device, as before (sharded programs compile differently)
])
def test_auto_count_leaves_a_forced_count_and_mesh_runs_alone(env, mesh):
    assert cli.configure_cpu_devices(None, mesh=mesh, env=env) is None


@pytest.mark.parametrize("n", [0, -2, True, 1.5])
def test_bad_count_is_refused_by_name(n):
    with pytest.raises(ValueError, match="--cpu-devices"):
        cli.configure_cpu_devices(n, env={})


def test_auto_count_is_one_device_per_core():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    script = ("from experiments import cli; n = cli.configure_cpu_devices(None); import jax, os; "
              "print(n, jax.device_count(), min(os.cpu_count(), cli.MAX_AUTO_CPU_DEVICES))")
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    assert out[0] == out[1] == out[2]


def test_auto_count_once_jax_runs_keeps_its_devices_and_an_explicit_one_fails():
    import jax

    n = len(jax.devices())  # the backends are up in this process
    assert cli.configure_cpu_devices(None, env={}) in (None, n)  # n: the count conftest set
    assert len(jax.devices()) == n
    with pytest.raises(RuntimeError, match="jax_num_cpu_devices"):
        cli.configure_cpu_devices(n + 1, env={})
