"""klas-runtime's ``generate`` entry (decoder zoos, manifest schema version 5): sampling, the KV-cache loop, the
tokenizer, budgets per token / to the first token / in memory, verify, profile and the CLI -- against independent
references: a numpy "decoder" whose next token depends on the whole prefix (positions, mask and both layers' keys
and values), recomputed without a cache; and a real tiny ONNX decoder exported from torch here (two layers of
different KV heads and head widths), compared with torch's own no-cache greedy loop."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from klas_runtime.errors import ZooError
from klas_runtime.generate import Decoder, cut_at_stop, load_tokenizer, sample, sample_probs
from klas_runtime.decoder_schema import kv_bytes_per_token
from klas_runtime.manifest import DECODER_SCHEMA_VERSION, MANIFEST, SCHEMA, embedded_entry, load_manifest, validate

VOCAB_FAKE = 13
LAYERS_FAKE = [(2, 3), (1, 5)]


# --- sampling ----------------------------------------------------------------------------------------------------

def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def test_greedy_and_degenerate_sampling_equal_argmax():
    logits = np.random.default_rng(0).standard_normal((64, 50))
    rng = np.random.default_rng(1)
    want = np.array([int(np.argmax(row)) for row in logits])
    assert (sample(logits, rng) == want).all()
    assert (sample(logits, rng, temperature=1.3, top_k=1) == want).all()
    assert (sample(logits, rng, temperature=1.3, top_p=1e-9) == want).all()
    assert sample(logits, rng).dtype == np.int64


def test_temperature_top_k_top_p_frequencies_match_the_distribution():
    logits = np.array([[2.0, 1.0, 0.5, 0.0, -1.0, 1.5]])
    n = 40000
    batch = np.repeat(logits, n, axis=0)
    # temperature: softmax(logits / T)
    p = _softmax(logits[0] / 0.7)
    got = np.bincount(sample(batch, np.random.default_rng(3), temperature=0.7), minlength=6) / n
    assert np.abs(got - p).max() < 0.012, (got, p)
    # top-k 3: the three largest logits, renormalized
    keep = np.argsort(-logits[0])[:3]
    pk = np.zeros(6)
    pk[keep] = _softmax(logits[0][keep])
    got = np.bincount(sample(batch, np.random.default_rng(4), temperature=1.0, top_k=3), minlength=6) / n
    assert set(np.flatnonzero(got)) == set(keep) and np.abs(got - pk).max() < 0.012
    # top-p 0.7: the smallest set of most likely tokens whose probability reaches 0.7
    full = _softmax(logits[0])
    order = np.argsort(-full)
    cum, nucleus = 0.0, []
    for i in order:
        nucleus.append(i)
        cum += full[i]
        if cum >= 0.7:
            break
    pp = np.zeros(6)
    pp[nucleus] = full[nucleus] / full[nucleus].sum()
    assert np.allclose(sample_probs(logits, 1.0, None, 0.7)[0], pp)
    got = np.bincount(sample(batch, np.random.default_rng(5), temperature=1.0, top_p=0.7), minlength=6) / n
    assert set(np.flatnonzero(got)) == set(nucleus) and np.abs(got - pp).max() < 0.012


def test_sampling_is_reproducible_by_seed_and_validates_its_flags():
    logits = np.random.default_rng(0).standard_normal((8, 30))
    a = sample(logits, np.random.default_rng(9), temperature=1.0)
    assert (a == sample(logits, np.random.default_rng(9), temperature=1.0)).all()
    draws = [tuple(sample(logits, np.random.default_rng(s), temperature=1.0)) for s in range(5)]
    assert len(set(draws)) > 1
    for kw, flag in [(dict(temperature=-1.0), "--temperature"), (dict(temperature=1.0, top_k=0), "--top-k"),
                     (dict(temperature=1.0, top_p=0.0), "--top-p"), (dict(temperature=1.0, top_p=1.5), "--top-p"),
                     (dict(temperature=float("nan")), "--temperature")]:
        with pytest.raises(ZooError, match=flag) as e:
            sample(logits, np.random.default_rng(0), **kw)
        assert "\n" not in str(e.value)


def test_cut_at_stop():
    assert cut_at_stop("abc END def", ["END"]) == ("abc ", True)
    assert cut_at_stop("abc", ["x", "bc"]) == ("a", True)
    assert cut_at_stop("abc", ["zz"]) == ("abc", False)


# --- the KV-cache loop on a numpy decoder ---------------------------------------------------------------------------

def _entry(name: str, layers, vocab: int) -> dict:
    """The parts of a decoder entry ``Decoder`` reads (the full manifest entry is ``_model_entry``)."""
    return dict(name=name, input=dict(name="input_ids", kind="decoder", dtype="int64", shape=["batch", "sequence"],
                                      attention_mask="attention_mask", position_ids="position_ids"),
                output=dict(name="logits", vocab_size=vocab),
                decoder=dict(layers=[dict(kv_heads=h, head_dim=d) for h, d in layers],
                             past_key="past_key_values.{i}.key", past_value="past_key_values.{i}.value",
                             present_key="present.{i}.key", present_value="present.{i}.value", kv_dtype="float32"))


class FakeDecoderSession:
    """A decoder in numpy with the ONNX I/O contract: layer i's key at a token is a function of (token, position),
    its value twice that minus one; the logits at a position are 3 sin(A s), s the sum over the attended (mask 1,
    not after it) positions of [layer-0 key, layer-1 value] -- so a wrong position, mask or cache changes tokens."""

    def __init__(self, layers=LAYERS_FAKE, vocab=VOCAB_FAKE, seed=0):
        rng = np.random.default_rng(seed)
        self.layers, self.vocab = layers, vocab
        self.phase = [rng.standard_normal((h, d)) for h, d in layers]
        self.A = rng.standard_normal((vocab, layers[0][0] * layers[0][1] + layers[1][0] * layers[1][1]))
        self.calls = []

    def key(self, i, token, pos):
        return np.sin(0.9 * token + 0.37 * (i + 1) * pos + self.phase[i])

    def feature(self, token, pos):
        return np.concatenate([self.key(0, token, pos).ravel(), (2 * self.key(1, token, pos) - 1).ravel()])

    def get_inputs(self):
        return []

    def get_outputs(self):
        return []

    def run(self, names, feeds):
        ids, mask, pos = feeds["input_ids"], feeds["attention_mask"], feeds["position_ids"]
        assert ids.dtype == mask.dtype == pos.dtype == np.int64
        b, s = ids.shape
        past = [(feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"]) for i in range(2)]
        p = past[0][0].shape[2]
        assert mask.shape == (b, p + s) and pos.shape == (b, s)
        self.calls.append((b, s, p))
        presents = []
        for i, ((k, v), (h, d)) in enumerate(zip(past, self.layers)):
            assert k.shape == v.shape == (b, h, p, d) and k.dtype == np.float32
            nk = np.zeros((b, h, s, d), np.float32)
            for r in range(b):
                for t in range(s):
                    nk[r, :, t] = self.key(i, ids[r, t], pos[r, t])
            presents.append((np.concatenate([k, nk], 2), np.concatenate([v, 2 * nk - 1], 2)))
        k0, v1 = presents[0][0], presents[1][1]
        feat = np.concatenate([k0.transpose(0, 2, 1, 3).reshape(b, p + s, -1),
                               v1.transpose(0, 2, 1, 3).reshape(b, p + s, -1)], axis=2)  # [b, T, F]
        logits = np.zeros((b, s, self.vocab), np.float32)
        for r in range(b):
            for t in range(s):
                q = p + t
                state = (feat[r, :q + 1] * mask[r, :q + 1, None]).sum(0)
                logits[r, t] = 3 * np.sin(self.A @ state)
        out = {"logits": logits}
        for i, (k, v) in enumerate(presents):
            out[f"present.{i}.key"], out[f"present.{i}.value"] = k, v
        return [out[n] for n in names]


def _fake_reference(sess: FakeDecoderSession, prompt, n, stop=()):
    """Greedy without a cache or padding: the whole sequence recomputed at every step."""
    seq, out = list(prompt), []
    for _ in range(n):
        state = sum(sess.feature(tok, t) for t, tok in enumerate(seq))
        nxt = int(np.argmax((3 * np.sin(sess.A @ state)).astype(np.float32)))
        if nxt in stop:
            break
        out.append(nxt)
        seq.append(nxt)
    return out


def test_cached_loop_equals_recomputation_with_left_padding_and_stops():
    sess = FakeDecoderSession()
    dec = Decoder(sess, _entry("fake", LAYERS_FAKE, VOCAB_FAKE), dict(pad_token_id=0, max_context=64,
                                                                       eos_token_id=[]))
    prompts = [[3, 1, 4, 1, 5], [9], [2, 6, 5]]
    got = dec.generate(prompts, 12)
    want = [_fake_reference(sess, p, 12) for p in prompts]
    assert got == want and len(set(map(tuple, got))) == 3  # the prompts lead to different continuations
    assert sess.calls[0] == (3, 5, 0) and sess.calls[1] == (3, 1, 5) and len(sess.calls) == 12  # prefill + 11
    # stop ids: a row ends at its first stop token (not included) and leaves the batch; the others go on
    stop = {want[0][3]}
    sess.calls.clear()
    got = dec.generate(prompts, 12, stop_ids=stop)
    assert got == [_fake_reference(sess, p, 12, stop) for p in prompts]
    assert min(b for b, _, _ in sess.calls) < 3 or all(len(g) == 12 for g in got)
    seen = []
    dec.generate(prompts, 4, on_token=lambda r, t: seen.append((r, t)))
    assert [t for r, t in seen if r == 1] == want[1][:4]


def test_decoder_refuses_bad_prompts_in_one_line():
    dec = Decoder(FakeDecoderSession(), _entry("fake", LAYERS_FAKE, VOCAB_FAKE),
                  dict(pad_token_id=0, max_context=10, eos_token_id=[]))
    cases = [([[]], 2, "prompt 0 is empty"), ([[1, 2.5]], 2, "not an integer token id"),
             ([[1, True]], 2, "not an integer token id"), ([[1, VOCAB_FAKE]], 2, "outside the vocabulary"),
             ([[1] * 8], 3, r"8 tokens \+ --max-new-tokens 3 = 11 is longer than .*max_context 10"),
             ([], 2, "non-empty list of prompts"), ([[1]], 0, "--max-new-tokens")]
    for prompts, n, msg in cases:
        with pytest.raises(ZooError, match=msg) as e:
            dec.generate(prompts, n)
        assert "\n" not in str(e.value)
    assert dec.generate([[1] * 8], 2) == [_fake_reference(dec.session, [1] * 8, 2)]  # exactly the context fits


# --- a real tiny ONNX decoder zoo ----------------------------------------------------------------------------------

MAX_CONTEXT = 48
TEXT = ("the quick brown fox jumps over the lazy dog. café naïve résumé 日本語 テキスト. "
        "a stitched decoder mixes the layers of two anchors; every layer has its own heads. ") * 4


class TinyDecoder(torch.nn.Module):
    """Embeddings + learned positions, one attention block per layer with its own (heads, kv_heads, head_dim),
    grouped-query attention over cat(past, new), masked with a finite -1e9 (so left-padded rows stay finite)."""

    def __init__(self, vocab, dim, layers, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.layers = layers  # (heads, kv_heads, head_dim)
        self.emb = torch.nn.Parameter(torch.randn(vocab, dim, generator=g))
        self.pos = torch.nn.Parameter(torch.randn(MAX_CONTEXT, dim, generator=g))
        self.q = torch.nn.ParameterList([torch.randn(dim, h * d, generator=g) / dim ** 0.5 for h, _, d in layers])
        self.k = torch.nn.ParameterList([torch.randn(dim, kv * d, generator=g) / dim ** 0.5 for _, kv, d in layers])
        self.v = torch.nn.ParameterList([torch.randn(dim, kv * d, generator=g) / dim ** 0.5 for _, kv, d in layers])
        self.o = torch.nn.ParameterList([torch.randn(h * d, dim, generator=g) / (h * d) ** 0.5
                                         for h, _, d in layers])
        self.out = torch.nn.Parameter(torch.randn(dim, vocab, generator=g) * 1.5 / dim ** 0.5)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        b, s = input_ids.shape
        x = self.emb[input_ids] + self.pos[position_ids]
        presents = []
        for i, (h, kv, d) in enumerate(self.layers):
            pk, pv = past[2 * i], past[2 * i + 1]
            q = (x @ self.q[i]).view(b, s, h, d).transpose(1, 2)
            k = torch.cat([pk, (x @ self.k[i]).view(b, s, kv, d).transpose(1, 2)], dim=2)
            v = torch.cat([pv, (x @ self.v[i]).view(b, s, kv, d).transpose(1, 2)], dim=2)
            presents += [k, v]
            kk, vv = k.repeat_interleave(h // kv, dim=1), v.repeat_interleave(h // kv, dim=1)
            t = k.shape[2]
            q_at = torch.arange(s) + (t - s)
            allowed = (torch.arange(t)[None, :] <= q_at[:, None])[None, None] & (attention_mask[:, None, None, :] > 0)
            scores = (q @ kk.transpose(2, 3)) / d ** 0.5
            att = torch.softmax(scores.masked_fill(~allowed, -1e9), dim=-1)
            x = x + torch.tanh((att @ vv).transpose(1, 2).reshape(b, s, h * d) @ self.o[i])
        return (x @ self.out, *presents)


def _torch_greedy(net: TinyDecoder, prompt, n):
    """No cache, no padding: the whole sequence through torch at every step."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids = torch.tensor([seq])
            past = [torch.zeros(1, kv, 0, d) for _, kv, d in net.layers for _ in (0, 1)]
            logits = net(ids, torch.ones_like(ids), torch.arange(len(seq))[None], *past)[0]
            seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt):]


