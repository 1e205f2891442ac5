"""Generation: greedy and beam search identical to HF transformers for every family, sampling,
cached = uncached decoding, batching, stop conditions, text streaming and input errors."""

import pytest
import torch
import transformers as T

from lmforge.config import ModelConfig
from lmforge.generate import GenerationConfig, beam_search, generate, stream_text, stream_tokens, text_deltas
from lmforge.interop.hf import load_hf
from lmforge.models.heads import Model
from tests.conftest import tiny_hf

ARCHS = ["gpt2", "llama", "t5", "bart", "marian"]
NEW = 12


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """arch -> (HF model, our model) with the same random weights, built on first use."""
    cache = {}

    def get(arch):
        if arch not in cache:
            ref = tiny_hf(arch)
            torch.manual_seed(3)
            with torch.no_grad():  # larger weights than the default init: varied, non-repeating outputs
                for name, p in ref.named_parameters():
                    if p.ndim == 2 and "embed_positions" not in name:  # Marian's positions are sinusoids
                        p.normal_(0, 0.3)
            d = tmp_path_factory.mktemp(arch)
            ref.save_pretrained(d)
            ours = load_hf(d).eval()
            c = ours.cfg  # only what we pass: none of HF's defaults (forced EOS, ...)
            ref.generation_config = T.GenerationConfig(
                bos_token_id=c.bos_id, eos_token_id=c.eos_id, decoder_start_token_id=c.decoder_start_id,
                pad_token_id=c.pad_id if c.pad_id is not None else c.eos_id)
            cache[arch] = ref, ours
        return cache[arch]
    return get


