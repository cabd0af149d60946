"""PyTorch -> Flax conversion: equivalence with PyTorch's own forward, error cases, orbax save/load, CLI.

Equivalence is measured as max|flax - torch| / max|torch| over all logits (element-wise relative
error is meaningless for logits near zero) and must be <= 1e-4.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is needed to check the converters")
torchvision = pytest.importorskip("torchvision")
tnn = torch.nn
F = torch.nn.functional

from fgq_jax.checkpoint import load_variables, save_variables  # noqa: E402
from fgq_jax.convert import (  # noqa: E402
    CheckpointMismatchError,
    convert_torch_checkpoint,
    convert_torch_state_dict,
    expected_torch_keys,
)
from fgq_jax.convert.__main__ import main as cli_main  # noqa: E402
from fgq_jax.models import MODEL_NAMES, get_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FGQ_SHARED_DIR", REPO.parent / "shared"))
CIFAR_CKPT_DIR = SHARED / "models" / "cifar-resnet"
TOL = 1e-4


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


def flax_logits(name: str, variables: dict, x_nchw: torch.Tensor, **kw) -> np.ndarray:
    x = jnp.asarray(x_nchw.numpy().transpose(0, 2, 3, 1))  # NCHW -> NHWC
    return np.asarray(get_model(name, kw.pop("num_classes", None)).module.apply(variables, x, train=False))


def randomize_bn(model: tnn.Module) -> tnn.Module:
    """Non-trivial BN affine params and running stats, so that conversion mistakes in BN show up."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, tnn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model


# --- reference CIFAR ResNet, as in akamaster/pytorch_resnet_cifar10 (option A) --------------------