def _export(net: TinyDecoder, path: Path, metadata: dict) -> bytes:
    import onnx

    names = [f"past_key_values.{i}.{w}" for i in range(len(net.layers)) for w in ("key", "value")]
    outs = ["logits"] + [f"present.{i}.{w}" for i in range(len(net.layers)) for w in ("key", "value")]
    ids = torch.tensor([[1, 2, 3]])
    past = [torch.zeros(1, kv, 2, d) for _, kv, d in net.layers for _ in (0, 1)]
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total"},
            "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
    axes.update({n: {0: "batch", 2: "past_sequence"} for n in names})
    axes.update({n: {0: "batch", 2: "total"} for n in outs[1:]})
    torch.onnx.export(net, (ids, torch.ones(1, 5, dtype=torch.long), torch.tensor([[2, 3, 4]]), *past), str(path),
                      input_names=["input_ids", "attention_mask", "position_ids", *names], output_names=outs,
                      dynamic_axes=axes, opset_version=18, dynamo=False)
    model = onnx.load(str(path))
    model.metadata_props.add(key="klas", value=json.dumps(metadata))
    data = model.SerializeToString()
    path.write_bytes(data)
    return data


def _latency(provider_device: str, threads: int, batch: int, ms: float, ttft: dict, memory: float | None) -> dict:
    from klas_runtime.machine import machine_info

    rec = dict(device=provider_device, provider="CPUExecutionProvider", threads=threads, batch=batch, p50_ms=ms * 0.8,
               p90_ms=ms, p99_ms=ms * 1.2, mean_ms=ms * 0.9, warmup=1, runs=5, measured_at="2026-01-01T00:00:00",
               machine=machine_info() | {"onnxruntime": "x"}, prompt_tokens=64, new_tokens=32,
               ttft_ms={str(k): v for k, v in ttft.items()}, tokens_per_s=batch * 1000 / ms)
    if memory is not None:
        rec["peak_memory_mb"] = memory
    return rec


