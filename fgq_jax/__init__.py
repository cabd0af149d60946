"""fgq-jax: ternary neural networks with Fine-Grained Quantization (FGQ) in JAX/Flax.

Layers of the library, each importable on its own:
  core math (pure jnp):  ternary (grouping rule, ternarize, TernaryTensor, STE), activations
  pytree transforms:     transforms (rules, quantize_params), accounting, packing, integer
  models and data:       models (Flax ResNets, AlexNet), convert (PyTorch -> Flax), data (tfds)
  evaluation/training:   evaluate, repairs, ptq, sweep, train, distributed
"""
from fgq_jax.activations import calibrate, quantize_activation
from fgq_jax.ternary import TernaryTensor, quantize_int8_weights, ternarize, ternarize_ste
from fgq_jax.transforms import (
    Int8Weights,
    Rule,
    WeightQuant,
    default_rules,
    quantize_params,
    quantized_paths,
    ternarize_params,
)

__version__ = "0.1.0"
__all__ = [
    "Int8Weights",
    "Rule",
    "TernaryTensor",
    "WeightQuant",
    "calibrate",
    "default_rules",
    "quantize_activation",
    "quantize_int8_weights",
    "quantize_params",
    "quantized_paths",
    "ternarize",
    "ternarize_params",
    "ternarize_ste",
]
