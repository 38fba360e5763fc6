"""Language-model decoders with per-layer KV caches (klas.lm.decoder, klas.lm.export): the cached decoder against the
Hugging Face models it is made of, its ONNX graph against float64 PyTorch (prefill, cached steps, greedy decoding
through the runtime's KV-cache loop), weight-only variants against their parent. Tiny random Llama / Mistral
models of awkward sizes with different head dims and KV-head counts; nothing from a hub."""
import numpy as np
import pytest
import torch

from test_lm_view import ARGS_A, ARGS_B, VOCAB, _model, _randomize  # noqa: E402

from klas.lm.decoder import CachedDecoder, decoder_mask, positions  # noqa: E402
from klas.lm.view import CausalLMView  # noqa: E402
from klas.stitch import StitchedNet, StitchLayer  # noqa: E402

T = 11


def _stitched(a: CausalLMView, i: int, b: CausalLMView, j: int, seed: int = 3) -> StitchedNet:
    layer = StitchLayer(a.model.config.hidden_size, b.model.config.hidden_size)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.linear.weight.copy_(torch.randn(layer.linear.weight.shape, generator=g) * a.model.config.hidden_size ** -0.5)
        layer.linear.bias.copy_(0.1 * torch.randn(layer.linear.bias.shape, generator=g))
    return StitchedNet(a, i, b, j, layer.to(next(a.model.parameters()).dtype)).eval()


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def nets(request):
    a = CausalLMView(_model(ARGS_A, request.param, 1), "lm-a", (T,))
    b = CausalLMView(_model(ARGS_B, request.param, 2), "lm-b", (T,))
    # "into-head": the source's first layers, then the target's norm and head only (no target layer left)
    return dict(anchor=StitchedNet(b, -1, b, -1, None).eval(), stitched=_stitched(a, 1, b, 1),
                into_head=_stitched(a, 2, b, b.depth - 1), impl=request.param)


# HF's eager attention takes its softmax in float32 even for a float64 model (``softmax(..., dtype=torch.float32)``),
# so a float64 run with another sequence length agrees only to float32 rounding; sdpa stays in float64.
STEP_ATOL = {"eager": 1e-5, "sdpa": 1e-9}


def _ids(seed, batch=3, t=T):
    return torch.randint(0, VOCAB, (batch, t), generator=torch.Generator().manual_seed(seed))


def _run(dec, ids, mask, past):
    return dec(ids, mask, positions(mask, ids.shape[1]), *past)


@pytest.mark.parametrize("kind", ["anchor", "stitched", "into_head"])
def test_cached_decoder_equals_the_network(nets, kind):
    """Prefill, then one token at a time from the cache, then a left-padded batch: every logit equals the network's
    own forward over the whole prefix (float64), and each layer's cache has that layer's KV heads and head dim."""
    net = nets[kind]
    dec = CachedDecoder(net).eval()
    ids = _ids(0)
    with torch.no_grad():
        want = net(ids)
        mask = torch.ones(3, T, dtype=torch.long)
        out = _run(dec, ids, mask, dec.empty_past(3, 0, dtype=torch.float64))
        assert torch.allclose(out[0], want, rtol=0, atol=1e-10)
        shapes = [(p.shape[1], p.shape[3]) for p in out[1::2]]
        assert shapes == [(s["kv_heads"], s["head_dim"]) for s in dec.layer_shapes]
        if kind == "stitched":  # mixed cache shapes: the source's 8-wide heads, then the target's 16-wide ones
            assert {s["head_dim"] for s in dec.layer_shapes} == {8, 16}
        split = 4
        m = torch.ones(3, split, dtype=torch.long)
        o = _run(dec, ids[:, :split], m, dec.empty_past(3, 0, dtype=torch.float64))
        steps, past = [o[0]], o[1:]
        for t in range(split, T):
            m = torch.ones(3, t + 1, dtype=torch.long)
            o = _run(dec, ids[:, t:t + 1], m, past)
            steps.append(o[0])
            past = o[1:]
        assert torch.allclose(torch.cat(steps, 1), want, rtol=0, atol=STEP_ATOL[nets["impl"]])
        pad = 5
        m = torch.ones(3, T, dtype=torch.long)
        m[1, :pad] = 0
        o = _run(dec, ids, m, dec.empty_past(3, 0, dtype=torch.float64))
        assert torch.allclose(o[0][1, pad:], net(ids[1:2, pad:])[0], rtol=0, atol=STEP_ATOL[nets["impl"]])
        assert torch.allclose(o[0][0], want[0], rtol=0, atol=1e-10)


