# python -m experiments.finetune --config experiments/configs/finetune_resnet20_bnn_3ep.py
# (its FP reference first: python -m experiments.finetune --config experiments/configs/finetune_resnet20_fp_3ep.py)
#
# Fully binarized ResNet-20 (BNN / XNOR-Net style) with the budget and training recipe of
# finetune_resnet20_n64_3ep.py (3 epochs, SGD + Nesterov, lr 0.01 cosine, batch 128, seed 0, the
# same BN re-estimation + bias correction start), only the quantizers change:
# * weights: method "binary" (sign(w), codes {-1, +1}) with one scale per output channel
#   (mean|w| of the filter: XNOR-Net's alpha); first conv and last dense stay FP;
# * activations: 1 bit at the input of every binarized layer (act_bits=1): after a ReLU (every such
#   input in ResNet-20) the levels are {0, s}, x > s/2 -> s, hard-tanh STE (gradient where
#   0 <= x <= s; fgq_jax.activations). s is the least-squares step of the {0, s} quantizer on 256
#   calibration images (calibration "mse"; for a signed input it would be XNOR-Net's mean|x|, the
#   sign quantizer's least-squares optimum). XNOR-Net's mean|x| itself ("mean": s = mean(max(x, 0)),
#   0.3-0.5 here against 0.7-1.9 for "mse") was tried first and diverged: with the STE clipped at
#   such a small s the first step's gradients were ~1000x the parameters' norms in the early layers
#   (loss 345 -> 6984 within 40 steps; with "mse" the ratio is ~0.7, as with 8-bit activations).
# Unsigned {0, s} inputs times {-1, +1} weights are AND + popcount, not XNOR (fgq_jax.accounting).
from pathlib import Path

from fgq_jax.activations import Calibration
from fgq_jax.configfile import derived_config
from fgq_jax.recipe import QuantRecipe


def get_config():
    return derived_config(
        Path(__file__).with_name("finetune_resnet20_n64_3ep.py"),
        name="resnet20_bnn_3ep",
        recipe=QuantRecipe.make(method="binary", group_size="channel", first_last="fp", act_bits=1,
                                calibration=Calibration(method="mse"), num_calib=256,
                                bn_reestimate=True, bias_correct=True, num_repair=2048),
    )