class LambdaLayer(tnn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class RefBasicBlock(tnn.Module):
    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = tnn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = tnn.BatchNorm2d(planes)
        self.conv2 = tnn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = tnn.BatchNorm2d(planes)
        self.shortcut = tnn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = LambdaLayer(
                lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4), "constant", 0)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class RefCifarResNet(tnn.Module):
    def __init__(self, depth, num_classes=10):
        super().__init__()
        n = (depth - 2) // 6
        self.in_planes = 16
        self.conv1 = tnn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = tnn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, n, 1)
        self.layer2 = self._make_layer(32, n, 2)
        self.layer3 = self._make_layer(64, n, 2)
        self.linear = tnn.Linear(64, num_classes)

    def _make_layer(self, planes, n, stride):
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(RefBasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return tnn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.avg_pool2d(out, out.size()[3]).flatten(1)
        return self.linear(out)


@pytest.fixture(scope="module")
def cifar_th(tmp_path_factory):
    """A random-weight ResNet-20 saved like akamaster's .th files: (path, torch model)."""
    torch.manual_seed(0)
    model = randomize_bn(RefCifarResNet(20)).eval()
    path = tmp_path_factory.mktemp("th") / "resnet20-random.th"
    state = {"module." + k: v for k, v in model.state_dict().items()}  # DataParallel names
    torch.save({"state_dict": state, "best_prec1": 12.5}, path)
    return path, model


@pytest.fixture()
def cifar_sd(cifar_th):
    """A fresh copy of the (unprefixed) random ResNet-20 state_dict, free to modify."""
    return dict(cifar_th[1].state_dict())


# --- equivalence -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet20", "resnet56"])
def test_published_cifar_resnet_matches_pytorch(name):
    files = sorted(CIFAR_CKPT_DIR.glob(f"{name}-*.th"))
    if not files:
        pytest.skip(f"published {name} checkpoint not found in {CIFAR_CKPT_DIR} (set FGQ_SHARED_DIR)")
    params, batch_stats = convert_torch_checkpoint(files[0], name)
    ref = RefCifarResNet(int(name[len("resnet") :]))
    ref.load_state_dict(
        {
            k[len("module.") :]: v
            for k, v in torch.load(files[0], map_location="cpu", weights_only=True)["state_dict"].items()
        }
    )
    ref.eval()
    torch.manual_seed(1)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        want = ref(x).numpy()
    got = flax_logits(name, {"params": params, "batch_stats": batch_stats}, x)
    assert rel_err(got, want) < TOL
    assert (got.argmax(1) == want.argmax(1)).all()


def test_cifar_th_file_matches_pytorch(cifar_th):
    """The .th path (dict with 'state_dict', 'module.' prefixes) without ../shared."""
    path, model = cifar_th
    params, batch_stats = convert_torch_checkpoint(path, "resnet20")
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(x).numpy()
    assert rel_err(flax_logits("resnet20", {"params": params, "batch_stats": batch_stats}, x), want) < TOL


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet101"])
def test_torchvision_resnet_matches_pytorch(name):
    torch.manual_seed(3)
    model = randomize_bn(getattr(torchvision.models, name)(weights=None)).eval()
    variables = convert_torch_state_dict(model.state_dict(), name)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        want = model(x).numpy()
    assert rel_err(flax_logits(name, variables, x), want) <= TOL


@pytest.mark.parametrize("hw", [(224, 224), (127, 160)])  # 6x6 -> 6x6 (identity) and 3x4 -> 6x6 pooling
def test_torchvision_alexnet_matches_pytorch(hw):
    torch.manual_seed(4)
    model = torchvision.models.alexnet(weights=None, num_classes=100).eval()
    variables = convert_torch_state_dict(model.state_dict(), "alexnet", num_classes=100)
    assert variables["batch_stats"] == {}
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        want = model(x).numpy()
    assert rel_err(flax_logits("alexnet", variables, x, num_classes=100), want) <= TOL


def randomize_biases(model: tnn.Module) -> tnn.Module:
    """Non-zero conv biases (torchvision's init zeroes them), so that bias mistakes show up."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, tnn.Conv2d) and m.bias is not None:
                m.bias.normal_(0.0, 0.1)
    return model


@pytest.mark.parametrize("name", ["squeezenet1_0", "squeezenet1_1"])
@pytest.mark.parametrize("hw", [(224, 224), (227, 227), (97, 130)])  # 224: exact pools; 227: ceil mode bites (1.1)
def test_torchvision_squeezenet_matches_pytorch(name, hw):
    torch.manual_seed(6)
    model = randomize_biases(getattr(torchvision.models, name)(weights=None, num_classes=100)).eval()
    assert set(expected_torch_keys(name, 100)) == set(model.state_dict())  # 26 convs x (weight, bias)
    variables = convert_torch_state_dict(model.state_dict(), name, num_classes=100)
    assert variables["batch_stats"] == {}
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        want = model(x).numpy()
    assert np.abs(want).max() > 0  # the final ReLU did not zero everything
    assert rel_err(flax_logits(name, variables, x, num_classes=100), want) <= TOL


def test_published_squeezenet_matches_pytorch():
    """The shared SqueezeNet 1.1 .pth: Flax logits of the converted file == torchvision's."""
    path = SHARED / "models" / "imagenet-squeezenet" / "squeezenet1_1-5d96dd9a.pth"
    if not path.exists():
        pytest.skip(f"published SqueezeNet 1.1 checkpoint not found at {path} (set FGQ_SHARED_DIR)")
    params, batch_stats = convert_torch_checkpoint(path, "squeezenet1_1")
    ref = torchvision.models.squeezenet1_1(weights=None)
    ref.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    ref.eval()
    torch.manual_seed(7)
    x = torch.randn(4, 3, 227, 227)
    with torch.no_grad():
        want = ref(x).numpy()
    got = flax_logits("squeezenet1_1", {"params": params, "batch_stats": batch_stats}, x)
    assert rel_err(got, want) <= TOL
    assert (got.argmax(1) == want.argmax(1)).all()


def test_squeezenet_version_mismatch_is_named():
    sd = torchvision.models.squeezenet1_0(weights=None).state_dict()
    with pytest.raises(CheckpointMismatchError) as e:
        convert_torch_state_dict(sd, "squeezenet1_1", source="sq10.pth")
    msg = str(e.value)
    assert "features.0.weight: checkpoint (96, 3, 7, 7) vs model (64, 3, 3, 3)" in msg
    assert "features.6.squeeze.weight" in e.value.missing  # 1.1 has a Fire where 1.0 pools
    assert "features.5.squeeze.weight" in e.value.unexpected  # and vice versa
    assert "features.9.squeeze.weight" not in e.value.missing + e.value.unexpected  # both have one


def test_train_mode_matches_pytorch_train_mode():
    """train=True: batch-statistics forward and one running-stat update, as torch's train-mode BN."""
    torch.manual_seed(5)
    model = randomize_bn(torchvision.models.resnet18(weights=None, num_classes=10))
    variables = convert_torch_state_dict(model.state_dict(), "resnet18", num_classes=10)
    x = torch.randn(4, 3, 64, 64)
    model.train()
    with torch.no_grad():
        want = model(x).numpy()
    after = convert_torch_state_dict(model.state_dict(), "resnet18", num_classes=10)["batch_stats"]

    spec = get_model("resnet18", num_classes=10)
    got, upd = spec.module.apply(
        variables, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), train=True, mutable=["batch_stats"]
    )
    assert rel_err(got, want) <= TOL
    leaves = jax.tree_util.tree_leaves_with_path(after)
    assert len(leaves) == 2 * 20  # 20 BatchNorms in ResNet-18 (incl. 3 downsample BNs)
    for path, want_leaf in leaves:
        got_leaf = upd["batch_stats"]
        for k in path:
            got_leaf = got_leaf[k.key]
        np.testing.assert_allclose(got_leaf, want_leaf, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


# --- mismatch errors -------------------------------------------------------------------------------


def test_missing_key_is_named(cifar_sd):
    del cifar_sd["layer2.1.bn1.running_var"]
    with pytest.raises(CheckpointMismatchError, match=r"1 missing key:\n\s+layer2\.1\.bn1\.running_var") as e:
        convert_torch_state_dict(cifar_sd, "resnet20")
    assert e.value.missing == ["layer2.1.bn1.running_var"] and not e.value.unexpected
    assert isinstance(e.value, ValueError)


def test_unexpected_key_is_named(cifar_sd):
    cifar_sd["layer4.0.conv1.weight"] = torch.zeros(64, 64, 3, 3)
    with pytest.raises(CheckpointMismatchError, match=r"1 unexpected key:\n\s+layer4\.0\.conv1\.weight") as e:
        convert_torch_state_dict(cifar_sd, "resnet20")
    assert e.value.unexpected == ["layer4.0.conv1.weight"] and not e.value.missing


def test_shape_mismatch_is_named(cifar_sd):
    cifar_sd["linear.weight"] = torch.zeros(100, 64)  # a CIFAR-100 head
    with pytest.raises(CheckpointMismatchError) as e:
        convert_torch_state_dict(cifar_sd, "resnet20")
    assert "linear.weight: checkpoint (100, 64) vs model (10, 64)" in str(e.value)
    assert e.value.shape_mismatches == [("linear.weight", (100, 64), (10, 64))]


def test_all_mismatches_in_one_error(cifar_sd):
    del cifar_sd["conv1.weight"]
    cifar_sd["extra.bias"] = torch.zeros(3)
    cifar_sd["layer3.2.conv2.weight"] = torch.zeros(64, 64, 1, 1)
    sd = {"module." + k: v for k, v in cifar_sd.items()}  # errors use the checkpoint's own names
    with pytest.raises(CheckpointMismatchError) as e:
        convert_torch_state_dict(sd, "resnet20", source="x.th")
    msg = str(e.value)
    assert msg.startswith("checkpoint x.th does not match model 'resnet20'")
    assert str(pickle.loads(pickle.dumps(e.value))) == msg  # survives multiprocessing
    for part in (
        "conv1.weight",
        "module.extra.bias",
        "module.layer3.2.conv2.weight: checkpoint (64, 64, 1, 1) vs model (64, 64, 3, 3)",
    ):
        assert part in msg


def test_checkpoint_of_another_model(cifar_th):
    with pytest.raises(CheckpointMismatchError) as e:
        convert_torch_checkpoint(cifar_th[0], "resnet18")
    assert "another model" in str(e.value) and str(cifar_th[0]) in str(e.value)
    assert "stage" not in str(e.value)  # PyTorch names, not Flax paths


def test_num_classes_override_fits_checkpoint(cifar_sd):
    cifar_sd["linear.weight"] = torch.zeros(100, 64)
    cifar_sd["linear.bias"] = torch.zeros(100)
    variables = convert_torch_state_dict(cifar_sd, "resnet20", num_classes=100)
    assert variables["params"]["fc"]["kernel"].shape == (64, 100)


# --- unreadable files / bad arguments --------------------------------------------------------------


def test_truncated_file(cifar_th, tmp_path):
    data = cifar_th[0].read_bytes()
    bad = tmp_path / "truncated.th"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint") as e:
        convert_torch_checkpoint(bad, "resnet20")
    assert str(bad) in str(e.value)


@pytest.mark.parametrize("content", [b"this is not a checkpoint\n", b""])
def test_non_checkpoint_file(tmp_path, content):
    bad = tmp_path / "notes.txt"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint") as e:
        convert_torch_checkpoint(bad, "resnet20")
    assert str(bad) in str(e.value)


def test_pickle_without_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match="no state_dict found") as e:
        convert_torch_checkpoint(path, "resnet20")
    assert str(path) in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.th"):
        convert_torch_checkpoint(tmp_path / "nope.th", "resnet20")


