"""Engine contracts that no family may break (issue 14, items 3, 5, 6 and 8).

- The spec is the contract: a MoeSpec activation the fused MoE/QMoE op cannot compute is refused while the graph is
  built; every spec field is read by the engine; families map weights from the spec alone.
- One quantizer per grid: MatMulNBits and QMoE share the symmetric MLAS quantizer, the nibble packer, the rounding
  and the block-size list.
- Transforms stay one-way: one gate/up interleave, for both checkpoint layouts; Gemma 4's per-expert MatMuls read
  the stored [gate; up] rows untouched.
- Write order is not a contract: whatever order the initializers are saved in, each weight is read and quantized
  once, and the bytes are the same.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections import Counter
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from safetensors.numpy import load_file

import builder.export as export_module
from builder import spec as spec_module
from builder.checkpoint import TensorRef
from builder.errors import UnsupportedModelError
from builder.export import prepare
from builder.weights import Constant

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------- item 3: the spec


@pytest.mark.parametrize("change", [dict(activation="gelu_tanh"), dict(swiglu_alpha=1.702)])
def test_fused_moe_refuses_an_activation_it_cannot_compute(change, tiny_checkpoint):
    from builder.decoder import build_decoder
    from builder.spec import MoeSpec

    prepared = prepare(str(tiny_checkpoint("qwen3_moe")), "int4", "cpu")
    layers = tuple(dataclasses.replace(layer, ffn=dataclasses.replace(layer.ffn, **change))
                   if isinstance(layer.ffn, MoeSpec) else layer for layer in prepared.spec.layers)
    spec = dataclasses.replace(prepared.spec, layers=layers)
    with pytest.raises(UnsupportedModelError, match=r"layers\.1\.moe: the fused MoE/QMoE op computes SwiGLU only"):
        build_decoder(spec, prepared.settings, prepared.weights)


def test_every_spec_field_is_read_by_the_engine():
    """A field nothing reads is a promise nobody keeps (ModelSpec.extras was one)."""
    engine = "\n".join(p.read_text() for p in (REPO / "builder").rglob("*.py") if p.name != "spec.py")
    own = (REPO / "builder/spec.py").read_text()  # the spec's own methods (RopeSpec.param reads params)
    unread = [f"{cls.__name__}.{f.name}" for cls in vars(spec_module).values()
              if dataclasses.is_dataclass(cls) and cls.__module__ == spec_module.__name__
              for f in dataclasses.fields(cls)
              if not re.search(rf"\.{f.name}\b", engine) and f"self.{f.name}" not in own]
    assert unread == []


def test_families_map_weights_from_the_spec_alone():
    from builders import families

    for family in families():
        assert list(inspect.signature(family.map_weights).parameters) == ["spec", "ckpt"], family.name


# ------------------------------------------------------------------------------------- item 5: one grid


def test_one_block_size_list_and_one_packer():
    from builder import options
    from builder import quant
    from builder.quant import blockwise, cuda_layout, moe

    assert options.BLOCK_SIZES is quant.BLOCK_SIZES
    assert moe.unpack_codes is blockwise.unpack_codes and cuda_layout.pack_codes is blockwise.pack_codes
    own = [name for name, obj in vars(moe).items() if callable(obj) and getattr(obj, "__module__", "") == moe.__name__
           and re.search(r"round|pack|quantize_blocks", name)]
    assert own == []  # quant/moe.py has no quantizer, packer or rounding of its own


def test_qmoe_and_matmulnbits_share_the_symmetric_grid():
    from builder.quant.blockwise import quantize_blockwise
    from builder.quant.moe import quantize_experts

    rng = np.random.default_rng(3)
    w = rng.standard_normal((48, 64)).astype(np.float32)
    w[0, :32] = 0.0  # an all-zero block
    w[1, :32] = np.linspace(-1, 1, 32)  # a tie between the two extremes
    for bits in (4, 8):
        mm = quantize_blockwise(w, bits=bits, block_size=32, symmetric=True, method="default")
        ex = quantize_experts(w[None], bits=bits, block_size=32)
        assert ex.packed[0].tobytes() == mm.packed.tobytes()
        assert ex.scales[0].tobytes() == mm.scales.tobytes()


def test_round_half_away_is_c_roundf():
    from builder.quant.blockwise import round_half_away

    x = np.array([0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 0.49999997, -0.49999997, 7.5, 8.5, 2 ** 22 + 0.5, -0.0, 3.2, -3.7],
                 np.float32)
    expected = [float(Decimal(float(v)).quantize(Decimal(1), rounding=ROUND_HALF_UP)) for v in x]  # half away
    assert round_half_away(x).tolist() == expected
    y = x.copy()
    assert round_half_away(y, in_place=True).tolist() == expected


# ------------------------------------------------------------------------------------- item 6: one interleave


def test_one_interleave_for_both_checkpoint_layouts():
    from builder.weights import InterleavedGateUp

    rng = np.random.default_rng(0)
    gate, up = rng.standard_normal((3, 4, 5)).astype(np.float32), rng.standard_normal((3, 4, 5)).astype(np.float32)
    halves = np.concatenate([gate, up], axis=1)  # transformers' experts.gate_up_proj [E, 2I, H]
    expected = np.stack([gate, up], axis=2).reshape(3, 8, 5)  # rows g0, u0, g1, u1, ...
    separate = InterleavedGateUp.from_gate_up(Constant(gate), Constant(up))
    fused = InterleavedGateUp.from_halves(Constant(halves))
    assert separate.shape == fused.shape == (3, 8, 5)
    for start, stop in ((0, None), (1, 2), (2, 3)):
        np.testing.assert_array_equal(separate.rows(start, stop), expected[start:stop])
        np.testing.assert_array_equal(fused.rows(start, stop), expected[start:stop])
    biases = InterleavedGateUp.from_halves(Constant(halves[:, :, 0]))  # [E, 2I] biases too
    np.testing.assert_array_equal(biases.rows(), expected[:, :, 0])


def test_interleave_transforms_are_not_duplicated():
    from builder.layers import dense_moe
    from builders import gemma4

    assert not hasattr(gemma4, "GateUpInterleaved") and not hasattr(dense_moe, "_split_gate_up")


def test_gemma4_per_expert_fc1_is_the_stored_tensor(tiny_checkpoint):
    """The per-expert MatMul reads [gate; up] rows, which is how the checkpoint stores them: nothing reorders them."""
    ckpt = tiny_checkpoint("gemma4_moe")
    stored = load_file(str(ckpt / "model.safetensors"))["model.layers.1.experts.gate_up_proj"]
    fc1 = prepare(str(ckpt), "int4", "cpu").weights.get("layers.1.moe.fc1.weight")
    np.testing.assert_array_equal(fc1.rows(), stored.astype(np.float32))


# ------------------------------------------------------------------------------------- item 8: write order


class CountingWeight:
    def __init__(self, array):
        self.array, self.shape, self.reads = array, array.shape, []

    def rows(self, start=0, stop=None):
        self.reads.append((start, stop))
        return self.array[start:stop]


def test_quantized_weight_asked_for_scales_first_quantizes_once():
    from builder.layers.linear import QuantizedWeight, quantize_rows
    from builder.quant.blockwise import quantize_blockwise
    from builder.quant.plan import WeightFormat

    w = CountingWeight(np.random.default_rng(1).standard_normal((300, 64)).astype(np.float32))
    source = QuantizedWeight(w, quantize_rows(WeightFormat(4, "default", 32, False)), block_bytes=100 * 64 * 4)
    zero_points, scales = source.whole("zero_points"), source.whole("scales")
    packed = np.concatenate(list(source.blocks("packed")))
    assert source.passes == 1 and w.reads == [(0, 100), (100, 200), (200, 300)]
    expected = quantize_blockwise(w.array, bits=4, block_size=32, symmetric=False)
    for got, want in ((packed, expected.packed), (scales, expected.scales), (zero_points, expected.zero_points)):
        assert got.tobytes() == want.tobytes()
    assert source._held == {}  # nothing is kept once every output was taken


def _export_in_order(ckpt: Path, out: Path, precision: str, extra: list[str], reverse: bool,
                     monkeypatch) -> Counter:
    """Export with the initializers saved in graph order or reversed (scales before codes); tensor reads counted."""
    reads: Counter = Counter()
    real_read, real_save = TensorRef.read, export_module.save_model

    def counting_read(self, *args, **kwargs):
        reads[self.name] += 1
        return real_read(self, *args, **kwargs)

    def save(model, *args, **kwargs):
        if reverse:
            inits = model.graph.initializers
            inits.data = dict(reversed(list(inits.data.items())))
        return real_save(model, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(TensorRef, "read", counting_read)
        patch.setattr(export_module, "save_model", save)
        patch.setenv("ORTBUILD_THREADS", "1")
        export_module.export(str(ckpt), out, precision, "cpu", extra)
    return reads


@pytest.mark.parametrize("arch, extra", [("llama", ["int4_is_symmetric=false", "quantize_embeddings=true"]),
                                         ("qwen3_moe", ["qmoe_block_size=16"])])
def test_any_write_order_reads_and_quantizes_each_weight_once(arch, extra, tiny_checkpoint, tmp_path, monkeypatch):
    ckpt = tiny_checkpoint(arch)
    natural = _export_in_order(ckpt, tmp_path / "natural", "int4", extra, False, monkeypatch)
    reversed_ = _export_in_order(ckpt, tmp_path / "reversed", "int4", extra, True, monkeypatch)
    assert reversed_ == natural
    first = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "natural/model.onnx")).graph.initializer}
    again = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "reversed/model.onnx")).graph.initializer}
    assert first.keys() == again.keys() and any(name.endswith(".scales") for name in first)
    for name, value in first.items():
        assert value.tobytes() == again[name].tobytes(), name
