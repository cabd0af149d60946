"""The training state and the jitted STE training step.

* :class:`TrainState` -- everything the next step depends on, as one pytree (latent float params,
  BN running statistics, optimizer state, step, rng, activation steps, running epoch metrics), so a
  checkpoint of it makes a resume exact.
* :func:`latent_variables` -- where training starts: the FP kernels as latent weights, with the
  repaired biases and BatchNorm statistics of :func:`fgq_jax.ptq.quantize_model`'s result.
* :func:`make_train_step` -- one step: on-device CIFAR augmentation, normalisation, forward with
  fake-quantized weights (the recipe's rules, straight-through gradient to the latent weights) and
  fake-quantized activations (:func:`fgq_jax.intercept.quantized_apply`, fixed calibrated steps),
  BatchNorm in train mode, cross-entropy or distillation loss.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from fgq_jax import transforms
from fgq_jax.activations import ActConfig
from fgq_jax.data import augment_cifar
from fgq_jax.intercept import quantized_apply
from fgq_jax.recipe import QuantRecipe
from fgq_jax.train.optim import cross_entropy, distillation_loss

__all__ = [
    "TrainState",
    "create_train_state",
    "latent_variables",
    "weight_quantizer",
    "make_apply_fn",
    "make_train_step",
]

ApplyFn = Callable[..., Any]  # (variables, x, act_steps, *, train, mutable) -> logits | (logits, upd)


def _zero_metrics() -> dict[str, jax.Array]:
    return {
        "loss_sum": jnp.zeros((), jnp.float32),
        "correct": jnp.zeros((), jnp.int32),
        "count": jnp.zeros((), jnp.int32),
    }


@flax.struct.dataclass
class TrainState:
    """The complete training state (a pytree; checkpointed as is).

    params: latent float parameters (what the optimizer updates; the forward pass sees their
      quantized version). batch_stats: BN running statistics. opt_state: optax state. step: int32
      scalar, optimizer steps done. rng: PRNGKey (uint32[2]); the step key is fold_in(rng, step).
    act_steps: {layer_path: float32 step} fixed by the calibration at the start of the run.
    metrics: running sums of the current epoch (loss_sum, correct, count), reset at epoch start.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array
    act_steps: dict[str, jax.Array]
    metrics: dict[str, jax.Array]

    def reset_metrics(self) -> TrainState:
        return self.replace(metrics=jax.tree.map(jnp.zeros_like, self.metrics))


def create_train_state(
    variables: Mapping[str, Any],
    tx: optax.GradientTransformation,
    seed: int,
    act_steps: Mapping[str, Any] | None = None,
) -> TrainState:
    params = jax.tree.map(jnp.asarray, variables["params"])
    batch_stats = jax.tree.map(jnp.asarray, dict(variables.get("batch_stats", {})))
    act_steps = {k: jnp.asarray(v, jnp.float32) for k, v in dict(act_steps or {}).items()}

    @jax.jit
    def build(params, batch_stats, act_steps):  # one compilation instead of many eager ops
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=jax.tree.map(jnp.copy, params),
            batch_stats=jax.tree.map(jnp.copy, batch_stats),
            opt_state=tx.init(params),
            rng=jax.random.PRNGKey(seed),
            act_steps=act_steps,
            metrics=_zero_metrics(),
        )

    return build(params, batch_stats, act_steps)


def latent_variables(quantized_variables: Mapping[str, Any], fp_params: Any) -> dict[str, Any]:
    """The variables training starts from: every conv/dense kernel is the FP one (the latent weight
    the optimizer updates; the forward re-quantizes it), every other parameter (biases after bias
    correction, BN scales/offsets) and the BatchNorm statistics are the quantized model's."""

    def pick(path, q, fp):
        return fp if transforms.path_to_str(path).endswith("kernel") else q

    params = jax.tree_util.tree_map_with_path(pick, quantized_variables["params"], fp_params)
    return {"params": params, "batch_stats": quantized_variables.get("batch_stats", {})}