def test_sliding_window_mask_follows_the_model():
    """A Mistral-style model attending in a window of 3: the cached decoder, token by token, equals HF's own
    forward (which applies the window), and the mask matches a brute-force rule."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                        num_attention_heads=3, num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
                        sliding_window=3, attn_implementation="eager")
    model = _randomize(MistralForCausalLM(cfg), 4).double().eval()
    view = CausalLMView(model, "mistral", (T,))
    dec = CachedDecoder(StitchedNet(view, -1, view, -1, None)).eval()
    ids = _ids(1, batch=2)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        m = torch.ones(2, 1, dtype=torch.long)
        o = _run(dec, ids[:, :1], m, dec.empty_past(2, 0, dtype=torch.float64))
        got, past = [o[0]], o[1:]
        for t in range(1, T):
            m = torch.ones(2, t + 1, dtype=torch.long)
            o = _run(dec, ids[:, t:t + 1], m, past)
            got.append(o[0])
            past = o[1:]
    assert torch.allclose(torch.cat(got, 1), want, rtol=0, atol=STEP_ATOL["eager"])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1]])
    add = decoder_mask(mask, 3, torch.float64, sliding_window=3)[0, 0]
    for q in range(3):
        slot = 4 + q
        for s in range(7):
            ok = (s <= slot and mask[0, s] == 1 and s > slot - 3) or s == slot
            assert (add[q, s] == 0) == ok


@pytest.fixture(scope="module")
def exported():
    """Float32 nets (sdpa) and their ONNX decoders: an untouched anchor and a stitch with mixed head dims."""
    from klas.lm.export import export_decoder

    a = CausalLMView(_model(ARGS_A, "sdpa", 1, dtype=torch.float32), "lm-a", (T,))
    b = CausalLMView(_model(ARGS_B, "sdpa", 2, dtype=torch.float32), "lm-b", (T,))
    out = {}
    for kind, net in (("anchor", StitchedNet(a, -1, a, -1, None).eval()), ("stitched", _stitched(a, 1, b, 0))):
        dec = CachedDecoder(net).eval()
        out[kind] = (net, dec, export_decoder(dec, 18))
    return out


def _entry(dec):
    return dict(name="m", input=dict(name="input_ids", attention_mask="attention_mask", position_ids="position_ids"), output=dict(name="logits", vocab_size=VOCAB),
                decoder=dict(layers=dec.layer_shapes, past_key="past_key_values.{i}.key",
                             past_value="past_key_values.{i}.value", present_key="present.{i}.key",
                             present_value="present.{i}.value", kv_dtype="float32", max_context=64))


@pytest.mark.parametrize("kind", ["anchor", "stitched"])
def test_onnx_decoder_against_float64(exported, kind):
    """The graph's named symbolic axes; prefill (past length 0) at batch 1 and 3 and cached steps (past 5, one and
    three new tokens) against a float64 copy; 32 greedy steps through klas_runtime's loop equal float64 PyTorch
    re-running the whole prefix."""
    import copy

    import onnxruntime as ort

    from klas.lm.export import torch_greedy
    from klas_runtime.generate import Decoder

    net, dec, model = exported[kind]
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in (*model.graph.input, *model.graph.output)}
    assert dims["input_ids"] == ["batch", "sequence"]
    assert dims["attention_mask"] == ["batch", "past_sequence + sequence"]
    for i, s in enumerate(dec.layer_shapes):
        assert dims[f"past_key_values.{i}.key"] == ["batch", s["kv_heads"], "past_sequence", s["head_dim"]]
        assert dims[f"present.{i}.value"] == ["batch", s["kv_heads"], "past_sequence + sequence", s["head_dim"]]
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    dec64 = copy.deepcopy(dec).double()
    names = dec.input_names()
    for batch, past_len, seq in ((1, 0, 7), (3, 0, T), (3, 5, 1), (2, 5, 3)):
        g = torch.Generator().manual_seed(batch * 10 + past_len + seq)
        ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
        mask = torch.ones(batch, past_len + seq, dtype=torch.long)
        past = dec64.empty_past(batch, past_len, dtype=torch.float64, generator=g)
        with torch.no_grad():
            want = _run(dec64, ids, mask, past)
        feeds = dict(zip(names, [ids.numpy(), mask.numpy(), positions(mask, seq).numpy()] +
                         [p.float().numpy() for p in past]))
        got = sess.run(None, feeds)
        for g_, w in zip(got, want):
            assert g_.shape == tuple(w.shape)
            assert np.abs(g_ - w.numpy()).max() <= 1e-4 * max(1.0, float(w.abs().max()))
    prompts = _ids(7, batch=3, t=9)
    ref = torch_greedy(copy.deepcopy(net).double().eval(), prompts, 32).numpy()
    tokens = Decoder(sess, _entry(dec), dict(pad_token_id=0)).generate(prompts.tolist(), 32, temperature=0.0, stop_ids=())
    assert np.array_equal(np.array(tokens), ref)


def test_weight_only_variants_stay_close_to_their_parent(exported):
    """int8 / int4 MatMulNBits variants: every weight MatMul replaced, smaller files, logits near the parent's
    (int8 much nearer than int4), the same graph interface."""
    import onnxruntime as ort

    from klas.lm.export import weight_only

    net, dec, model = exported["stitched"]
    raw = model.SerializeToString()
    ids = _ids(9, batch=2)
    mask = torch.ones(2, T, dtype=torch.long)
    feeds = dict(zip(dec.input_names(), [ids.numpy(), mask.numpy(), positions(mask, T).numpy()] +
                     [p.numpy() for p in dec.empty_past(2, 0)]))
    base = ort.InferenceSession(raw, providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
    errs = {}
    for bits in (8, 4):
        q = weight_only(model, bits)
        ops = [n.op_type for n in q.graph.node]
        assert "MatMulNBits" in ops
        assert [i.name for i in q.graph.input] == [i.name for i in model.graph.input]
        qraw = q.SerializeToString()
        assert len(qraw) < len(raw)
        got = ort.InferenceSession(qraw, providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
        errs[bits] = float(np.abs(got - base).max() / np.abs(base).max())
    assert errs[8] < 0.1 and errs[8] < errs[4] < 0.5


@pytest.mark.parametrize("kind", ["anchor", "stitched"])
def test_onnxruntime_genai_engine_equals_the_numpy_loop(exported, kind):
    """The same ONNX decoder through onnxruntime-genai's own loop (klas_runtime.genai): greedy tokens equal
    klas-runtime's numpy KV-cache loop, for one head width and for a stitch mixing 8- and 16-wide heads; stop ids
    end a row; seeded sampling is reproducible and top-k 1 is greedy."""
    import onnxruntime as ort

    from klas_runtime.generate import Decoder
    from klas_runtime.genai import GenaiDecoder

    net, dec, model = exported[kind]
    raw = model.SerializeToString()
    entry = _entry(dec)
    gen = dict(pad_token_id=0, eos_token_id=[VOCAB - 1], max_context=64, bos_token_id=None)
    numpy_loop = Decoder(ort.InferenceSession(raw, providers=["CPUExecutionProvider"]), entry, gen)
    prompts = _ids(11, batch=3, t=6).tolist()
    prompts[1] = prompts[1][:3]  # different lengths: the numpy loop pads, genai runs each alone
    want = numpy_loop.generate(prompts, 24)
    g = GenaiDecoder(raw, entry, gen, threads=1)
    try:
        assert g.generate(prompts, 24) == want
        first = want[0][5]  # that token as the stop id: the row ends before it
        assert g.generate(prompts[:1], 24, stop_ids=[first]) == [want[0][:want[0].index(first)]]
        a = g.generate(prompts, 10, temperature=0.9, top_p=0.9, seed=4)
        assert a == g.generate(prompts, 10, temperature=0.9, top_p=0.9, seed=4)
        assert all(0 <= t < VOCAB for row in a for t in row)
        assert g.generate(prompts, 10, temperature=1.0, top_k=1, seed=1) == [w[:10] for w in want]
    finally:
        g.close()
