"""llama.cpp's 4-bit blocks (Q4_0, Q4_1, Q4_K) as int4 groups: the same weights as the `gguf`
package's own dequantisation, and `load(..., quantize="int4")` takes them as they are."""

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

import lmforge  # noqa: E402
from lmforge.interop.gguf import int4_groups, read_gguf  # noqa: E402
from lmforge.interop.load import _load_gguf  # noqa: E402
from lmforge.models.int4 import Int4Linear, Int4LMHead, dequantize_groups  # noqa: E402

Q = gguf.GGMLQuantizationType
D, FF, N_HEAD, N_KV, VOCAB = 256, 256, 4, 2, 40  # Q4_K blocks hold 256 inputs


def _blocks(rng, rows: int, cols: int, qtype) -> np.ndarray:
    """Random valid blocks (rows, bytes per row): random codes and 6-bit scales, sane fp16 d/dmin."""
    size, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, (rows, cols // size * nbytes), dtype=np.uint8)
    blocks = data.reshape(-1, nbytes)
    halves = 1 if qtype == Q.Q4_0 else 2  # d, and for Q4_1/Q4_K the min (or dmin)
    for h in range(halves):
        value = rng.uniform(0.001, 0.02, len(blocks)) * (1 if h == 0 else rng.choice([-1, 1], len(blocks)))
        blocks[:, 2 * h:2 * h + 2] = value.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return data


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q4_K])
def test_int4_groups_are_the_gguf_dequantisation(qtype):
    data = _blocks(np.random.default_rng(0), 6, 512, qtype)
    q, scale, zero = int4_groups(data, qtype)
    assert q.shape == (6, 512) and q.dtype == np.uint8 and q.max() == 15 and scale.shape == zero.shape == (6, 16)
    want = gguf.quants.dequantize(data, qtype).reshape(6, 512)
    got = dequantize_groups(*(torch.from_numpy(a) for a in (q, scale, zero))).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())


def test_other_types_are_refused():
    with pytest.raises(ValueError, match="Q8_0 is not a 4-bit type"):
        int4_groups(np.zeros((1, 34), np.uint8), Q.Q8_0)


def _tiny_4bit_llama(path) -> None:
    """A 1-layer llama GGUF (no tokenizer): every matrix in a 4-bit type, the untied head in Q4_0,
    the embedding in F32."""
    rng = np.random.default_rng(1)
    hd = D // N_HEAD
    types = {"attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.Q4_K, "attn_output": Q.Q4_1,
             "ffn_gate": Q.Q4_K, "ffn_up": Q.Q4_0, "ffn_down": Q.Q4_1}
    shapes = {"attn_q": (D, D), "attn_k": (N_KV * hd, D), "attn_v": (N_KV * hd, D), "attn_output": (D, D),
              "ffn_gate": (FF, D), "ffn_up": (FF, D), "ffn_down": (D, FF)}
    w = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((w.add_block_count, 1), (w.add_context_length, 64), (w.add_embedding_length, D),
                       (w.add_feed_forward_length, FF), (w.add_head_count, N_HEAD), (w.add_head_count_kv, N_KV),
                       (w.add_layer_norm_rms_eps, 1e-6), (w.add_rope_freq_base, 10000.0), (w.add_vocab_size, VOCAB)):
        add(value)
    w.add_tensor("token_embd.weight", rng.standard_normal((VOCAB, D)).astype(np.float32))
    w.add_tensor("output.weight", _blocks(rng, VOCAB, D, Q.Q4_0), raw_dtype=Q.Q4_0)
    for name in ("output_norm", "blk.0.attn_norm", "blk.0.ffn_norm"):
        w.add_tensor(f"{name}.weight", np.ones(D, np.float32))
    for name, qtype in types.items():
        w.add_tensor(f"blk.0.{name}.weight", _blocks(rng, *shapes[name], qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_load_int4_takes_the_blocks_as_they_are(tmp_path, monkeypatch):
    path = tmp_path / "q4.gguf"
    _tiny_4bit_llama(path)
    assert not read_gguf(path).int4  # only on request
    float_model, _, exact = _load_gguf(path, None, torch.float32, int4=True)
    layer = "backbone.decoder.layers.0"
    assert sorted(exact) == sorted([f"{layer}.attn.{a}" for a in "qkvo"] + [f"{layer}.ff.{a}" for a in
                                                                           ("gate", "up", "down")] + ["lm_head"])
    # the groups are the float model's weights exactly (rows of q and k un-permuted the same way)
    for name, (q, scale, zero) in exact.items():
        want = float_model.get_submodule(name).weight
        assert torch.equal(dequantize_groups(q, scale, zero), want), name

    def no_float_round_trip(*args, **kw):
        raise AssertionError("a 4-bit weight was quantised again from float")
    monkeypatch.setattr("lmforge.models.quantize.quantize_groups", no_float_round_trip)
    model, tok = lmforge.load(path, quantize="int4")
    assert tok is None and isinstance(model.lm_head, Int4LMHead)  # a 4-bit head stays 4-bit
    torch.manual_seed(0)
    x = torch.randn(3, D)
    for name in exact:
        int4 = model.get_submodule(name)
        int4 = int4.linear if name == "lm_head" else int4
        assert isinstance(int4, Int4Linear), name
        want = x @ float_model.get_submodule(name).weight.detach().T
        # the same weights: only bfloat16 activations, scales and zeros in the kernel
        assert float((int4(x) - want).norm() / want.norm()) < 0.01, name
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        got, want = model(ids), float_model(ids)
    assert got.argmax(-1).eq(want.argmax(-1)).float().mean() > 0.8