def _model_entry(name, layers, vocab, flops, ppl, precision="fp32", parent=None):
    kv = [(k, d) for _, k, d in layers]
    e = _entry(name, kv, vocab)
    e.update(file=f"{name}.onnx", config=dict(source="tiny", i=-1, target="tiny", j=-1, anchor=True,
                                              source_blocks=[0, 2], target_blocks=[0, 2]),
             params=1000, flops=flops, flops_context=MAX_CONTEXT, test_acc=100 / ppl, test_acc_source="test",
             test_perplexity=ppl, kv_bytes_per_token=kv_bytes_per_token([dict(kv_heads=k, head_dim=d)
                                                                        for k, d in kv]),
             opset=18, latency=[], precision=precision,
             parity=dict(prompts=4, max_abs_diff=1e-5, relative_diff=1e-6, atol=1e-3, greedy_steps=20,
                         greedy_match=1.0, reference="torch"))
    if parent:
        e.update(parent=parent, parity=dict(prompts=4, max_abs_diff=1e-3, greedy_steps=20, greedy_match=0.95,
                                            reference="onnxruntime fp32"),
                 variant=dict(method="MatMulNBits bits=4", parent_test_perplexity=10.0, perplexity_increase=0.05,
                              max_perplexity_increase=0.1, kept_because="cheaper, within the allowed loss"))
    return e


