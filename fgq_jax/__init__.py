"""fgq-jax: ternary neural networks with Fine-Grained Quantization (FGQ) in JAX/Flax."""