def test_unknown_model_name(cifar_th):
    with pytest.raises(ValueError, match="unknown model 'resnet21'.*resnet20") as e:
        convert_torch_checkpoint(cifar_th[0], "resnet21")
    assert all(n in str(e.value) for n in MODEL_NAMES)
    with pytest.raises(ValueError, match="unknown model"):
        convert_torch_state_dict({}, "vgg16")


def test_state_dict_with_non_tensors(cifar_sd):
    cifar_sd["best_prec1"] = 91.0
    with pytest.raises(ValueError, match="best_prec1"):
        convert_torch_state_dict(cifar_sd, "resnet20")


# --- orbax save / load -----------------------------------------------------------------------------


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


def test_save_load_round_trip(cifar_sd, tmp_path):
    variables = convert_torch_state_dict(cifar_sd, "resnet20")
    out = save_variables(tmp_path / "r20", variables, {"model": "resnet20", "source_sha256": "ab" * 32})
    loaded, meta = load_variables(out)
    _assert_trees_equal(loaded, variables)
    assert isinstance(jax.tree.leaves(loaded)[0], jax.Array)
    assert meta["model"] == "resnet20" and meta["source_sha256"] == "ab" * 32
    assert meta["num_params"] == 269_722 and meta["collections"] == ["batch_stats", "params"]
    assert {"jax", "flax", "orbax-checkpoint"} <= set(meta["versions"]) and "git_rev" in meta
    # Restored variables drive the model exactly like the originals.
    x = jnp.ones((1, 32, 32, 3))
    m = get_model("resnet20").module
    np.testing.assert_array_equal(m.apply(loaded, x), m.apply(variables, x))


