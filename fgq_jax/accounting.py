"""Operation and storage accounting for ternary (FGQ) networks.

What FGQ buys is counted per layer from its kernel shape and its output size:

* ``MACs``: multiply-accumulates of the layer for one example, ``outputs * L`` where ``outputs`` is the
  number of output elements (output positions x output channels) and ``L`` the reduction length
  (``kh*kw*cin`` for a conv, ``in`` for a dense layer).
* multiplications that remain: a ternary layer with groups of ``N`` accumulates each group with
  additions/subtractions only (codes are -1/0/+1) and multiplies the group sum once by the group's
  scale, so each output element costs ``ceil(L/N)`` multiplications instead of ``L``. Per-channel and
  per-tensor scales cost one multiplication per output element; FP and 8-bit layers keep all of them.
* additions: ``L - 1`` per output element whatever the grouping (``L - G`` inside the groups and
  ``G - 1`` to combine the scaled group sums); zero codes that could be skipped are not discounted.
* bits per weight including the scales: ``2`` per ternary code plus ``scale_bits`` per scale.
* the paper's potential speedup model (Mellempudi et al. 2017, sec. 4): relative to an FP32 MAC, an
  8-bit MAC is assumed 4x faster and a ternary accumulate (8-bit activation +- add) 16x faster. A
  ternary layer with groups of N does a fraction 1/N of its work as 8-bit multiplications and the rest
  as ternary accumulations, hence ``potential_speedup(N) = 1 / ((1/N)/4 + (1 - 1/N)/16)``: 64/7 =
  9.14x at N=4 (75 % of the multiplications eliminated) and 1024/67 = 15.28x at N=64 (98.4 %).
  Network level, the layers' times are summed: ``speedup = sum(MACs) / sum(time)``, where an FP
  layer takes ``MACs``, an 8-bit layer ``MACs/4`` and a ternary layer ``mults/4 + (MACs-mults)/16``.
* binary layers (BNN / XNOR-Net, counted only when told the layers' activation bits): a layer with
  1-bit weight codes (method "binary", {-1, +1}) *and* 1-bit input activations computes every
  weight-activation product as one bit operation, and ``binary_ops`` (a separate column) counts them:
  ``MACs`` per layer. Signed activations ({-s, +s}, codes +-1): XNOR + popcount,
  ``sum_i a_i w_i = 2 * popcount(xnor(a, w)) - L``. Unsigned ones after a ReLU ({0, s}, codes 0/1) are
  *not* +-1 and cannot be XNOR-ed: they take AND + popcount, ``sum_i a_i w_i = 2 * popcount(a & w+) -
  popcount(a)`` (w+ the bit "w = +1"), i.e. the same one bit operation per MAC plus one popcount of the
  input patch per output position, shared by all output channels (not counted). The rows are labelled
  "... a1-xnor" / "... a1-and" accordingly. The scale multiplications stay (``mults``, one per group per
  output element, as for ternary layers) and the time model extends the paper's: a binary layer takes
  ``mults/4 + (MACs-mults)/32``. The factor 32 (``BINARY_SPEEDUP``) follows the paper's own scaling
  with operand width inside a 32-bit FP32 lane (8-bit MAC 32/8 = 4x, 2-bit ternary 32/2 = 16x, 1-bit
  32/1 = 32x); it is *not* XNOR-Net's 58x, which was measured against a scalar FP32 loop with 64-bit
  words and so mixes word width with vectorisation. Like the paper's factors it is a model, not a
  measurement. Binary weights with wider activations (or 1-bit activations with ternary weights)
  stay in the ternary model (sign-controlled additions).

Layer shapes come from :func:`layer_shapes`, which runs any Flax Linen model abstractly
(``jax.eval_shape``: no FLOPs, no memory) and records every ``nn.Conv`` / ``nn.Dense`` call.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "LayerShape",
    "LayerOps",
    "Report",
    "layer_shapes",
    "count_ops",
    "count_model_ops",
    "potential_speedup",
    "eliminated_fraction",
    "bits_per_weight",
    "MAC8_SPEEDUP",
    "TERNARY_SPEEDUP",
    "BINARY_SPEEDUP",
]

# The paper's cost model, relative to one FP32 multiply-accumulate.
MAC8_SPEEDUP = 4.0  # an 8-bit multiply-accumulate
TERNARY_SPEEDUP = 16.0  # a ternary accumulate: 8-bit activation added or subtracted (or skipped)
BINARY_SPEEDUP = 32.0  # a binary product (XNOR / AND + popcount), 1-bit operands (module docstring)

_LINEAR = (nn.Conv, nn.Dense)


# --------------------------------------------------------------------------------------------------
# closed-form per-N figures
# --------------------------------------------------------------------------------------------------
def _check_n(n) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"group size must be an int >= 1, got {n!r}")
    return int(n)


def potential_speedup(
    n: int, mac8_speedup: float = MAC8_SPEEDUP, ternary_speedup: float = TERNARY_SPEEDUP
) -> float:
    """The paper's potential speedup over FP32 of a ternary layer with groups of ``n`` weights.

    ``1 / ((1/n)/mac8_speedup + (1 - 1/n)/ternary_speedup)``: a fraction ``1/n`` of the MACs remain as
    8-bit multiplications (assumed 4x faster than FP32) and the rest become ternary accumulations
    (assumed 16x faster). n=4 -> 64/7 = 9.142857..., n=64 -> 1024/67 = 15.283582...
    A binary layer (1-bit weights and activations) is ``potential_speedup(n, ternary_speedup=BINARY_SPEEDUP)``.
    """
    f = 1.0 / _check_n(n)
    return 1.0 / (f / mac8_speedup + (1.0 - f) / ternary_speedup)


def eliminated_fraction(n: int) -> float:
    """Fraction of multiplications eliminated by groups of ``n`` (``1 - 1/n``; 0.75 at n=4)."""
    return 1.0 - 1.0 / _check_n(n)


def _scale_bits(scale_bits) -> int:
    names = {"float16": 16, "fp16": 16, "bfloat16": 16, "bf16": 16, "float32": 32, "fp32": 32}
    if isinstance(scale_bits, str):
        if scale_bits not in names:
            raise ValueError(f"unknown scale dtype {scale_bits!r}; expected one of {sorted(names)}")
        return names[scale_bits]
    if isinstance(scale_bits, bool) or not isinstance(scale_bits, int) or scale_bits < 1:
        raise ValueError(f"scale_bits must be a positive int (16 or 32), got {scale_bits!r}")
    return scale_bits


def bits_per_weight(n: int, scale_bits: int | str = 16, reduction_length: int | None = None) -> float:
    """Storage bits per ternary weight with groups of ``n``: 2 bits per code plus the scales.

    Without ``reduction_length``: ``2 + scale_bits / n`` (n divides the reduction vector). With it,
    the exact figure for vectors of length L: ``2 + scale_bits * ceil(L/n) / L``.
    """
    n, sb = _check_n(n), _scale_bits(scale_bits)
    if reduction_length is None:
        return 2.0 + sb / n
    return 2.0 + sb * math.ceil(reduction_length / n) / reduction_length


# --------------------------------------------------------------------------------------------------
# layer discovery
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LayerShape:
    """One conv/dense call of a model, for one example.

    path: '/'-joined module path (the layer's parameter path without ``/kernel``).
    kind: "conv" or "dense".
    kernel_shape: Flax layout, conv (kh, kw, cin/feature_groups, cout), dense (in, out).
    output_shape: the call's output shape without the batch axis, e.g. (H', W', cout) or (out,).
    """

    path: str
    kind: str
    kernel_shape: tuple[int, ...]
    output_shape: tuple[int, ...]

    @property
    def reduction_length(self) -> int:
        """L: weights per output element (product of all kernel axes but the last)."""
        return math.prod(self.kernel_shape[:-1])

    @property
    def cout(self) -> int:
        return self.kernel_shape[-1]

    @property
    def num_weights(self) -> int:
        return math.prod(self.kernel_shape)

    @property
    def positions(self) -> int:
        """Output positions per example (H'*W' for a conv, 1 for a plain dense layer)."""
        return math.prod(self.output_shape[:-1])

    @property
    def outputs(self) -> int:
        return self.positions * self.output_shape[-1]

    @property
    def macs(self) -> int:
        return self.outputs * self.reduction_length


def _path(module: nn.Module) -> str:
    return "/".join(str(p) for p in module.path)


def layer_shapes(
    module: nn.Module,
    variables: Any,
    input_shape: Sequence[int],
    *,
    input_dtype=jnp.float32,
    **apply_kwargs,
) -> list[LayerShape]:
    """Every ``nn.Conv`` / ``nn.Dense`` call of a Linen model, in call order.

    The model is run abstractly (``jax.eval_shape``; nothing is computed) on one example of
    ``input_shape`` (without the batch axis, e.g. (H, W, C)), with a method interceptor recording the
    path, kernel shape and output shape of each call. A layer called twice (weight sharing) gives two
    entries with the same path.

    Args:
      module: a Flax Linen module (unbound).
      variables: its variables ({"params": ..., "batch_stats": ...}); arrays or ShapeDtypeStructs.
        ``None``: the model is initialised abstractly instead (with ``apply_kwargs`` too).
      input_shape: per-example input shape.
      **apply_kwargs: forwarded to ``module.apply`` / ``init`` (e.g. ``train=False``).
    """
    records: list[LayerShape] = []

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        mod = context.module
        if context.method_name == "__call__" and isinstance(mod, _LINEAR):
            kernel = mod.get_variable("params", "kernel")
            if kernel is None:  # e.g. a kernel supplied by another collection: derive nothing, fail loud
                raise ValueError(f"layer {_path(mod)!r} has no params/kernel")
            if out.shape[0] != 1:
                raise ValueError(f"layer {_path(mod)!r}: expected a batch of 1, got output {out.shape}")
            records.append(
                LayerShape(
                    path=_path(mod),
                    kind="conv" if isinstance(mod, nn.Conv) else "dense",
                    kernel_shape=tuple(int(d) for d in kernel.shape),
                    output_shape=tuple(int(d) for d in out.shape[1:]),
                )
            )
        return out

    x = jax.ShapeDtypeStruct((1, *map(int, input_shape)), input_dtype)
    with nn.intercept_methods(interceptor):
        if variables is None:
            jax.eval_shape(lambda k, v: module.init(k, v, **apply_kwargs), jax.random.key(0), x)
        else:
            # mutable=True: a model that updates state (e.g. BN with train=True) still runs.
            jax.eval_shape(lambda v, xx: module.apply(v, xx, mutable=True, **apply_kwargs), variables, x)
    return records


# --------------------------------------------------------------------------------------------------
# quantization specs
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Quant:
    kind: str  # "fp" | "int8" | "ternary"
    group: int | str | None = None  # ternary: int N | "channel" | "tensor" | "kernel"
    asymmetric: bool = False
    code_bits: int = 2
    per_channel: bool = True  # int8 scales

    @property
    def label(self) -> str:
        if self.kind != "ternary":
            return self.kind
        g = f"N={self.group}" if isinstance(self.group, int) else self.group
        return f"ternary({g}{', asym' if self.asymmetric else ''}{', binary' if self.code_bits == 1 else ''})"


def _parse_quant(spec, path: str) -> _Quant:
    """Normalise one entry of ``quantized`` (see :func:`count_ops`)."""
    if spec is None or spec in ("fp", "float", "fp32"):
        return _Quant("fp")
    if isinstance(spec, str):
        if spec == "int8":
            return _Quant("int8")
        if spec in ("channel", "tensor", "kernel"):
            return _Quant("ternary", spec)
        raise ValueError(f"{path}: unknown quantization spec {spec!r}")
    if isinstance(spec, bool):
        raise ValueError(f"{path}: a bool is not a quantization spec")
    if isinstance(spec, numbers.Integral):
        return _Quant("ternary", _check_n(spec))
    # Duck-typed transforms.WeightQuant / transforms.Int8Weights (no import: avoids a module cycle).
    if hasattr(spec, "group_size"):
        g = spec.group_size
        if getattr(spec, "grouping", "input") == "kernel":
            g = "kernel"
        elif g is None:
            g = "tensor"
        elif g != "channel":
            g = _check_n(g)
        method = getattr(spec, "method", "exact")
        return _Quant("ternary", g, bool(getattr(spec, "asymmetric", False)), 1 if method == "binary" else 2)
    if hasattr(spec, "per_channel"):
        return _Quant("int8", per_channel=bool(spec.per_channel))
    raise ValueError(f"{path}: unknown quantization spec {spec!r}")


# --------------------------------------------------------------------------------------------------
# per-layer and total counts
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LayerOps:
    """Counts of one layer for one example (see the module docstring for the definitions)."""

    layer: LayerShape
    quant: str  # e.g. "fp", "int8", "ternary(N=4)"
    macs: int
    mults: int  # multiplications left
    additions: int
    num_scales: int  # stored scales (ternary/int8), 0 for fp
    weight_bits: int  # storage of codes/weights plus scales
    time: float  # the paper's cost model, in FP32-MAC units
    binary_ops: int = 0  # XNOR/AND + popcount bit products (binary weights and 1-bit activations)

    @property
    def path(self) -> str:
        return self.layer.path

    @property
    def eliminated(self) -> float:
        """Fraction of this layer's multiplications eliminated."""
        return 1.0 - self.mults / self.macs if self.macs else 0.0

    @property
    def bits_per_weight(self) -> float:
        return self.weight_bits / self.layer.num_weights

    @property
    def speedup(self) -> float:
        return self.macs / self.time if self.time else 1.0


@dataclasses.dataclass(frozen=True)
class Report:
    """Per-layer rows and network totals (all per example)."""

    rows: tuple[LayerOps, ...]
    scale_bits: int

    @property
    def macs(self) -> int:
        return sum(r.macs for r in self.rows)

    @property
    def mults(self) -> int:
        return sum(r.mults for r in self.rows)

    @property
    def additions(self) -> int:
        return sum(r.additions for r in self.rows)

    @property
    def binary_ops(self) -> int:
        """Bit products (XNOR / AND + popcount) of the binary layers (see the module docstring)."""
        return sum(r.binary_ops for r in self.rows)

    @property
    def eliminated(self) -> float:
        """Fraction of all multiplications eliminated."""
        return 1.0 - self.mults / self.macs if self.macs else 0.0

    @property
    def num_weights(self) -> int:
        return sum(r.layer.num_weights for r in self._unique_rows())

    @property
    def weight_bits(self) -> int:
        return sum(r.weight_bits for r in self._unique_rows())

    @property
    def bits_per_weight(self) -> float:
        """Average storage bits per weight over all conv/dense kernels (FP ones included)."""
        return self.weight_bits / self.num_weights if self.num_weights else 0.0

    @property
    def ternary_bits_per_weight(self) -> float:
        """Average storage bits per weight over the ternary layers only."""
        rows = [r for r in self._unique_rows() if r.quant.startswith("ternary")]
        n = sum(r.layer.num_weights for r in rows)
        return sum(r.weight_bits for r in rows) / n if n else 0.0

    @property
    def potential_speedup(self) -> float:
        """Network speedup over FP32 in the paper's model: sum of MACs / sum of layer times."""
        t = sum(r.time for r in self.rows)
        return self.macs / t if t else 1.0

    def _unique_rows(self):
        # A layer called several times (shared weights) is stored once.
        seen, out = set(), []
        for r in self.rows:
            if r.path not in seen:
                seen.add(r.path)
                out.append(r)
        return out

    def to_dict(self) -> dict:
        """Plain-Python summary (JSON-serialisable)."""
        return {
            "layers": [
                {
                    "path": r.path,
                    "kind": r.layer.kind,
                    "kernel_shape": list(r.layer.kernel_shape),
                    "output_shape": list(r.layer.output_shape),
                    "quant": r.quant,
                    "macs": r.macs,
                    "mults": r.mults,
                    "additions": r.additions,
                    "binary_ops": r.binary_ops,
                    "eliminated": r.eliminated,
                    "bits_per_weight": r.bits_per_weight,
                    "potential_speedup": r.speedup,
                }
                for r in self.rows
            ],
            "macs": self.macs,
            "mults": self.mults,
            "additions": self.additions,
            "binary_ops": self.binary_ops,
            "eliminated": self.eliminated,
            "num_weights": self.num_weights,
            "weight_bits": self.weight_bits,
            "bits_per_weight": self.bits_per_weight,
            "ternary_bits_per_weight": self.ternary_bits_per_weight,
            "potential_speedup": self.potential_speedup,
            "scale_bits": self.scale_bits,
        }

    def table(self) -> str:
        """A fixed-width text table: one line per layer, then the totals."""
        head = f"{'layer':<32} {'quant':<18} {'kernel':<18} {'MACs':>12} {'mults':>12} {'elim%':>6} {'b/w':>6} {'x':>6}"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lines.append(
                f"{r.path:<32} {r.quant:<18} {'x'.join(map(str, r.layer.kernel_shape)):<18} "
                f"{r.macs:>12,} {r.mults:>12,} {100 * r.eliminated:>6.2f} {r.bits_per_weight:>6.2f} "
                f"{r.speedup:>6.2f}"
            )
        lines.append("-" * len(head))
        lines.append(
            f"{'total':<32} {'':<18} {'':<18} {self.macs:>12,} {self.mults:>12,} "
            f"{100 * self.eliminated:>6.2f} {self.bits_per_weight:>6.2f} {self.potential_speedup:>6.2f}"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _parse_act(spec, path: str) -> tuple[int | None, bool | None]:
    """(bits, signed) of one entry of ``act_bits`` (see :func:`count_ops`); signed None: unknown."""
    if spec is None:
        return None, None
    if isinstance(spec, tuple) and len(spec) == 2:
        bits, signed = spec
    else:
        bits, signed = spec, None
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or bits < 1:
        raise ValueError(f"{path}: activation bits must be an int >= 1 or None, got {spec!r}")
    return int(bits), (None if signed is None else bool(signed))


def _binary_label(signed: bool | None) -> str:
    return {True: " a1-xnor", False: " a1-and", None: " a1"}[signed]


def _layer_ops(layer: LayerShape, q: _Quant, scale_bits: int, fp_bits: int,
               act: tuple[int | None, bool | None] = (None, None)) -> LayerOps:
    L, cout, numel, macs = layer.reduction_length, layer.cout, layer.num_weights, layer.macs
    additions = layer.outputs * (L - 1)
    if q.kind == "fp":
        return LayerOps(layer, "fp", macs, macs, additions, 0, numel * fp_bits, float(macs))
    if q.kind == "int8":
        ns = cout if q.per_channel else 1
        return LayerOps(layer, "int8", macs, macs, additions, ns, numel * 8 + ns * scale_bits,
                        macs / MAC8_SPEEDUP)
    # ternary: G groups (one scale, one multiplication) per output element
    if q.group == "tensor" or q.group == "channel":
        g = 1
    elif q.group == "kernel":
        spatial = math.prod(layer.kernel_shape[:-2]) if len(layer.kernel_shape) > 2 else 1
        g = L // spatial  # one group per input channel: its kh*kw weights
    else:
        g = math.ceil(L / q.group)
    ns = 1 if q.group == "tensor" else cout * g
    ns *= 2 if q.asymmetric else 1
    mults = layer.outputs * g
    bits = numel * q.code_bits + ns * scale_bits
    if q.code_bits == 1 and act[0] == 1:  # binary weights x binary activations: bit operations
        time = mults / MAC8_SPEEDUP + (macs - mults) / BINARY_SPEEDUP
        return LayerOps(layer, q.label + _binary_label(act[1]), macs, mults, additions, ns, bits, time,
                        binary_ops=macs)
    time = mults / MAC8_SPEEDUP + (macs - mults) / TERNARY_SPEEDUP
    return LayerOps(layer, q.label, macs, mults, additions, ns, bits, time)


def count_ops(
    layers: Sequence[LayerShape],
    quantized: Mapping[str, Any] | Callable[[str], Any] | None = None,
    scale_bits: int | str = 16,
    *,
    fp_bits: int = 32,
    strict: bool = False,
    act_bits: Mapping[str, Any] | None = None,
) -> Report:
    """Per-layer and total MACs, remaining multiplications, additions, storage and speedup.

    Args:
      layers: from :func:`layer_shapes`.
      quantized: how each layer's weights are stored, by layer path (``"stage1/conv1"``) or kernel
        path (``"stage1/conv1/kernel"``, as :func:`fgq_jax.transforms.quantized_paths` returns), or a
        callable ``path -> spec``. A spec is
          - an int ``N``: ternary with groups of N; ``"channel"`` / ``"tensor"`` / ``"kernel"``:
            ternary with per-output-channel / per-tensor / per-kernel-slice scales;
          - ``"int8"``: 8-bit weights with per-channel scales;
          - ``None`` or ``"fp"`` (or a layer not in the mapping): full precision;
          - a ``transforms.WeightQuant`` / ``transforms.Int8Weights`` object (read by attribute;
            ``WeightQuant(group_size=None)`` is per-tensor ternary, ``method="binary"`` 1-bit codes,
            ``asymmetric=True`` two scales per group).
        Note ``None`` means *full precision* here (as in ``quantized_paths``), not per-tensor: write
        ``"tensor"`` for a per-tensor ternary layer.
      scale_bits: 16 (fp16 scales, the default) or 32, or "float16"/"float32".
      fp_bits: storage bits of a full-precision weight.
      strict: raise if a key of ``quantized`` matches no layer (catches typos in paths).
      act_bits: the layers' input activations, by layer path: an int of bits or a ``(bits, signed)``
        pair (``ActConfig.spec()`` as it is); absent / None: not quantized. Only used to find the
        binary layers (1-bit weight codes and 1-bit activations, counted in ``binary_ops``).
    """
    sb = _scale_bits(scale_bits)
    if callable(quantized) and not isinstance(quantized, Mapping):
        lookup = quantized
    else:
        table = dict(quantized or {})
        if strict:
            known = {ly.path for ly in layers} | {ly.path + "/kernel" for ly in layers}
            unknown = sorted(k for k in table if k not in known)
            if unknown:
                raise ValueError(f"quantized names layers that do not exist: {unknown}")

        def lookup(path):
            return table.get(path, table.get(path + "/kernel"))

    acts = dict(act_bits or {})
    rows = tuple(
        _layer_ops(ly, _parse_quant(lookup(ly.path), ly.path), sb, fp_bits, _parse_act(acts.get(ly.path), ly.path))
        for ly in layers
    )
    return Report(rows, sb)


def count_model_ops(
    module: nn.Module,
    variables: Any,
    input_shape: Sequence[int],
    quantized: Mapping[str, Any] | Callable[[str], Any] | None = None,
    scale_bits: int | str = 16,
    act_bits: Mapping[str, Any] | None = None,
    **apply_kwargs,
) -> Report:
    """``count_ops(layer_shapes(module, variables, input_shape, **apply_kwargs), quantized, scale_bits,
    act_bits=act_bits)``."""
    return count_ops(layer_shapes(module, variables, input_shape, **apply_kwargs), quantized, scale_bits,
                     act_bits=act_bits)