SMALL_LAYERS = [(4, 2, 4), (2, 1, 6)]  # (heads, kv_heads, head_dim): layer 0 24-wide heads... as a stitch mixes
BIG_LAYERS = [(4, 2, 4), (2, 2, 8)]


def _write_manifest(zoo: Path, manifest: dict) -> None:
    (zoo / MANIFEST).write_text(json.dumps(manifest, indent=2))


@pytest.fixture(scope="module")
def lm_zoo(tmp_path_factory):
    """A schema-5 zoo written by hand: a byte-level BPE tokenizer trained here, three decoders (small, big and a
    copy of big marked int4) exported from TinyDecoder with their embedded entries, hashes, and latency records of
    this device (small: 1 ms/token, big: 3 ms/token; the int4 copy: none)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from klas_runtime.machine import machine_info
    from klas_runtime.session import device_label

    torch.set_num_threads(1)
    zoo = tmp_path_factory.mktemp("lm") / "zoo"
    zoo.mkdir()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<eos>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    tok.save(str(zoo / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    tdata = (zoo / "tokenizer.json").read_bytes()
    here = device_label("CPUExecutionProvider")
    manifest = dict(schema=SCHEMA, schema_version=DECODER_SCHEMA_VERSION, family="tiny-lm", dataset="text",
                    klas_version="test", created="2026-01-01", created_on=machine_info() | {"onnxruntime": "x"},
                    task="causal-lm", cost_unit="token", metric="100/perplexity", runtime_entry="generate",
                    tokenizer=dict(file="tokenizer.json", sha256=hashlib.sha256(tdata).hexdigest(),
                                   bytes=len(tdata)),
                    generation=dict(eos_token_id=[1], pad_token_id=0, bos_token_id=None, add_bos=False,
                                    max_context=MAX_CONTEXT), models=[])
    nets = {}
    specs = [("small", SMALL_LAYERS, 100_000, 20.0, 3, None),
             ("big", BIG_LAYERS, 400_000, 10.0, 4, None),
             ("big-int4", BIG_LAYERS, 400_000, 10.5, 4, "big")]
    for name, layers, flops, ppl, seed, parent in specs:
        entry = _model_entry(name, layers, vocab, flops, ppl, "int4" if parent else "fp32", parent)
        net = TinyDecoder(vocab, 16, layers, seed).eval()
        data = _export(net, zoo / entry["file"], embedded_entry(entry, manifest))
        entry.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
        manifest["models"].append(entry)
        nets[name] = net
    by = {m["name"]: m for m in manifest["models"]}
    by["small"]["latency"] = [_latency(here, 1, 1, 1.0, {16: 2.0, 64: 6.0, 128: 12.0}, 50.0)]
    by["big"]["latency"] = [_latency(here, 1, 1, 3.0, {16: 5.0, 64: 15.0, 128: 30.0}, 120.0),
                            _latency(here, 2, 1, 2.5, {16: 20.0, 64: 60.0, 128: 120.0}, 130.0),
                            _latency("cpu: some other machine", 1, 1, 0.1, {16: 0.1}, 1.0)]
    validate(manifest)
    _write_manifest(zoo, manifest)
    return SimpleNamespace(path=zoo, nets=nets, tokenizer=tok, vocab=vocab)


@pytest.fixture
def zoo_copy(lm_zoo, tmp_path):
    dst = tmp_path / "zoo"
    shutil.copytree(lm_zoo.path, dst)
    return dst


def _ids(lm_zoo, text):
    return lm_zoo.tokenizer.encode(text, add_special_tokens=False).ids


def test_onnx_decoder_greedy_equals_torch_without_cache_and_batches_equal_singles(lm_zoo):
    from klas_runtime.runtime import Zoo

    zoo = Zoo(lm_zoo.path)
    for name in ("small", "big"):
        choice = zoo.open(name, device="cpu", threads=1)
        prompts = [_ids(lm_zoo, "the quick brown fox"), _ids(lm_zoo, "café"), _ids(lm_zoo, "zebra")]
        assert len({len(p) for p in prompts}) == 3
        want = [_torch_greedy(lm_zoo.nets[name], p, 24) for p in prompts]
        assert len(set(map(tuple, want))) == 3
        batch = choice.generate_ids(prompts, 24, stop_ids=())
        assert batch == want, name
        for p, w in zip(prompts, want):
            assert choice.generate_ids([p], 24, stop_ids=()) == [w]


def test_generate_text_stream_stop_tokens_and_strings(lm_zoo):
    from klas_runtime.runtime import Zoo

    choice = Zoo(lm_zoo.path).open("big", device="cpu", threads=1)
    prompt = "the lazy dog"
    ids = _ids(lm_zoo, prompt)
    ref = _torch_greedy(lm_zoo.nets["big"], ids, 30)
    text = choice.generate(prompt, 30, stop_ids=())
    assert text == lm_zoo.tokenizer.decode(ref, skip_special_tokens=True)
    pieces = list(choice.stream(prompt, 30, stop_ids=()))
    assert "".join(pieces) == text and len(pieces) > 1
    assert all("\ufffd" not in p for p in pieces) or "\ufffd" in text  # incomplete UTF-8 is held back
    # a stop token (the manifest's eos by default; here one the greedy run meets): cut before it
    stop = ref[5]
    cut = ref[:ref.index(stop)]
    assert choice.generate_ids([ids], 30, stop_ids=[stop]) == [cut]
    assert choice.generate(prompt, 30, stop_ids=[stop]) == lm_zoo.tokenizer.decode(cut, skip_special_tokens=True)
    # stop strings: the text before the first one, streamed or not
    s = text[len(text) // 2: len(text) // 2 + 2]
    assert s and choice.generate(prompt, 30, stop_ids=(), stop=[s]) == text[:text.find(s)]
    assert "".join(choice.stream(prompt, 30, stop_ids=(), stop=[s])) == text[:text.find(s)]
    # sampling through the choice: reproducible by seed, top-k 1 is greedy
    a = choice.generate(prompt, 20, temperature=1.0, seed=5, stop_ids=())
    assert a == choice.generate(prompt, 20, temperature=1.0, seed=5, stop_ids=())
    assert choice.generate(prompt, 20, temperature=0.8, top_k=1, seed=1, stop_ids=()) == choice.generate(
        prompt, 20, stop_ids=())
    with pytest.raises(ZooError, match="is empty"):
        choice.generate("", 5)
    with pytest.raises(ZooError, match="max_context 48"):
        choice.generate(prompt, MAX_CONTEXT)


def test_schema5_validation(lm_zoo):
    good = json.loads((lm_zoo.path / MANIFEST).read_text())
    validate(json.loads(json.dumps(good)))

    def m0(m):
        return m["models"][0]

    cases = [(lambda m: m.pop("tokenizer"), "missing field 'tokenizer'"),
             (lambda m: m["tokenizer"].update(file="../tok.json"), r"tokenizer\.file: invalid value"),
             (lambda m: m["generation"].pop("max_context"), "missing field 'max_context'"),
             (lambda m: m.update(schema_version=4), r"decoder zoos .* need schema_version >= 5"),
             (lambda m: m0(m)["decoder"].update(layers=[]), r"decoder\.layers: invalid value"),
             (lambda m: m0(m)["decoder"]["layers"][1].update(head_dim=0), r"layers\[1\]\.head_dim: invalid"),
             (lambda m: m0(m).update(kv_bytes_per_token=7), "kv_bytes_per_token: 7 is not float32"),
             (lambda m: m0(m).update(test_acc=50.0), r"test_acc: 50 is not 100 / test_perplexity"),
             (lambda m: m0(m).update(precision="fp16"), r"precision: invalid value \"fp16\""),
             (lambda m: m["models"][2].update(flops=1), r"'flops' differs from its parent 'big'"),
             (lambda m: m["models"][2]["decoder"]["layers"][1].update(head_dim=6, kv_heads=2),
              r"(kv_bytes_per_token|'decoder' differs)"),
             (lambda m: m0(m)["latency"][0].pop("ttft_ms"), r"latency\[0\]: missing field 'ttft_ms'"),
             (lambda m: m0(m)["latency"][0].update(ttft_ms={"x": 1.0}), r"ttft_ms: invalid"),
             (lambda m: m["generation"].update(pad_token_id=10 ** 6), "pad_token_id 1000000 is outside"),
             (lambda m: m["generation"].update(add_bos=True), "add_bos is true but bos_token_id is null"),
             (lambda m: m0(m)["input"].update(dtype="int32"), r"input\.dtype: invalid")]
    for edit, message in cases:
        bad = json.loads(json.dumps(good))
        edit(bad)
        with pytest.raises(ZooError, match=message) as e:
            validate(bad)
        assert "\n" not in str(e.value)


def test_load_manifest_hashes_the_tokenizer(zoo_copy):
    load_manifest(zoo_copy)
    with open(zoo_copy / "tokenizer.json", "ab") as f:
        f.write(b" ")
    load_manifest(zoo_copy, verify_files=False)  # names only
    with pytest.raises(ZooError, match=r"tokenizer\.json: sha256 .* does not match") as e:
        load_manifest(zoo_copy)
    assert "\n" not in str(e.value)
    (zoo_copy / "tokenizer.json").unlink()
    with pytest.raises(ZooError, match="tokenizer file listed in manifest.json is missing"):
        load_tokenizer(zoo_copy, json.loads((zoo_copy / MANIFEST).read_text()))


def test_pick_by_flops_ms_per_token_ttft_and_memory(lm_zoo):
    from klas_runtime.decoder_pick import ttft_at
    from klas_runtime.runtime import Zoo

    zoo = Zoo(lm_zoo.path)

    def name(**kw):
        return zoo.pick(device="cpu", with_session=False, **kw).name

    assert name() == "big"  # lowest perplexity (the int4 copy has 10.5)
    assert name(max_flops="200K") == "small"
    assert name(max_flops=400_000) == "big"  # inclusive
    assert name(max_ms_per_token=2.0) == "small"
    assert name(max_ms_per_token=3.0) == "big"
    assert name(max_ms_per_token=2.5) == "big"  # its 2-thread record fits
    c = zoo.pick(device="cpu", with_session=False, max_ms_per_token=2.5)
    assert c.latency_record["threads"] == 2 and c.latency_ms == 2.5
    assert "perplexity 10" in c.reason and "ms per output token" in c.reason and "accuracy" not in c.reason
    # time to first token: interpolated between swept lengths (big at 40 tokens: 5 + 10 * 24/48 = 10 ms)
    rec = zoo["big"]["latency"][0]
    assert ttft_at(rec, 64) == 15.0 and ttft_at(rec, 40) == pytest.approx(10.0) and ttft_at(rec, 3) == 5.0
    assert ttft_at(rec, 128) == 30.0 and ttft_at(rec, 129) is None and ttft_at(rec) == 15.0  # its prompt_tokens
    assert name(max_ttft_ms=10.0, prompt_tokens=40) == "big"
    assert name(max_ttft_ms=10.0, prompt_tokens=41) == "small"
    assert name(max_ttft_ms=15.0) == "big" and name(max_ttft_ms=14.0) == "small"
    with pytest.raises(ZooError, match=r"prompt of 200 tokens is longer than every prompt length profiled .* "
                                       r"--prompt-lengths"):
        zoo.pick(device="cpu", with_session=False, max_ttft_ms=1000.0, prompt_tokens=200)
    # memory: the records' peak_memory_mb; the int4 copy has no records at all
    assert name(max_memory_mb=100) == "small" and name(max_memory_mb=125) == "big"
    with pytest.raises(ZooError, match=r"max_memory_mb 10 is below the smallest peak memory, small"):
        zoo.pick(device="cpu", with_session=False, max_memory_mb=10)
    assert name(precision="int4") == "big-int4"
    with pytest.raises(ZooError, match=r"no decoder of this zoo has generation figures measured on this device.*"
                                       r"klas-runtime profile"):
        zoo.pick(device="cpu", with_session=False, precision="int4", max_ms_per_token=100)
    cases = [(dict(max_ms_per_token=0.5), r"max_ms_per_token 0.5 is below the fastest decoder, small"),
             (dict(max_flops="10K"), r"max_flops_per_token 10K is below the cheapest decoder, small"),
             (dict(max_ms_per_token=-1.0), r"--max-ms-per-token -1.0: expected a finite number >= 0"),
             (dict(max_ttft_ms=1.0), r"max_ttft_ms 1 is below the fastest first token"),
             (dict(max_latency_ms=5.0), r"--max-latency-ms: .* runtime entry 'generate'.*--max-ms-per-token"),
             (dict(min_accuracy=50.0), r"perplexity <= 2\) is above the best decoder, big"),
             (dict(precision="fp16"), r"--precision 'fp16': expected one or more of fp32, int8, int4")]
    for kw, msg in cases:
        with pytest.raises(ZooError, match=msg) as e:
            zoo.pick(device="cpu", with_session=False, **kw)
        assert "\n" not in str(e.value)


def test_pick_never_prefers_a_variant_over_its_fitting_parent(lm_zoo, tmp_path):
    """A variant whose perplexity came out a hair lower than its parent's (noise: same network, cheaper weights) is
    not chosen while its parent fits the budget; it is chosen where only it is asked for."""
    import json
    import shutil

    from klas_runtime.runtime import Zoo

    copy = tmp_path / "zoo"
    shutil.copytree(lm_zoo.path, copy)
    m = json.loads((copy / "manifest.json").read_text())
    v = next(e for e in m["models"] if e["name"] == "big-int4")
    v.update(test_perplexity=9.99, test_acc=100 / 9.99)  # "better" than big's 10.0 by rounding noise
    (copy / "manifest.json").write_text(json.dumps(m))
    zoo = Zoo(copy)
    assert zoo.pick(device="cpu", with_session=False).name == "big"
    assert zoo.pick(device="cpu", with_session=False, max_flops=400_000).name == "big"
    assert zoo.pick(device="cpu", with_session=False, precision="int4").name == "big-int4"


def test_pick_refuses_decoder_budgets_on_an_image_zoo(lm_zoo, tmp_path):
    """Only the decoder entry has figures per token, to the first token and in memory: an image zoo refuses them
    in one line before any file is read."""
    from klas_runtime.runtime import Zoo

    good = json.loads((lm_zoo.path / MANIFEST).read_text())
    shape = [1, 1, 2, 2]
    image = dict(name="img", file="img.onnx", sha256="0" * 64, bytes=1, config=good["models"][0]["config"],
                 params=1, flops=1, test_acc=50.0, test_acc_source="test", opset=18, latency=[],
                 input=dict(name="x", shape=["batch"] + shape[1:], dtype="float32", layout="NCHW", color="grayscale",
                            scale=1 / 255, mean=[0.5], std=[0.5]),
                 output=dict(name="logits", num_classes=2, classes=["a", "b"]),
                 parity=dict(images=1, max_abs_diff=0.0, top1_agreement=1.0, atol=1e-3, min_agreement=0.99,
                             reference="torch"))
    manifest = {k: v for k, v in good.items() if k not in ("tokenizer", "generation", "task", "cost_unit", "metric",
                                                           "runtime_entry")}
    manifest.update(schema_version=4, models=[image])
    (tmp_path / "img").mkdir()
    _write_manifest(tmp_path / "img", manifest)
    zoo = Zoo(tmp_path / "img", verify=False)
    for kw, flag in [(dict(max_ms_per_token=1.0), "--max-ms-per-token"), (dict(max_ttft_ms=1.0), "--max-ttft-ms"),
                     (dict(max_memory_mb=1.0), "--max-memory-mb")]:
        with pytest.raises(ZooError, match=flag + r": .* runtime entry 'classify', which has no such figures") as e:
            zoo.pick(device="cpu", with_session=False, **kw)
        assert "\n" not in str(e.value)


def test_verify_a_good_zoo_a_tampered_tokenizer_and_a_wrong_head_dim(zoo_copy, capsys):
    from klas_runtime import cli
    from klas_runtime.runtime import verify_zoo

    assert verify_zoo(zoo_copy) == []
    assert cli.main(["verify", str(zoo_copy)]) == 0
    out = capsys.readouterr().out
    assert "tokenizer" in out and "KV heads and head width" in out
    # a wrong head width in the manifest (kv_bytes_per_token kept consistent, so the schema passes)
    manifest = json.loads((zoo_copy / MANIFEST).read_text())
    small = manifest["models"][0]
    small["decoder"]["layers"][1]["head_dim"] = 8
    small["kv_bytes_per_token"] = kv_bytes_per_token(small["decoder"]["layers"])
    _write_manifest(zoo_copy, manifest)
    problems = verify_zoo(zoo_copy)
    assert len(problems) == 1 and "small.onnx" in problems[0] and "past_key_values.1.key" in problems[0]
    assert "8" in problems[0] and "\n" not in problems[0]
    # a tampered tokenizer: the zoo-level check names it
    (zoo_copy / "tokenizer.json").write_bytes((zoo_copy / "tokenizer.json").read_bytes().replace(b"<eos>", b"<eoz>"))
    problems = verify_zoo(zoo_copy)
    assert any("tokenizer.json: sha256" in p for p in problems) and len(problems) == 2
    assert cli.main(["verify", str(zoo_copy)]) == 1
    # a tokenizer whose hash is right but which is not a tokenizers file
    junk = b'{"not": "a tokenizer"}'
    manifest["tokenizer"].update(sha256=hashlib.sha256(junk).hexdigest(), bytes=len(junk))
    _write_manifest(zoo_copy, manifest)
    (zoo_copy / "tokenizer.json").write_bytes(junk)
    assert any("not a tokenizers JSON file" in p for p in verify_zoo(zoo_copy))


def _cli(args, capsys, stdin: str | None = None, monkeypatch=None):
    from klas_runtime import cli

    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    rc = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_cli_generate_pick_predict(lm_zoo, capsys, monkeypatch, tmp_path):
    from klas_runtime.runtime import Zoo

    choice = Zoo(lm_zoo.path).open("small", device="cpu", threads=1)
    want = choice.generate("the quick", 12)
    rc, out, err = _cli(["generate", lm_zoo.path, "the quick", "--max-flops-per-token", "200K", "--max-new-tokens",
                         12, "--device", "cpu"], capsys)
    assert rc == 0, err
    assert out == want + "\n" and err.startswith("[generate] model small, engine ") and "perplexity" in err
    rc, out2, _ = _cli(["generate", lm_zoo.path, "the quick", "--max-ms-per-token", "2", "--max-new-tokens", 12,
                        "--no-stream"], capsys)
    assert rc == 0 and out2 == out
    rc, out3, err = _cli(["generate", lm_zoo.path, "-", "--model", "small", "--max-new-tokens", 12], capsys,
                         stdin="the quick", monkeypatch=monkeypatch)
    assert rc == 0 and out3 == out and "chosen by --model" in err
    rc, out4, err = _cli(["generate", lm_zoo.path, "the quick", "--model", "small", "--max-new-tokens", 12,
                          "--temperature", "0.9", "--top-p", "0.9", "--seed", 3, "--engine", "numpy"], capsys)
    assert rc == 0 and out4 == choice.generate("the quick", 12, temperature=0.9, top_p=0.9, seed=3) + "\n"
    rc, out5, err = _cli(["generate", lm_zoo.path, "the quick", "--model", "small", "--max-new-tokens", 12,
                          "--stop", want[3:5]], capsys)
    assert rc == 0 and out5 == want[:want.find(want[3:5])] + "\n"
    rc, out6, err = _cli(["generate", lm_zoo.path, "the quick", "--max-ttft-ms", "3", "--max-new-tokens", 4],
                         capsys)
    assert rc == 0 and "[generate] model small" in err and "first token in 2 ms at 6 prompt tokens" in err
    for args, msg in [(["--temperature", "-1"], "--temperature -1.0: expected a number >= 0"),
                      (["--max-new-tokens", "100"], "is longer than the context"),
                      (["--max-ms-per-token", "0.1"], "max_ms_per_token 0.1 is below the fastest decoder"),
                      (["--max-memory-mb", "1"], "max_memory_mb 1 is below"),
                      (["--model", "nope"], "no model 'nope'"),
                      (["--model", "small", "--max-ms-per-token", "3"], "give a model or a budget, not both")]:
        rc, out, err = _cli(["generate", lm_zoo.path, "the quick", *args], capsys)
        assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert msg in err, err
    rc, out, err = _cli(["generate", tmp_path / "missing", "x"], capsys)
    assert rc == 2 and "zoo directory not found" in err
    rc, out, err = _cli(["pick", lm_zoo.path, "--max-ms-per-token", "2", "--device", "cpu"], capsys)
    assert rc == 0 and out.splitlines()[0] == "small.onnx" and "ms per output token" in out
    (tmp_path / "prompt.txt").write_text("the quick")
    rc, out, err = _cli(["predict", lm_zoo.path, tmp_path / "prompt.txt", "--max-flops-per-token", "200K",
                         "--device", "cpu"], capsys)
    cont = choice.generate("the quick", 16, stop_ids=())
    assert rc == 0 and out.splitlines()[-1].startswith(f"{tmp_path / 'prompt.txt'}: {json.dumps(cont, ensure_ascii=False)[:8]}")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe")
    rc, out, err = _cli(["predict", lm_zoo.path, tmp_path / "bad.txt", "--device", "cpu"], capsys)
    assert rc == 2 and "not UTF-8 text" in err and len(err.strip().splitlines()) == 1


def test_profile_writes_generation_records_that_validate(zoo_copy, capsys):
    from klas_runtime.session import device_label

    rc, out, err = _cli(["profile", zoo_copy, "--model", "small", "--batch", 1, 2, "--runs", 2, "--warmup", 0,
                         "--prompt-lengths", 4, 8, 60, "--new-tokens", 4, "--provider", "cpu"], capsys)
    assert rc == 0, err
    manifest = load_manifest(zoo_copy)
    small = next(m for m in manifest["models"] if m["name"] == "small")
    here = [r for r in small["latency"] if r["device"] == device_label("CPUExecutionProvider") and r["runs"] == 2]
    assert sorted(r["batch"] for r in here) == [1, 2]
    for r in here:
        assert set(r["ttft_ms"]) == {"4", "8"}  # 60 + 1 does not fit the context of 48: skipped
        assert r["new_tokens"] == 4 and r["prompt_tokens"] == 43  # 64 lowered to fit 48 with 4 + 1 new tokens
        assert r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["tokens_per_s"] > 0 and r["peak_memory_mb"] >= 0
    assert "ms/token p50" in out and "tokens/s" in out


def test_generation_latency_record_and_peak_memory(lm_zoo):
    from klas_runtime.decoder_profile import generation_latency_record, measure_peak_memory

    manifest = json.loads((lm_zoo.path / MANIFEST).read_text())
    entry = manifest["models"][1]
    data = (lm_zoo.path / entry["file"]).read_bytes()
    rec = generation_latency_record(data, entry, "cpu", 1, 1, generation=manifest["generation"],
                                    prompt_lengths=(8, 16), prompt_tokens=8, new_tokens=3, warmup=0, runs=2,
                                    memory=False)
    assert set(rec["ttft_ms"]) == {"8", "16"} and "peak_memory_mb" not in rec and rec["prompt_tokens"] == 8
    validate({**manifest, "models": [{**entry, "latency": [rec]}, *manifest["models"][1:2][:0]]})
    mb = measure_peak_memory(data, entry, manifest["generation"], "CPUExecutionProvider", 1, 2, 16, 3)
    assert 0 <= mb < 2000
    with pytest.raises(ZooError, match=r"--prompt-lengths \[100\]: none leaves room"):
        generation_latency_record(data, entry, "cpu", 1, 1, generation=manifest["generation"], prompt_lengths=(100,),
                                  memory=False)
