"""The quantization recipe: the one value that defines a quantized model.

A :class:`QuantRecipe` holds everything that decides what a quantized network computes:

* ``weights`` (:class:`WeightSpec`): ternary method, group size N, grouping, one or two scales, and
  the policy for the model's first and last layers (kept FP or int8), applied by layer path;
* ``activations`` (:class:`ActivationSpec`): bits and calibrator of the quantized layer inputs;
* ``repairs`` (:class:`RepairSpec`): the label-free repairs and their budgets;
* ``seed``: the sample of unlabeled images and their augmentation.

It is frozen, hashable and validated once, at construction; every consumer takes it —
post-training quantization (:func:`fgq_jax.ptq.quantize_model`), fine-tuning (:mod:`fgq_jax.train`),
the sweep (which derives each CSV row from it and parses rows back, :meth:`QuantRecipe.key` /
:meth:`QuantRecipe.from_key`) and the peer comparison. Flat spellings (``method=``, ``act_bits=``,
``bn_reestimate=`` ...) build and override it (:meth:`QuantRecipe.make`, :meth:`QuantRecipe.replace`),
which is what config files and ``--set`` overrides use.
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Mapping

from fgq_jax.activations import Calibration
from fgq_jax.transforms import Rule, WeightQuant, default_rules

__all__ = [
    "FIRST_LAST",
    "REPAIRS",
    "KEY_COLUMNS",
    "WeightSpec",
    "ActivationSpec",
    "RepairSpec",
    "QuantRecipe",
    "check_fields",
]

FIRST_LAST = ("fp", "8")
REPAIRS = ("bn_reestimate", "bias_correct", "scale_fit", "equalize", "reconstruct", "recalibrate")
# The row key of a point (besides the model): exactly the CSV spelling of the committed results.
# A repair added later is a new key column; rows written before it read it as false.
KEY_COLUMNS = ("method", "group_size", "act_bits", "first_last", *REPAIRS)
ACT_BITS_RANGE = (1, 16)  # 1: binary activations (BNN / XNOR-Net), see fgq_jax.activations


def check_fields(cls_name: str, given, known) -> None:
    """ValueError naming each unknown field of ``cls_name`` and the closest known name."""
    unknown = sorted(set(given) - set(known))
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, list(known), n=1)
        hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise ValueError(f"unknown {cls_name} field(s): {', '.join(hints)}; known: {sorted(known)}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """Weight quantization of the conv/dense kernels.

    method: "fp" (weights stay full precision) or a method of :mod:`fgq_jax.ternary`.
    group_size: int N >= 1, "channel" (one scale per output channel) or None / "tensor" (one per
      tensor; normalised to None). Ignored (None) with grouping="kernel" and with method "fp".
    asymmetric: two scales per group (TNT-style) instead of one.
    grouping: "input" (N consecutive input-channel weights) or "kernel" (one group per kernel slice).
    first_last: the model's first and last layers (by layer path, `fgq_jax.models.ModelSpec`) stay
      full precision ("fp") or get int8 weights ("8").
    """

    method: str = "exact"
    group_size: Any = 4
    asymmetric: bool = False
    grouping: str = "input"
    first_last: str = "fp"

    def __post_init__(self):
        if self.first_last not in FIRST_LAST:
            raise ValueError(f"first_last must be one of {FIRST_LAST}, got {self.first_last!r}")
        if not isinstance(self.asymmetric, bool):
            raise ValueError(f"asymmetric must be a bool, got {self.asymmetric!r}")
        if self.method == "fp":
            if self.asymmetric or self.first_last != "fp":
                raise ValueError("method 'fp' keeps every weight in full precision: "
                                 "asymmetric and first_last='8' do not apply")
            object.__setattr__(self, "group_size", None)
            return
        gs = None if self.group_size == "tensor" else self.group_size
        # WeightQuant validates method, group size and grouping (the ternary API's own checks).
        wq = WeightQuant(self.method, gs, self.asymmetric, self.grouping)
        object.__setattr__(self, "group_size", wq.group_size)

    @property
    def quantized(self) -> bool:
        return self.method != "fp"

    @property
    def label(self) -> str:
        """The method as a results row spells it: "exact", "exact+asym", "fp", ..."""
        return self.method + ("+asym" if self.asymmetric else "")

    @property
    def group_label(self) -> str | int:
        """N as a results row spells it: an int, "channel", "tensor", "kernel" or "fp"."""
        if not self.quantized:
            return "fp"
        if self.grouping == "kernel":
            return "kernel"
        return "tensor" if self.group_size is None else self.group_size

    def weight_quant(self) -> WeightQuant:
        return WeightQuant(self.method, self.group_size, self.asymmetric, self.grouping)

    def rules(self, first_layer: str, last_layer: str) -> tuple[Rule, ...]:
        """The path rules of :mod:`fgq_jax.transforms` for a model whose first and last layers have
        these parameter paths; () for method "fp"."""
        if not self.quantized:
            return ()
        return default_rules(self.weight_quant(), first_layer, last_layer, first_last=self.first_last)


@dataclasses.dataclass(frozen=True)
class ActivationSpec:
    """Activation quantization at the inputs of the quantized layers.

    bits: None (full precision) or an int in [1, 16]; 1 is the binary activation of BNN / XNOR-Net
    (signed inputs -> {-s, +s} = s * sign(x), unsigned -> {0, s}; hard-tanh STE clipped at s; see
    :mod:`fgq_jax.activations`). Which layers: the inputs of every layer whose
    weights are quantized, except the network input (the first layer's); with FP weights (method
    "fp"), every conv/dense input but the first. Signedness: a layer whose calibration inputs are
    never negative (after a ReLU) gets an unsigned quantizer, otherwise a signed one.
    calibration: how each step is chosen (:class:`fgq_jax.activations.Calibration`); its method
    "mean" (XNOR-Net's mean|x|) is for bits=1 only.
    num_calib: unlabeled images the steps are calibrated on.
    """

    bits: int | None = 8
    calibration: Calibration = Calibration()
    num_calib: int = 256

    def __post_init__(self):
        lo, hi = ACT_BITS_RANGE
        if self.bits is not None and not (_is_int(self.bits) and lo <= self.bits <= hi):
            raise ValueError(f"act_bits must be None or an int in [{lo}, {hi}], got {self.bits!r}")
        if isinstance(self.calibration, Mapping):
            object.__setattr__(self, "calibration", Calibration(**self.calibration))
        if not isinstance(self.calibration, Calibration):
            raise ValueError(f"calibration must be a Calibration, got {self.calibration!r}")
        if self.calibration.method == "mean" and self.bits != 1:
            raise ValueError(f"calibration method 'mean' is for act_bits=1 only, got act_bits={self.bits!r}")
        if not (_is_int(self.num_calib) and self.num_calib >= 1):
            raise ValueError(f"num_calib must be an int >= 1, got {self.num_calib!r}")

    @property
    def label(self) -> str | int:
        return "fp" if self.bits is None else self.bits


@dataclasses.dataclass(frozen=True)
class RepairSpec:
    """Label-free repairs, in the order quantize_model applies them: cross-layer equalization of
    the FP weights before ternarization (`fgq_jax.equalize`; data-free, for models that declare
    equalization pairs), then on the ternarized network scale fitting (`fgq_jax.repairs`), block
    reconstruction (`fgq_jax.reconstruct`), bias correction, BN re-estimation (then the activation
    steps are recalibrated).

    recalibrate: also recalibrate the activation steps right after each repair that changes the
      ternary weights (scale fitting, reconstruction), so that the next repair sees the activation
      quantization of the network it acts on. Off (the default, and every result made before it
      existed), every repair runs with the steps calibrated on the freshly ternarized network, which
      is far off where that network is broken (SqueezeNet at N=4: 3 % top-1 before its repairs).

    num_repair: unlabeled images the repairs see; num_fit: the first of them used by scale fitting;
    num_recon: the first of them used by block reconstruction (<= num_repair), recon_iters its Adam
    steps per block, recon_batch its images per step, recon_qdrop the probability that an element
    of a block's input is the FP network's (QDrop; 0 = plain BRECQ-style reconstruction),
    recon_unit "block" (top-level submodules) or "layer" (each layer alone, exact quadratic form of
    its output error: much cheaper; see `fgq_jax.reconstruct.ReconSettings`).
    augment_images: the repairs see the images with the training augmentation (CIFAR: pad-4 random
      crop + flip). The published BatchNorm statistics were gathered on augmented images;
      re-estimating them on plain images costs the FP ResNet-20 ~1.4 points, on augmented ones it
      gains ~2.
    """

    bn_reestimate: bool = False
    bias_correct: bool = False
    scale_fit: bool = False
    equalize: bool = False
    reconstruct: bool = False
    recalibrate: bool = False
    num_repair: int = 2048
    num_fit: int = 512
    num_recon: int = 1024
    recon_iters: int = 500
    recon_batch: int = 32
    recon_qdrop: float = 0.5
    recon_unit: str = "block"
    augment_images: bool = True

    def __post_init__(self):
        for name in (*REPAIRS, "augment_images"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("num_repair", "num_fit", "num_recon", "recon_iters", "recon_batch"):
            v = getattr(self, name)
            if not (_is_int(v) and v >= 1):
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.recon_unit not in ("block", "layer"):
            raise ValueError(f"recon_unit must be 'block' or 'layer', got {self.recon_unit!r}")
        q = self.recon_qdrop
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.0 <= q <= 1.0:
            raise ValueError(f"recon_qdrop must be a number in [0, 1], got {q!r}")
        if self.reconstruct and self.num_recon > self.num_repair:
            raise ValueError(f"num_recon ({self.num_recon}) must be <= num_repair ({self.num_repair}): "
                             "reconstruction uses the first num_recon repair images")

    @property
    def any(self) -> bool:
        """A repair that needs the unlabeled repair images is on (equalization needs none)."""
        return self.bn_reestimate or self.bias_correct or self.scale_fit or self.reconstruct

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(r for r in REPAIRS if getattr(self, r))


# flat name -> (part, field): the spelling of configs, --set overrides and results rows
_FLAT = {
    "method": ("weights", "method"),
    "group_size": ("weights", "group_size"),
    "asymmetric": ("weights", "asymmetric"),
    "grouping": ("weights", "grouping"),
    "first_last": ("weights", "first_last"),
    "act_bits": ("activations", "bits"),
    "calibration": ("activations", "calibration"),
    "num_calib": ("activations", "num_calib"),
    "bn_reestimate": ("repairs", "bn_reestimate"),
    "bias_correct": ("repairs", "bias_correct"),
    "scale_fit": ("repairs", "scale_fit"),
    "equalize": ("repairs", "equalize"),
    "num_repair": ("repairs", "num_repair"),
    "num_fit": ("repairs", "num_fit"),
    "reconstruct": ("repairs", "reconstruct"),
    "recalibrate": ("repairs", "recalibrate"),
    "num_recon": ("repairs", "num_recon"),
    "recon_iters": ("repairs", "recon_iters"),
    "recon_batch": ("repairs", "recon_batch"),
    "recon_qdrop": ("repairs", "recon_qdrop"),
    "recon_unit": ("repairs", "recon_unit"),
    "augment_repair_images": ("repairs", "augment_images"),
    "seed": (None, "seed"),
}


@dataclasses.dataclass(frozen=True)
class QuantRecipe:
    """Everything that defines a quantized model (see the module docstring)."""

    weights: WeightSpec = WeightSpec()
    activations: ActivationSpec = ActivationSpec()
    repairs: RepairSpec = RepairSpec()
    seed: int = 0

    def __post_init__(self):
        for name, cls in (("weights", WeightSpec), ("activations", ActivationSpec), ("repairs", RepairSpec)):
            part = getattr(self, name)
            if isinstance(part, Mapping):
                check_fields(cls.__name__, part, [f.name for f in dataclasses.fields(cls)])
                object.__setattr__(self, name, cls(**part))
            elif not isinstance(part, cls):
                raise ValueError(f"QuantRecipe.{name} must be a {cls.__name__}, got {part!r}")
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        rep = self.repairs
        if not self.weights.quantized and (rep.bias_correct or rep.scale_fit or rep.equalize
                                           or rep.reconstruct):
            raise ValueError("method 'fp' takes only bn_reestimate among the repairs (no weight "
                             "error for bias correction, scale fitting, equalization or "
                             "reconstruction to repair)")

    # ---- flat spelling --------------------------------------------------------------------------
    @classmethod
    def make(cls, **flat) -> QuantRecipe:
        """Build from flat names, e.g. ``QuantRecipe.make(method="exact", group_size=64, act_bits=8,
        bn_reestimate=True)``; unnamed settings take their defaults."""
        return cls().replace(**flat)

    def replace(self, **flat) -> QuantRecipe:
        """A copy with flat-named settings changed (validated); unknown names are an error that
        suggests the closest known one."""
        check_fields("QuantRecipe", flat, _FLAT)
        parts = {"weights": {}, "activations": {}, "repairs": {}}
        top = {}
        for name, value in flat.items():
            part, field = _FLAT[name]
            (top if part is None else parts[part])[field] = value
        if flat.get("method") not in (None, "fp") and "group_size" not in flat and not self.weights.quantized:
            parts["weights"]["group_size"] = WeightSpec().group_size  # leaving "fp": the default N
        changed = {k: dataclasses.replace(getattr(self, k), **v) for k, v in parts.items() if v}
        return dataclasses.replace(self, **changed, **top)

    def flat(self) -> dict[str, Any]:
        """{flat name: value} of every setting (the inverse of :meth:`make`)."""
        return {name: getattr(self if part is None else getattr(self, part), field)
                for name, (part, field) in _FLAT.items()}

    # ---- results rows ---------------------------------------------------------------------------
    def key(self) -> dict[str, Any]:
        """The KEY_COLUMNS of this recipe's results row (CSV spelling: method "exact+asym", group
        size "tensor", act_bits "fp")."""
        return {
            "method": self.weights.label,
            "group_size": self.weights.group_label,
            "act_bits": self.activations.label,
            "first_last": self.weights.first_last,
            **{r: getattr(self.repairs, r) for r in REPAIRS},
        }

    @classmethod
    def from_key(cls, row: Mapping[str, Any], base: QuantRecipe | None = None) -> QuantRecipe:
        """Parse a row's KEY_COLUMNS (as :meth:`key` writes them, or as read back from a CSV, every
        value a string) into a recipe; settings that are not key columns come from ``base``."""

        def flag(v) -> bool:
            if isinstance(v, bool):
                return v
            if v in ("true", "false", "", None):  # "" / absent: a row from before that repair existed
                return v == "true"
            raise ValueError(f"expected true/false in a results row, got {v!r}")

        method, _, asym = str(row["method"]).partition("+")
        if asym not in ("", "asym"):
            raise ValueError(f"unknown method spelling {row['method']!r}")
        n = row["group_size"]
        n = int(n) if isinstance(n, str) and n.isdigit() else n
        grouping = "kernel" if n == "kernel" else "input"
        bits = row["act_bits"]
        flat = dict(
            method=method, asymmetric=bool(asym), grouping=grouping,
            group_size=None if n in ("tensor", "kernel", "fp") else n,
            act_bits=None if bits == "fp" else int(bits), first_last=str(row["first_last"]),
            **{r: flag(row.get(r)) for r in REPAIRS},
        )
        return (base or cls()).replace(**flat)

    # ---- serialization (checkpoints, JSON metadata) ----------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QuantRecipe:
        check_fields("QuantRecipe", d, [f.name for f in dataclasses.fields(cls)])
        return cls(**dict(d))

    # ---- derived --------------------------------------------------------------------------------
    def rules(self, first_layer: str, last_layer: str) -> tuple[Rule, ...]:
        return self.weights.rules(first_layer, last_layer)

    def describe(self) -> str:
        k = self.key()
        rep = "+".join(self.repairs.names) or "no-repair"
        return f"{k['method']} N={k['group_size']} a{k['act_bits']} fl={k['first_last']} {rep}"

