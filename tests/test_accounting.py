"""Tests for fgq_jax.accounting: the paper's figures and a hand-counted Linen model."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from fgq_jax.accounting import (
    LayerShape,
    bits_per_weight,
    count_model_ops,
    count_ops,
    eliminated_fraction,
    layer_shapes,
    potential_speedup,
)


# ------------------------------------------------------------------------------ paper's figures
def test_paper_figures():
    assert eliminated_fraction(4) == 0.75
    assert potential_speedup(4) == pytest.approx(64 / 7, rel=1e-12)  # 9.142857...
    assert round(potential_speedup(4), 2) == 9.14
    assert eliminated_fraction(64) == pytest.approx(0.984375)
    assert potential_speedup(64) == pytest.approx(1024 / 67, rel=1e-12)  # 15.2836...
    assert 15.2 < potential_speedup(64) < 15.3
    assert potential_speedup(1) == pytest.approx(4.0)  # every MAC stays an 8-bit MAC
    assert potential_speedup(10**9) == pytest.approx(16.0, rel=1e-6)  # limit: all ternary
    # monotone in N
    vals = [potential_speedup(n) for n in (1, 2, 4, 8, 16, 32, 64, 128)]
    assert vals == sorted(vals)


def test_bits_per_weight_formula():
    assert bits_per_weight(4) == 6.0  # 2 + 16/4
    assert bits_per_weight(4, "float32") == 10.0
    assert bits_per_weight(64, 16) == 2.25
    assert bits_per_weight(64, 32) == 2.5
    # N does not divide L = 27: ceil(27/4) = 7 scales for 27 weights
    assert bits_per_weight(4, 16, reduction_length=27) == pytest.approx(2 + 16 * 7 / 27)


@pytest.mark.parametrize("bad", [0, -4, 2.5, True, None, "4"])
def test_bad_group_size(bad):
    with pytest.raises(ValueError):
        potential_speedup(bad)


# ----------------------------------------------------------------------------- hand-built model
class Block(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(16, (3, 3), strides=2, padding="SAME", name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
        return nn.relu(x)


class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(8, (3, 3), padding="SAME", name="conv1")(x))  # 8x8x3 -> 8x8x8
        x = Block(name="block0")(x, train)  # -> 4x4x16
        x = nn.Conv(16, (1, 1), padding="VALID", name="conv3")(x)  # -> 4x4x16
        x = x.mean(axis=(1, 2))
        return nn.Dense(10, name="fc")(x)


# Hand counts (one example of 8x8x3):
#   conv1: kernel 3x3x3x8,  L=27, 8*8 positions, 512 outputs, MACs 512*27 = 13824
#   conv : kernel 3x3x8x16, L=72, 4*4 positions, 256 outputs, MACs 256*72 = 18432
#   conv3: kernel 1x1x16x16, L=16, 16 positions, 256 outputs, MACs 4096
#   fc   : kernel 16x10,    L=16, 1 position,   10 outputs,  MACs 160
EXPECTED = [
    ("conv1", "conv", (3, 3, 3, 8), (8, 8, 8), 13824),
    ("block0/conv", "conv", (3, 3, 8, 16), (4, 4, 16), 18432),
    ("conv3", "conv", (1, 1, 16, 16), (4, 4, 16), 4096),
    ("fc", "dense", (16, 10), (10,), 160),
]


@pytest.fixture(scope="module")
def tiny():
    model = Tiny()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    return model, variables


def test_layer_shapes(tiny):
    model, variables = tiny
    layers = layer_shapes(model, variables, (8, 8, 3), train=False)
    got = [(ly.path, ly.kind, ly.kernel_shape, ly.output_shape, ly.macs) for ly in layers]
    assert got == EXPECTED
    # abstract variables and no variables (abstract init) give the same answer
    abstract = jax.eval_shape(lambda: variables)
    assert layer_shapes(model, abstract, (8, 8, 3)) == layers
    assert layer_shapes(model, None, (8, 8, 3)) == layers
    # train=True mutates batch_stats: still fine
    assert layer_shapes(model, variables, (8, 8, 3), train=True) == layers
    # paths match the parameter tree
    for ly in layers:
        node = variables["params"]
        for k in ly.path.split("/"):
            node = node[k]
        assert node["kernel"].shape == ly.kernel_shape


def test_count_ops_hand_model(tiny):
    model, variables = tiny
    layers = layer_shapes(model, variables, (8, 8, 3))
    quant = {"block0/conv/kernel": 4, "conv3": 5, "fc": "int8"}  # conv1 absent -> FP
    rep = count_ops(layers, quant, scale_bits=16)
    rows = {r.path: r for r in rep.rows}

    assert [r.quant for r in rep.rows] == ["fp", "ternary(N=4)", "ternary(N=5)", "int8"]
    # multiplications: FP/int8 keep all; N=4 on L=72 -> 18 per output; N=5 on L=16 -> ceil = 4
    assert rows["conv1"].mults == 13824
    assert rows["block0/conv"].mults == 256 * 18 == 4608
    assert rows["block0/conv"].eliminated == 0.75
    assert rows["conv3"].mults == 256 * 4 == 1024
    assert rows["conv3"].eliminated == 0.75
    assert rows["fc"].mults == 160
    # additions: L-1 per output element
    assert [r.additions for r in rep.rows] == [512 * 26, 256 * 71, 256 * 15, 10 * 15]
    # storage: codes 2 bits + one fp16 scale per group; int8 + per-channel fp16 scales; FP 32 bits
    assert rows["conv1"].weight_bits == 216 * 32
    assert rows["block0/conv"].weight_bits == 1152 * 2 + 16 * 18 * 16  # = 6 bits/weight
    assert rows["block0/conv"].bits_per_weight == 6.0
    assert rows["conv3"].weight_bits == 256 * 2 + 16 * 4 * 16
    assert rows["fc"].weight_bits == 160 * 8 + 10 * 16
    # speedups in the paper's model
    assert rows["conv1"].speedup == 1.0
    assert rows["block0/conv"].speedup == pytest.approx(potential_speedup(4))
    assert rows["fc"].speedup == 4.0

    macs = 13824 + 18432 + 4096 + 160
    mults = 13824 + 4608 + 1024 + 160
    time = 13824 + (4608 / 4 + (18432 - 4608) / 16) + (1024 / 4 + (4096 - 1024) / 16) + 160 / 4
    assert rep.macs == macs == 36512
    assert rep.mults == mults
    assert rep.eliminated == pytest.approx(1 - mults / macs)
    assert rep.additions == 512 * 26 + 256 * 71 + 256 * 15 + 10 * 15
    assert rep.potential_speedup == pytest.approx(macs / time)  # = 36512 / 16328
    assert rep.num_weights == 216 + 1152 + 256 + 160
    bits = 216 * 32 + (1152 * 2 + 288 * 16) + (256 * 2 + 64 * 16) + (160 * 8 + 160)
    assert rep.weight_bits == bits
    assert rep.bits_per_weight == pytest.approx(bits / 1784)
    assert rep.ternary_bits_per_weight == pytest.approx(6.0)

    # fp32 scales: only the scale term changes
    rep32 = count_ops(layers, quant, scale_bits="float32")
    assert rep32.weight_bits - rep.weight_bits == 16 * (288 + 64 + 10)
    # summaries
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["macs"] == macs and len(d["layers"]) == 4
    assert "block0/conv" in rep.table() and "total" in str(rep)


def test_all_ternary_matches_closed_form():
    # every layer ternary with N dividing L: network figures equal the per-N formulas
    layers = [
        LayerShape("a", "conv", (3, 3, 64, 64), (14, 14, 64)),
        LayerShape("b", "conv", (1, 1, 256, 128), (7, 7, 128)),
        LayerShape("c", "dense", (512, 100), (100,)),
    ]
    for n in (4, 64):
        rep = count_ops(layers, lambda p: n)
        assert rep.eliminated == pytest.approx(eliminated_fraction(n))
        assert rep.potential_speedup == pytest.approx(potential_speedup(n))
        assert rep.bits_per_weight == pytest.approx(bits_per_weight(n))
    # N >= L: one group, one multiplication per output element
    rep = count_ops(layers, lambda p: 10**6)
    assert rep.mults == sum(ly.outputs for ly in layers)
    assert count_ops(layers, lambda p: "channel").mults == rep.mults
    assert count_ops(layers, lambda p: "tensor").rows[0].num_scales == 1
    # nothing quantized: no elimination, speedup 1, 32 bits/weight
    fp = count_ops(layers)
    assert fp.eliminated == 0 and fp.potential_speedup == 1.0 and fp.bits_per_weight == 32.0


def test_spec_objects_and_kernel_grouping():
    @dataclasses.dataclass(frozen=True)
    class WeightQuant:  # duck-typed stand-in for fgq_jax.transforms.WeightQuant
        method: str = "exact"
        group_size: object = 4
        asymmetric: bool = False
        grouping: str = "input"

    @dataclasses.dataclass(frozen=True)
    class Int8Weights:
        per_channel: bool = True

    layer = LayerShape("c", "conv", (3, 3, 8, 16), (4, 4, 16))
    def one(spec):
        return count_ops([layer], {"c/kernel": spec}).rows[0]

    assert one(WeightQuant()).mults == one(4).mults == 256 * 18
    asym = one(WeightQuant(asymmetric=True))
    assert asym.num_scales == 2 * 16 * 18 and asym.quant == "ternary(N=4, asym)"
    assert one(WeightQuant(group_size=None)).num_scales == 1
    # per-kernel-slice groups: one group (scale, multiplication) per input channel
    k = one(WeightQuant(group_size=None, grouping="kernel"))
    assert k.mults == 256 * 8 and k.num_scales == 16 * 8 and k == one("kernel")
    b = one(WeightQuant(method="binary"))
    assert b.weight_bits == 1152 * 1 + 16 * 18 * 16
    assert one(Int8Weights(per_channel=False)).weight_bits == 1152 * 8 + 16
    assert one(None).quant == "fp"
    with pytest.raises(ValueError, match="unknown"):
        one("int4")
    with pytest.raises(ValueError):
        one(0)
    with pytest.raises(ValueError, match="do not exist"):
        count_ops([layer], {"typo/kernel": 4}, strict=True)
    with pytest.raises(ValueError):
        count_ops([layer], {}, scale_bits=0)


def test_shared_layer_counts_each_call():
    class Shared(nn.Module):
        @nn.compact
        def __call__(self, x):
            d = nn.Dense(4, name="d")
            return d(d(x))

    m = Shared()
    layers = layer_shapes(m, None, (4,))
    assert [ly.path for ly in layers] == ["d", "d"]
    rep = count_ops(layers, {"d": 2})
    assert rep.macs == 2 * 16 and rep.mults == 2 * 4 * 2
    assert rep.num_weights == 16  # stored once


def test_count_model_ops_matches(tiny):
    model, variables = tiny
    rep = count_model_ops(model, variables, (8, 8, 3), {"conv3": 4}, train=False)
    assert rep.macs == 36512
    assert rep.rows[2].mults == 256 * 4