# --- CLI ---------------------------------------------------------------------------------------------


def test_cli(cifar_th, tmp_path, capsys):
    src, _ = cifar_th
    out = tmp_path / "conv"
    # The real `python -m` entry point once (a subprocess: a few seconds of imports).
    proc = subprocess.run(
        [sys.executable, "-m", "fgq_jax.convert", str(src), "--model", "resnet20", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "resnet20" in proc.stdout and "269,722 parameters" in proc.stdout
    variables, meta = load_variables(out)
    params, batch_stats = convert_torch_checkpoint(src, "resnet20")
    _assert_trees_equal(variables, {"params": params, "batch_stats": batch_stats})
    assert meta["model"] == "resnet20" and meta["source_file"] == str(src)
    assert meta["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    json.dumps(meta)

    # In-process for the error paths.
    assert cli_main([str(src), "--model", "resnet20", "--out", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert cli_main([str(src), "--model", "resnet32", "--out", str(tmp_path / "x"), "--overwrite"]) == 1
    assert "missing key" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert cli_main([str(src), "--model", "resnet20", "--out", str(out), "--overwrite"]) == 0
    assert "converted" in capsys.readouterr().out


def test_name_digest_is_checked(tmp_path):
    """A torchvision-style name ending in a sha256 prefix must match the file's bytes."""
    from fgq_jax.convert.torch_convert import check_name_digest

    good = tmp_path / "model-2c26b46b.pth"
    good.write_bytes(b"foo")  # sha256("foo") = 2c26b46b...
    check_name_digest(good)
    bad = tmp_path / "model-deadbeef.pth"
    bad.write_bytes(b"foo")
    with pytest.raises(ValueError, match="deadbeef.*2c26b46b"):
        check_name_digest(bad)
    check_name_digest(tmp_path / "plain_name.pth")  # no digest in the name: nothing to check


def test_num_classes_must_be_positive():
    from fgq_jax.models import get_model

    for bad in (0, -3, True, 2.5):
        with pytest.raises(ValueError, match="num_classes"):
            get_model("resnet20", bad)