def prompts(model, batch=3, length=7, seed=1):
    """Random prompts; decoder-only rows 1.. are left-padded, encoder sources right-padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 99, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    pad = model.cfg.pad_id if model.cfg.pad_id is not None else 0
    for i in range(1, batch):
        n = 2 * i
        if model.cfg.family == "decoder":
            ids[i, :n], mask[i, :n] = pad, 0
        else:
            ids[i, length - n:], mask[i, length - n:] = pad, 0
    return ids, mask


def hf_new_tokens(ref, out, ids, eos):
    """HF sequences → new tokens per row, cut after the first EOS."""
    seq = out[:, 1:] if ref.config.is_encoder_decoder else out[:, ids.shape[1]:]
    rows = []
    for r in seq.tolist():
        end = next((i + 1 for i, t in enumerate(r) if t in eos), len(r))
        rows.append(r[:end])
    return rows


def eos_from_output(model, ids, mask, k=2):
    """EOS ids that our greedy output reaches: tokens from the middle of the rows."""
    rows = generate(model, ids, mask, max_new_tokens=NEW, eos_ids=[]).tolist()
    return [rows[i % len(rows)][3 + 2 * i] for i in range(k)]


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_hf(pairs, arch):
    ref, ours = pairs(arch)
    ids, mask = prompts(ours)
    early = eos_from_output(ours, ids, mask, 1)  # an EOS id the rows reach
    for eos, min_new in (([ours.cfg.eos_id], 0), (early, 0), (early, 5)):
        out = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=min_new,
                           do_sample=False, num_beams=1, eos_token_id=eos)
        got = generate(ours, ids, mask, max_new_tokens=NEW, eos_ids=eos, min_new_tokens=min_new)
        assert got.tolist() == hf_new_tokens(ref, out, ids, eos)
        assert all(n >= min_new for n in got.lengths.tolist())


def test_greedy_penalties_match_hf(pairs):
    ref, ours = pairs("gpt2")
    ids = prompts(ours, batch=1)[0]
    out = ref.generate(input_ids=ids, max_new_tokens=NEW, do_sample=False, repetition_penalty=1.5,
                       no_repeat_ngram_size=2, eos_token_id=None)
    got = generate(ours, ids, max_new_tokens=NEW, eos_ids=[],
                   repetition_penalty=1.5, no_repeat_ngram_size=2)
    assert got.tolist() == hf_new_tokens(ref, out, ids, [])


BEAM_CASES = [(1.0, True), (0.6, True), (0.6, False), (2.0, "never")]


def beam_search_matches_hf(ref, ours, ids, mask) -> None:
    """Every case of BEAM_CASES: the same hypotheses and scores as HF, some ending on EOS (also
    run on CUDA by tests/test_cuda.py)."""
    eos = eos_from_output(ours, ids, mask)  # two EOS ids that the beams do reach
    finished_early = False
    for lp, es in BEAM_CASES:
        kw = dict(max_new_tokens=NEW, num_beams=4, length_penalty=lp, early_stopping=es, no_repeat_ngram_size=3,
                  num_return_sequences=2)
        out = ref.generate(input_ids=ids, attention_mask=mask, do_sample=False, eos_token_id=eos,
                           output_scores=True, return_dict_in_generate=True, **kw)
        got = generate(ours, ids, mask, strategy="beam", eos_ids=eos, **kw)
        assert got.sequences.device == ids.device
        assert got.tolist() == hf_new_tokens(ref, out.sequences, ids, eos)
        assert got.scores.shape == out.sequences_scores.shape == (6,)
        assert (got.scores - out.sequences_scores).abs().max().item() <= 1e-4
        finished_early |= bool((got.lengths < NEW).any())
    assert finished_early  # the EOS paths were exercised


@pytest.mark.parametrize("arch", ["gpt2", "t5", "llama", "bart"])
def test_beam_search_matches_hf(pairs, arch):
    ref, ours = pairs(arch)
    beam_search_matches_hf(ref, ours, *prompts(ours))


def test_sampling_matches_hf_under_the_same_seed(pairs):
    ref, ours = pairs("llama")
    ids, mask = prompts(ours)
    params = dict(temperature=0.8, top_k=20, top_p=0.9)
    torch.manual_seed(7)
    out = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=True, temperature=0.8,
                       top_k=20, top_p=0.9, eos_token_id=[])
    got = generate(ours, ids, mask, max_new_tokens=NEW, strategy="sample", seed=7, eos_ids=[], **params)
    assert got.tolist() == hf_new_tokens(ref, out, ids, [])


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_sampling_is_seeded_and_stays_in_the_allowed_set(pairs, arch):
    _, ours = pairs(arch)
    ids, mask = prompts(ours)
    config = GenerationConfig(max_new_tokens=NEW, strategy="sample", temperature=1.5, top_k=5, top_p=0.7)
    params = config.sampling
    run = lambda seed: generate(ours, ids, mask, config, seed=seed, eos_ids=[])  # noqa: E731
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a.sequences, b.sequences) and not torch.equal(a.sequences, c.sequences)
    for i in range(ids.shape[0]):  # every token lies in the filtered support of its recomputed logits
        src = ids[i:i + 1, mask[i].bool()]
        for t, tok in enumerate(a.sequences[i].tolist()):
            logits, hist = full_logits(ours, src, a.sequences[i:i + 1, :t])
            assert torch.isfinite(params.process(logits, hist)[0, tok])
    n = generate(ours, ids, mask, max_new_tokens=3, strategy="sample", num_return_sequences=2, seed=0)
    assert n.sequences.shape[0] == 2 * ids.shape[0]


def full_logits(model, src, new):
    """Next-token logits (1, V) by recomputing the whole sequence (no cache), and the history."""
    with torch.no_grad():
        if model.cfg.family == "decoder":
            seq = torch.cat([src, new], 1)
            return model(seq)[:, -1], seq
        dec = torch.cat([torch.tensor([[model.cfg.decoder_start_id]]), new], 1)
        return model(src, decoder_input_ids=dec)[:, -1], dec


@pytest.mark.parametrize("arch", ["gpt2", "llama", "t5", "marian"])
def test_cached_decoding_equals_uncached(pairs, arch):
    _, ours = pairs(arch)
    src = prompts(ours, batch=1)[0]
    new = torch.zeros(1, 0, dtype=torch.long)
    for _ in range(NEW):
        new = torch.cat([new, full_logits(ours, src, new)[0].argmax(-1, keepdim=True)], 1)
    assert generate(ours, src, max_new_tokens=NEW, eos_ids=[]).tolist() == new.tolist()


@pytest.mark.parametrize("arch", ["gpt2", "bart"])
def test_beam_width_one_is_greedy(pairs, arch):
    _, ours = pairs(arch)
    ids, mask = prompts(ours)
    eos = eos_from_output(ours, ids, mask, 1)
    greedy = generate(ours, ids, mask, max_new_tokens=NEW, eos_ids=eos)
    beam = generate(ours, ids, mask, max_new_tokens=NEW, eos_ids=eos, strategy="beam", num_beams=1,
                    early_stopping=True)
    assert beam.tolist() == greedy.tolist()
    assert (greedy.lengths < NEW).any()


@pytest.mark.parametrize("arch", ["gpt2", "llama", "t5"])
def test_padded_batch_equals_each_prompt_alone(pairs, arch):
    _, ours = pairs(arch)
    ids, mask = prompts(ours)
    for kw in (dict(), dict(strategy="beam", num_beams=3, num_return_sequences=2)):
        batch = generate(ours, ids, mask, max_new_tokens=NEW, **kw)
        alone = [row for i in range(ids.shape[0])
                 for row in generate(ours, ids[i][mask[i].bool()].tolist(), max_new_tokens=NEW, **kw).tolist()]
        assert batch.tolist() == alone
    # lists of ragged prompts are padded the same way
    ragged = [ids[i][mask[i].bool()].tolist() for i in range(ids.shape[0])]
    assert generate(ours, ragged, max_new_tokens=NEW).tolist() == generate(ours, ids, mask, max_new_tokens=NEW).tolist()


def test_stream_tokens_yields_pad_after_eos(pairs):
    _, ours = pairs("gpt2")
    ids, mask = prompts(ours)
    eos = eos_from_output(ours, ids, mask, 1)
    steps = torch.stack(list(stream_tokens(ours, ids, mask, max_new_tokens=NEW, eos_ids=eos)), 1)
    res = generate(ours, ids, mask, max_new_tokens=NEW, eos_ids=eos)
    assert torch.equal(steps, res.sequences)
    for row, n in zip(steps.tolist(), res.lengths.tolist()):
        assert all(t == ours.cfg.pad_id for t in row[n:])


# ---- text --------------------------------------------------------------------------------------
LINES = ["Café crème brûlée à la française 🍮", "naïve façade, jalapeño piñata 🌶️🎉",
         "Grüße aus Köln 🇩🇪 und Zürich", "日本語のテキスト 👋 こんにちは", "emoji 😀😃😄 and ☕ coffee"]


class ByteBPE:
    """A tiny byte-level BPE (HF `tokenizers`): tokens can end inside a UTF-8 character."""

    def __init__(self):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        self.hf = Tokenizer(models.BPE())
        self.hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self.hf.decoder = decoders.ByteLevel()
        self.hf.train_from_iterator(LINES * 3, trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        self.eos_id = self.hf.token_to_id("<eos>")

    def encode(self, text):
        return self.hf.encode(text).ids

    def decode(self, ids):
        return self.hf.decode(list(ids))


@pytest.fixture(scope="module")
def text_model():
    tok = ByteBPE()
    torch.manual_seed(0)
    cfg = ModelConfig(family="decoder", vocab_size=tok.hf.get_vocab_size(), d_model=32, n_heads=4,
                      n_decoder_layers=2, d_ff=64, max_len=128, init_std=0.5, eos_id=tok.eos_id, pad_id=tok.eos_id)
    return Model(cfg).eval(), tok


def test_text_deltas_never_split_a_character():
    tok = ByteBPE()
    text = "Grüße 👋 日本 🎉!"
    # one token per byte: every multi-byte character is split across tokens
    alphabet = {b: tok.hf.token_to_id(c) for b, c in enumerate(_bytes_to_unicode())}
    ids = [alphabet[b] for b in text.encode("utf-8")]
    pieces = list(text_deltas(tok, ids))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert len(pieces) == len(text)  # one character at a time, as soon as it is complete
    assert "".join(text_deltas(tok, ids, stop_strings=["日本"])) == "Grüße 👋 "


def _bytes_to_unicode():
    """GPT-2's byte → printable character table (the ByteLevel alphabet), in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def test_stream_text_equals_generate(text_model):
    model, tok = text_model
    prompt = "Café 🍮"
    for seed in range(3):
        kw = dict(max_new_tokens=40, strategy="sample", seed=seed)
        full = generate(model, tok.encode(prompt), tokenizer=tok, **kw)
        pieces = list(stream_text(model, tok, prompt, **kw))
        assert "".join(pieces) == full.texts[0]
        assert all(p and not p.endswith("\ufffd") for p in pieces[:-1])
        # a stop string taken from the middle of the text ends both, cut before it
        text = full.texts[0]
        stop = next((text[i:i + 2] for i in range(len(text) // 3, len(text) - 2) if "\ufffd" not in text[i:i + 2]),
                    None)
        if stop is None:
            continue
        cut = generate(model, tok.encode(prompt), tokenizer=tok, stop=[stop], **kw)
        assert cut.texts[0] == text[:text.find(stop)]
        assert cut.lengths[0] < full.lengths[0]
        assert "".join(stream_text(model, tok, prompt, stop=[stop], **kw)) == cut.texts[0]


# ---- prompt lookup decoding ------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama", "t5", "bart"])
def test_prompt_lookup_gives_the_greedy_tokens(pairs, arch):
    ref, ours = pairs(arch)
    g = torch.Generator().manual_seed(5)
    phrase = torch.randint(3, 99, (6,), generator=g).tolist()
    for prompt in (phrase * 3, phrase + phrase[:3]):  # text that repeats: guesses are made and checked
        want = generate(ours, [prompt], max_new_tokens=20, eos_ids=[]).tolist()
        for k in (1, 3, 8):
            assert generate(ours, [prompt], max_new_tokens=20, eos_ids=[], prompt_lookup=k).tolist() == want
    early = want[0][5]  # an EOS inside the output ends both at the same token
    assert generate(ours, [prompt], max_new_tokens=20, eos_ids=[early], prompt_lookup=4).tolist() == \
        generate(ours, [prompt], max_new_tokens=20, eos_ids=[early]).tolist()


def test_prompt_lookup_takes_fewer_steps_when_the_output_repeats(monkeypatch):
    from lmforge.generate.state import DecoderState
    torch.manual_seed(0)
    model = Model(ModelConfig.preset("gpt-tiny", vocab_size=64)).eval()  # small init: it repeats itself
    prompt = [[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6]]
    calls = []
    for name in ("step", "step_many"):
        orig = getattr(DecoderState, name)
        monkeypatch.setattr(DecoderState, name,
                            lambda self, t, _o=orig: calls.append(1) or _o(self, t))
    want = generate(model, prompt, max_new_tokens=30, eos_ids=[]).tolist()
    plain, calls[:] = len(calls), []
    got = generate(model, prompt, max_new_tokens=30, eos_ids=[], prompt_lookup=8).tolist()
    assert got == want and plain == 29 and len(calls) < 10


def test_prompt_lookup_streams_and_rejects_what_it_cannot_do(text_model, pairs):
    model, tok = text_model
    prompt = "abc abc abc abc"
    full = generate(model, tok.encode(prompt), max_new_tokens=30, tokenizer=tok)
    assert "".join(stream_text(model, tok, prompt, max_new_tokens=30, prompt_lookup=5)) == full.texts[0]
    _, ours = pairs("gpt2")
    for kw in (dict(strategy="sample"), dict(strategy="beam", num_beams=2), dict(min_new_tokens=2),
               dict(stop=["x"], tokenizer=tok), dict(no_repeat_ngram_size=2)):
        with pytest.raises(ValueError, match="prompt_lookup"):
            generate(ours, [[5, 6, 7]], max_new_tokens=5, prompt_lookup=3, **kw)
    with pytest.raises(ValueError, match="prompt_lookup"):
        generate(ours, [[5, 6, 7], [8, 9, 10]], max_new_tokens=5, prompt_lookup=3)  # one prompt only
    with pytest.raises(ValueError, match="prompt_lookup"):
        generate(ours, [[5, 6, 7]], max_new_tokens=5, prompt_lookup=-1)


# ---- errors ------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors(pairs):
    _, ours = pairs("gpt2")
    ok = [[5, 6, 7]]
    cases = [
        (dict(input_ids=[]), "empty prompt"),
        (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "empty prompt"),
        (dict(input_ids=torch.tensor([[5, 6]]), attention_mask=torch.tensor([[0, 0]])), "empty prompt"),
        (dict(input_ids=[list(range(3, 63))]), "prompt of 60 tokens does not fit.*--truncate"),
        (dict(input_ids=ok, max_new_tokens=0), "max_new_tokens"),
        (dict(input_ids=ok, max_new_tokens=-2), "max_new_tokens"),
        (dict(input_ids=ok, strategy="beam", num_beams=0), "num_beams"),
        (dict(input_ids=ok, strategy="nucleus"), "unknown strategy"),
        (dict(input_ids=ok, strategy="beam", num_beams=2, num_return_sequences=3), "num_return_sequences"),
        (dict(input_ids=ok, num_return_sequences=2), "num_return_sequences"),
        (dict(input_ids=ok, num_beams=4), "strategy='beam'"),
        (dict(input_ids=ok, stop=["x"]), "tokenizer"),
        (dict(input_ids=ok, strategy="beam", top_k=5), "deterministic"),
        (dict(input_ids=ok, strategy="sample", top_p=0.0), "top_p"),
        (dict(input_ids=ok, strategy="sample", temperature=0), "temperature"),
        (dict(input_ids=ok, stop_strings=["x"]), "unknown generation option.*stop_strings"),
    ]
    for kw, msg in cases:
        kw = {"max_new_tokens": 10, **kw}
        with pytest.raises(ValueError, match=msg):
            generate(ours, **kw)
    with pytest.raises(ValueError, match="empty prompt"):  # iterators check at the call
        stream_tokens(ours, [], max_new_tokens=3)
    with pytest.raises(ValueError, match="'greedy' or 'sample'"):
        stream_tokens(ours, ok, max_new_tokens=3, strategy="beam")
    with pytest.raises(ValueError, match="max_new_tokens"):
        stream_text(ours, ByteBPE(), "hi", max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p must be in .0, 1., got 1.5"):
        GenerationConfig(top_p=1.5)
    encoder = Model(ModelConfig(family="encoder", n_encoder_layers=1, n_decoder_layers=0, d_model=16, n_heads=2,
                                d_ff=32, vocab_size=50, task="embed"))
    with pytest.raises(ValueError, match="decoder"):
        generate(encoder, ok, max_new_tokens=3)


def test_truncate_keeps_the_last_tokens(pairs):
    _, ours = pairs("gpt2")  # max_len 64
    long = list(range(3, 63))  # 60 tokens + 10 new > 64
    cut = generate(ours, [long], max_new_tokens=10, truncate=True)
    assert cut.tolist() == generate(ours, [long[-54:]], max_new_tokens=10).tolist()
    with pytest.raises(ValueError, match="truncate=True"):
        beam_search(ours, [long], max_new_tokens=10)


@pytest.mark.parametrize("native", [False, True])
def test_kv_cache_reorder_copies_the_written_positions(native):
    from lmforge.models import qkernel
    from lmforge.nn.attention import KVCache
    if native and not qkernel.available():
        pytest.skip("lmforge.models._qkernel was not built here")
    cache = KVCache(n_layers=2, batch=2, n_kv_heads=3, max_len=6, head_dim=4)
    cache.gather_rows = qkernel.gather_rows if native else None  # the float step's copier, or index_select
    g = torch.Generator().manual_seed(0)
    for layer in range(2):
        cache.update(layer, torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g))
        cache.cross[layer] = (torch.randn(2, 3, 5, 4, generator=g),) * 2
    cache.pos = 4
    want = [t[:, :, :, :4].clone() for t in cache.kv]
    grow = torch.tensor([0, 0, 1, 1])
    cache.reorder(grow)  # one prompt → its beams: new buffers
    for idx in (torch.tensor([1, 0, 3, 3]), torch.tensor([2, 2, 0, 1])):  # beam steps: swapped buffers
        cache.reorder(idx, cross=False)
        grow = grow[idx]
    for got, w in zip(cache.kv, want):
        assert got.shape == (2, 4, 3, 6, 4) and torch.equal(got[:, :, :, :4], w[:, grow])
    assert cache.cross[0][0].shape[0] == 4  # cross k/v followed the first reorder only


# ---- weights changed between generations --------------------------------------------------------
def _change_data(m):
    w = m.backbone.decoder.layers[0].ff.up.weight
    w.data = torch.randn_like(w) * 2  # a new tensor: neither id() nor _version of the parameter changes


def _change_copy(m):
    with torch.no_grad():
        m.backbone.decoder.layers[0].ff.up.weight.copy_(torch.randn(m.backbone.decoder.layers[0].ff.up.weight.shape) * 2)


def _change_state_dict(m):
    m.load_state_dict({k: torch.randn_like(v) * 2 if "layers.0.attn.q." in k or "layers.0.ff.up" in k else v
                       for k, v in m.state_dict().items()})


def _change_optimizer_step(m):
    opt = torch.optim.SGD(m.parameters(), lr=5.0)
    m(torch.tensor([[5, 6, 7, 8, 9, 10]])).pow(2).mean().backward()
    opt.step()


def _change_module(m):
    from lmforge.nn.linear import Linear
    q = m.backbone.decoder.layers[0].attn.q
    m.backbone.decoder.layers[0].attn.q = new = Linear(q.in_features, q.out_features, bias=q.bias is not None)
    torch.nn.init.normal_(new.weight, std=2.0)


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("change", [_change_data, _change_copy, _change_state_dict, _change_optimizer_step,
                                    _change_module])
def test_the_next_generation_sees_every_change_of_a_weight(change, native, monkeypatch):
    """Each generation lays the small weights out anew (RowBlocks), or points the native float
    step at them anew: whichever way a weight changes, the next generation gives what a freshly
    loaded model with those weights gives."""
    from lmforge.generate.state import DecoderState
    from lmforge.models import qkernel
    if native and not qkernel.available():
        pytest.skip("lmforge.models._qkernel was not built here")
    if not native:
        monkeypatch.setenv("LMFORGE_NATIVE_STEP", "0")
    torch.manual_seed(0)
    model = Model(ModelConfig.preset("gpt-tiny", vocab_size=64)).eval()
    prompt = [[5, 6, 7, 8]]
    before = generate(model, prompt, max_new_tokens=12, eos_ids=[]).tolist()
    state, _ = DecoderState.prefill(model, torch.tensor(prompt), None, 2)
    state.step(torch.tensor([9]))
    if native:
        assert state._float is not None  # the decoding steps ran through the float step
    else:
        assert len(state.cache.blocks) > 0  # the decoding steps ran through the laid-out weights
    change(model)
    model.eval()
    fresh = Model(model.cfg).eval()
    fresh.load_state_dict(model.state_dict())
    after = generate(model, prompt, max_new_tokens=12, eos_ids=[]).tolist()
    assert after == generate(fresh, prompt, max_new_tokens=12, eos_ids=[]).tolist()
    assert after != before  # the change mattered


def test_context_errors_and_clipping_speak_of_the_option_at_fault(pairs):
    from lmforge.generate import fit_to_context
    _, ours = pairs("gpt2")  # max_len 64
    with pytest.raises(ValueError, match="max_new_tokens=500 does not fit the model's context of 64") as e:
        generate(ours, [[5]], max_new_tokens=500)
    assert "prompt of 1" not in str(e.value)
    config = GenerationConfig(max_new_tokens=500)
    clipped, note = fit_to_context(ours, 10, config)
    assert clipped.max_new_tokens == 54 and "500 -> 54" in note
    assert fit_to_context(ours, 10, GenerationConfig(max_new_tokens=20)) == (GenerationConfig(max_new_tokens=20), None)
    with pytest.raises(ValueError, match="prompt of 100 tokens does not fit.*truncate=True .--truncate"):
        fit_to_context(ours, 100, config)
    assert fit_to_context(ours, 100, config.replace(truncate=True))[0].max_new_tokens == 32
    assert len(generate(ours, [[5] * 10], config=clipped, eos_ids=[]).tolist()[0]) == 54
