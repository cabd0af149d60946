# python -m experiments.finetune --config experiments/configs/finetune_resnet20_n64.py
#
# ResNet-20, exact FGQ ternary weights with groups of N=64 (about 98 % of the multiplications of the
# quantized layers eliminated), 8-bit activations at the inputs of the ternary layers, first conv and
# last dense in FP; STE fine-tuning from the published weights on CIFAR-10-JPEG train for 1 epoch
# (0.55 % of the original 182 x 50,000-image schedule; finetune_resnet20_n64_3ep.py runs the
# issue's full budget of 3 epochs). Training starts from the sweep's "BN+bias" point of this recipe
# (quantize_model: MSE-calibrated activation steps on 256 images, bias correction and BN
# re-estimation on 2048 augmented images, recalibration; its epoch-0 top-1 is the sweep's).
# fp_top1 comes from finetune_resnet20_fp.py (run it first for that column). Resume an interrupted
# run with --resume. The training recipe (optimizer, schedule, epochs, batch, seed) is
# finetune_resnet20_fp.py's, so the FP reference and the quantized runs cannot drift apart.
from pathlib import Path

from fgq_jax.activations import Calibration
from fgq_jax.configfile import derived_config
from fgq_jax.recipe import QuantRecipe


def get_config():
    return derived_config(
        Path(__file__).with_name("finetune_resnet20_fp.py"),
        name="resnet20_n64",
        recipe=QuantRecipe.make(method="exact", group_size=64, first_last="fp", act_bits=8,
                                calibration=Calibration(method="mse"), num_calib=256,
                                bn_reestimate=True, bias_correct=True, num_repair=2048),
        fp_reference="resnet20_fp",
    )
