"""Tests for fgq_jax.accounting: the paper's figures and a hand-counted Linen model."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from fgq_jax.accounting import (
    BINARY_SPEEDUP,
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


# ------------------------------------------------------------------------ SqueezeNet (1x1, concat, ceil)
def test_fire_module_hand_count():
    """fire2 of SqueezeNet 1.1 on a 55x55x64 map: squeeze 1x1 -> 16, expand 1x1 -> 64 and 3x3 -> 64.

    Per output position: squeeze 64*16 = 1,024 MACs, expand1x1 16*64 = 1,024, expand3x3
    3*3*16*64 = 9,216 (pad 1 keeps 55x55); times 55*55 = 3,025 positions: 3,097,600 + 3,097,600 +
    27,878,400 = 34,073,600. The concat adds no MACs, and the output has 64 + 64 = 128 channels.
    """
    from fgq_jax.models.squeezenet import Fire

    fire = Fire(16, 64, 64)
    layers = layer_shapes(fire, None, (55, 55, 64))
    got = [(ly.path, ly.kernel_shape, ly.output_shape, ly.macs) for ly in layers]
    assert got == [
        ("squeeze", (1, 1, 64, 16), (55, 55, 16), 3_097_600),
        ("expand1x1", (1, 1, 16, 64), (55, 55, 64), 3_097_600),
        ("expand3x3", (3, 3, 16, 64), (55, 55, 64), 27_878_400),
    ]
    assert count_ops(layers).macs == 34_073_600
    out = jax.eval_shape(lambda: fire.init_with_output(jax.random.key(0), jnp.zeros((1, 55, 55, 64)))[0])
    assert out.shape == (1, 55, 55, 128)
    # ternary N=4: expand3x3 (L=144) keeps ceil(144/4) = 36 multiplications per output element,
    # the 1x1 convs (L=64, L=16) 16 and 4
    rep = count_ops(layers, lambda path: 4)
    assert [r.mults for r in rep.rows] == [3025 * 16 * 16, 3025 * 64 * 4, 3025 * 64 * 36]


# SqueezeNet 1.1, MACs per layer by hand. Spatial sizes: 224 -> conv 3x3/2 (no pad) 111 -> ceil-mode
# pools 55, 27, 13 (odd inputs: ceil = floor); 227 -> 113 -> 56, 28, 14 (the even inputs 56 and 28
# get a partial last window in ceil mode: floor mode would give 27 and 13). Per position of the fire
# modules (squeeze + expand1x1 + expand3x3 = cin*s + s*e + 9*s*e):
#   fire2 (64 -> 16/64/64):     1,024 +  1,024 +   9,216 =  11,264
#   fire3 (128 -> 16/64/64):    2,048 +  1,024 +   9,216 =  12,288
#   fire4 (128 -> 32/128/128):  4,096 +  4,096 +  36,864 =  45,056
#   fire5 (256 -> 32/128/128):  8,192 +  4,096 +  36,864 =  49,152
#   fire6 (256 -> 48/192/192): 12,288 +  9,216 +  82,944 = 104,448
#   fire7 (384 -> 48/192/192): 18,432 +  9,216 +  82,944 = 110,592
#   fire8 (384 -> 64/256/256): 24,576 + 16,384 + 147,456 = 188,416
#   fire9 (512 -> 64/256/256): 32,768 + 16,384 + 147,456 = 196,608
# conv1: 27*64 = 1,728 per position; classifier 1x1 512 -> 1000: 512,000 per position.
# At 224 (positions 111^2 = 12,321; 55^2 = 3,025; 27^2 = 729; 13^2 = 169):
#   conv1 21,290,688; fire2 34,073,600; fire3 37,171,200; fire4 32,845,824; fire5 35,831,808;
#   fire6 17,651,712; fire7 18,690,048; fire8 31,842,304; fire9 33,226,752; classifier 86,528,000
#   total 349,151,936 (torchvision lists 0.35 GFLOPS for squeezenet1_1)
# At 227 (113^2 = 12,769; 56^2 = 3,136; 28^2 = 784; 14^2 = 196), the registry's input size:
#   conv1 22,064,832; fire2 35,323,904; fire3 38,535,168; fire4 35,323,904; fire5 38,535,168;
#   fire6 20,471,808; fire7 21,676,032; fire8 36,929,536; fire9 38,535,168; classifier 100,352,000
#   total 387,747,520
SQUEEZENET11_MACS = {
    224: (111, 55, 27, 13, [21_290_688, 34_073_600, 37_171_200, 32_845_824, 35_831_808, 17_651_712,
                            18_690_048, 31_842_304, 33_226_752, 86_528_000], 349_151_936),
    227: (113, 56, 28, 14, [22_064_832, 35_323_904, 38_535_168, 35_323_904, 38_535_168, 20_471_808,
                            21_676_032, 36_929_536, 38_535_168, 100_352_000], 387_747_520),
}


@pytest.mark.parametrize("hw", [224, 227])
def test_squeezenet11_hand_count(hw):
    from fgq_jax.models import get_model

    conv1, s1, s2, s3, per_module, total = SQUEEZENET11_MACS[hw]
    spec = get_model("squeezenet1_1")
    layers = layer_shapes(spec.module, None, (hw, hw, 3), train=False)
    assert len(layers) == 1 + 8 * 3 + 1
    assert layers[0].path == spec.first_layer == "features_0" and layers[0].output_shape == (conv1, conv1, 64)
    assert layers[-1].path == spec.last_layer == "classifier_1" and layers[-1].output_shape == (s3, s3, 1000)
    # spatial size of each fire module's layers (after the 1st, 2nd, 3rd ceil-mode pool)
    sizes = {ly.path.split("/")[0]: ly.output_shape[0] for ly in layers[1:-1]}
    assert sizes == {"features_3": s1, "features_4": s1, "features_6": s2, "features_7": s2,
                     "features_9": s3, "features_10": s3, "features_11": s3, "features_12": s3}
    modules = {}
    for ly in layers:
        modules[ly.path.split("/")[0]] = modules.get(ly.path.split("/")[0], 0) + ly.macs
    assert list(modules.values()) == per_module
    assert count_ops(layers).macs == sum(per_module) == total
    if hw == 227:
        assert spec.input_shape == (227, 227, 3)
        assert count_model_ops(spec.module, None, spec.input_shape, train=False).macs == total


def test_binary_layers_hand_count(tiny):
    """Binary weights x 1-bit activations: bit operations in their own column (hand counts below)."""
    @dataclasses.dataclass(frozen=True)
    class WeightQuant:  # duck-typed stand-in for fgq_jax.transforms.WeightQuant
        method: str = "binary"
        group_size: object = "channel"
        asymmetric: bool = False
        grouping: str = "input"

    model, variables = tiny
    layers = layer_shapes(model, variables, (8, 8, 3))
    quant = {"block0/conv": WeightQuant(), "conv3": WeightQuant(group_size=4), "fc": WeightQuant()}
    acts = {"block0/conv": (1, True), "conv3": 8, "fc": (1, False)}  # conv1: FP, no activation entry
    rep = count_ops(layers, quant, act_bits=acts)
    rows = {r.path: r for r in rep.rows}
    # block0/conv: signed 1-bit inputs -> XNOR + popcount on all 18432 MACs; one scale product per
    # output element (per-channel scales): 256 mults; time 256/4 + (18432 - 256)/32 = 64 + 568 = 632
    assert rows["block0/conv"].quant == "ternary(channel, binary) a1-xnor"
    assert rows["block0/conv"].binary_ops == 18432 and rows["block0/conv"].mults == 256
    assert rows["block0/conv"].time == 632.0
    # conv3: binary weights but 8-bit inputs -> the ternary model (N=4: 1024 mults), no bit ops
    assert rows["conv3"].binary_ops == 0 and rows["conv3"].quant == "ternary(N=4, binary)"
    assert rows["conv3"].time == 1024 / 4 + 3072 / 16 == 448.0
    # fc: unsigned 1-bit inputs (after a ReLU) -> AND + popcount: 160 bit ops, 10 mults
    assert rows["fc"].quant == "ternary(channel, binary) a1-and" and rows["fc"].binary_ops == 160
    assert rows["fc"].time == 10 / 4 + 150 / 32
    assert rows["conv1"].binary_ops == 0 and rows["conv1"].quant == "fp"
    assert rep.binary_ops == 18432 + 160
    assert rep.potential_speedup == pytest.approx(36512 / (13824 + 632 + 448 + 10 / 4 + 150 / 32))
    assert json.loads(json.dumps(rep.to_dict()))["binary_ops"] == 18592
    # bits unknown -> label without the operation; without act_bits nothing is binary
    assert count_ops(layers, quant, act_bits={"fc": 1}).rows[3].quant == "ternary(channel, binary) a1"
    assert count_ops(layers, quant).binary_ops == 0
    with pytest.raises(ValueError, match="fc"):
        count_ops(layers, quant, act_bits={"fc": 0})
    # count_model_ops forwards act_bits
    assert count_model_ops(model, variables, (8, 8, 3), quant, act_bits=acts).binary_ops == 18592


def test_binary_closed_form():
    # all-binary layers with groups of N: the paper's formula with the binary factor 32
    layers = [LayerShape("a", "conv", (3, 3, 64, 64), (14, 14, 64))]

    @dataclasses.dataclass(frozen=True)
    class WeightQuant:
        method: str = "binary"
        group_size: object = 64
        asymmetric: bool = False
        grouping: str = "input"

    rep = count_ops(layers, {"a": WeightQuant()}, act_bits={"a": (1, True)})
    assert rep.potential_speedup == pytest.approx(potential_speedup(64, ternary_speedup=BINARY_SPEEDUP))
    assert potential_speedup(64, ternary_speedup=BINARY_SPEEDUP) == pytest.approx(2048 / 71)  # 28.85x
    assert rep.binary_ops == rep.macs
