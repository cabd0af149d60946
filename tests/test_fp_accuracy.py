"""End to end: the published CIFAR ResNets, converted from PyTorch and evaluated through the tfds
CIFAR-10-JPEG builder (Pillow decoder), reproduce the FP accuracies of ../shared/README.md."""
import pytest

from fgq_jax.data import default_shared_dir, load_arrays
from fgq_jax.evaluate import Evaluator
from fgq_jax.models import get_model

SHARED = default_shared_dir()
# ../shared/README.md, "decoded with Pillow" column: all 10,000 test images.
PUBLISHED = {
    "resnet20": ("resnet20-12fca82f.th", 81.03),
    "resnet32": ("resnet32-d509ac18.th", 82.56),
    "resnet44": ("resnet44-014dd654.th", 82.67),
    "resnet56": ("resnet56-4bfd9763.th", 83.20),
}


@pytest.fixture(scope="module")
def test_split():
    if not (SHARED / "data" / "cifar10-jpeg" / "test.tar.gz").exists():
        pytest.skip(f"CIFAR-10-JPEG tarballs not found under {SHARED}")
    return load_arrays("cifar10_jpeg", "test")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_converted_fp_accuracy_matches_published(name, test_split):
    from fgq_jax.convert import convert_torch_checkpoint

    file, expected = PUBLISHED[name]
    path = SHARED / "models" / "cifar-resnet" / file
    if not path.exists():
        pytest.skip(f"{path} not found")
    images, labels = test_split
    assert images.shape == (10000, 32, 32, 3)
    params, batch_stats = convert_torch_checkpoint(path, name)
    spec = get_model(name)
    result = Evaluator(spec.module, spec.dataset_family)(
        {"params": params, "batch_stats": batch_stats}, images, labels, batch_size=1000,
        progress=False,
    )
    assert result.num_images == 10000
    assert abs(result.top1 - expected) <= 0.05, (name, result.top1, expected)