def weight_quantizer(recipe: QuantRecipe, spec, ste: bool) -> Callable[[Any], Any] | None:
    """``params -> fake-quantized params`` by the recipe's rules (None for FP weights).
    ``ste=True``: straight-through gradient to the latent weights (the training forward)."""
    rules = recipe.rules(spec.first_layer, spec.last_layer)
    if not rules:
        return None
    return lambda params: transforms.quantize_params(params, rules, mode="fake", ste=ste)


def make_apply_fn(module, act_cfg: ActConfig | None = None) -> ApplyFn:
    """The training forward: :func:`fgq_jax.intercept.quantized_apply` with the inputs of
    ``act_cfg``'s layers quantized (clipped STE); plain ``module.apply`` when there are none."""
    if act_cfg is None or not act_cfg.layers:

        def plain(variables, x, act_steps, *, train=False, mutable=False):
            return module.apply(variables, x, train=train, mutable=mutable)

        return plain

    def apply(variables, x, act_steps, *, train=False, mutable=False):
        return quantized_apply(module, variables, x, act_cfg, act_steps, train=train, mutable=mutable)

    return apply


def make_train_step(
    apply_fn: ApplyFn,
    tx: optax.GradientTransformation,
    *,
    preprocess: Callable[[jax.Array], jax.Array],
    weight_quant: Callable[[Any], Any] | None = None,
    augment: bool = True,
    teacher_apply: Callable[[Any, jax.Array], jax.Array] | None = None,
    distill_alpha: float = 0.5,
    distill_temperature: float = 4.0,
    donate: bool = True,
    jit: bool = True,
):
    """Build ``train_step(state, images, labels, teacher_variables=None) -> (state, metrics)``.

    apply_fn(variables, x, act_steps, train=..., mutable=...): the (activation-quantizing) forward
      (:func:`make_apply_fn`). preprocess(images) -> float NHWC: normalisation (after augmentation).
    weight_quant(params) -> params: fake-quantized weights with a straight-through gradient
      (:func:`weight_quantizer` with ste=True); None -> full precision.
    teacher_apply(teacher_variables, x) -> logits: the frozen teacher (eval mode); None -> plain CE.

    images: uint8 (or float) [B, H, W, C] with a fixed B (one compilation); labels int32 [B].
    The batch may be sharded over devices (data parallel): the step is a plain jitted function, so
    sharded inputs and replicated state give the same numbers as one device.
    """

    def loss_fn(params, state, x, labels, teacher_variables):
        qparams = weight_quant(params) if weight_quant is not None else params
        variables = {"params": qparams, "batch_stats": state.batch_stats}
        logits, updates = apply_fn(variables, x, state.act_steps, train=True, mutable=["batch_stats"])
        if teacher_apply is not None:
            t_logits = jax.lax.stop_gradient(teacher_apply(teacher_variables, x))
            loss, (ce, _) = distillation_loss(logits, t_logits, labels, distill_alpha, distill_temperature)
        else:
            loss = ce = cross_entropy(logits, labels)
        new_bs = updates.get("batch_stats", state.batch_stats) if updates else state.batch_stats
        return loss, (logits, new_bs, ce)

    def step_fn(state: TrainState, images, labels, teacher_variables=None):
        if augment:
            images = augment_cifar(jax.random.fold_in(state.rng, state.step), images)
        x = preprocess(images)
        (loss, (logits, new_bs, ce)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state, x, labels, teacher_variables
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        correct = jnp.sum(jnp.argmax(logits, -1) == labels).astype(jnp.int32)
        m = state.metrics
        metrics = {
            "loss_sum": m["loss_sum"] + loss.astype(jnp.float32) * labels.shape[0],
            "correct": m["correct"] + correct,
            "count": m["count"] + jnp.int32(labels.shape[0]),
        }
        new_state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            batch_stats=new_bs,
            opt_state=opt_state,
            metrics=metrics,
        )
        return new_state, {"loss": loss, "ce": ce, "correct": correct}

    if not jit:
        return step_fn
    return jax.jit(step_fn, donate_argnums=(0,) if donate else ())
