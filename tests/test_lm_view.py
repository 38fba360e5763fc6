"""Causal LMs as block views (klas.lm): exact decomposition, stitching, per-token costs, anchors from folders/files,
shared-tokenizer checks. Tiny random Llama models of awkward sizes, float64, eager and sdpa; nothing from a hub."""
import pytest
import torch
import torch.nn as nn

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from klas.errors import KlasError  # noqa: E402
from klas.families import _registry  # noqa: E402
from klas.families._registry import AnchorCfg  # noqa: E402
from klas.families.blockview import block_view, stitch_layer_flops, stitchable, stitched_flops  # noqa: E402
from klas.lm.family import check_shared_tokenizer, create_lm_anchor, load_tokenizer  # noqa: E402
from klas.lm.view import CausalLMView, flops_per_token, head_flops_per_token, layer_flops_per_token  # noqa: E402
from klas.stitch import StitchedNet, StitchLayer  # noqa: E402

VOCAB, T, BATCH = 97, 13, 3
# different width, head dim (B's != hidden/heads), KV-head count (GQA 2:1 vs MQA), depth, MLP width, rope base
ARGS_A = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=44, num_hidden_layers=3, num_attention_heads=4,
              head_dim=8, num_key_value_heads=2, max_position_embeddings=64)
ARGS_B = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=70, num_hidden_layers=4, num_attention_heads=3,
              head_dim=16, num_key_value_heads=1, max_position_embeddings=64,
              rope_parameters=dict(rope_type="default", rope_theta=500.0))


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """Weights of order-one effect (HF's 0.02 init makes nearly constant logits, a weak test)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                std = 1.0 if "embed_tokens" in name else p.shape[1] ** -0.5
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
            else:  # RMSNorm gains
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _model(args: dict, impl: str, seed: int, dtype=torch.float64) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**args, attn_implementation=impl))
    return _randomize(model, seed).to(dtype).eval()


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def pair(request):
    a = _model(ARGS_A, request.param, 1)
    b = _model(ARGS_B, request.param, 2)
    assert a.config._attn_implementation == b.config._attn_implementation == request.param
    return CausalLMView(a, "lm-a", (T,)), CausalLMView(b, "lm-b", (T,))


def _ids(seed: int, t: int = T, batch: int = BATCH) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, t), generator=torch.Generator().manual_seed(seed))


def _hand_layers(model, h, start, end=None):
    """The model's decoder layers start..end-1 called directly, with its rotary and an explicit causal mask."""
    t = h.shape[1]
    pos = torch.arange(t).unsqueeze(0)
    cos_sin = model.model.rotary_emb(h, pos)
    mask = torch.full((t, t), torch.finfo(h.dtype).min, dtype=h.dtype).triu(1)[None, None]
    for layer in model.model.layers[start:end]:
        h = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
    return h


@torch.no_grad()
def test_view_reproduces_logits_at_every_split(pair):
    for view, seed in zip(pair, (10, 11)):
        ids = _ids(seed)
        ref = view.model(input_ids=ids).logits
        assert ref.dtype == torch.float64 and ref.shape == (BATCH, T, VOCAB) and ref.std() > 0.1
        assert (view.original(ids) - ref).abs().max() == 0
        for k in range(view.depth + 1):
            h = view.forward_blocks(view.forward_stem(ids), 0, k)
            out = view.forward_head(view.forward_blocks(h, k))
            assert (out - ref).abs().max().item() < 1e-10, (view.name, k)
        # another length than the one costs are stated at runs too (positions/masks are built per call)
        ids5 = _ids(seed, t=5, batch=2)
        assert (view(ids5) - view.model(input_ids=ids5).logits).abs().max().item() < 1e-10


def test_view_structure(pair):
    a, b = pair
    assert isinstance(block_view(a.model, "x", (T,)), CausalLMView)  # registered for LlamaForCausalLM
    for view in pair:
        n = view.model.config.num_hidden_layers
        assert view.depth == n and view.block_names == [f"model.layers.{k}" for k in range(n)]
        assert view.block_stages == [0] * n and view.channels_last
        # the wrappers are not submodules: state_dict keys are the HF model's under "model."
        assert list(view.state_dict()) == [f"model.{k}" for k in view.model.state_dict()]
        assert view.vocab_size == VOCAB and view.context_length == T and view.config is view.model.config
        x = view.example_input(4, seed=3)
        assert x.dtype == torch.int64 and x.shape == (4, T) and 0 <= int(x.min()) and int(x.max()) < VOCAB
        assert torch.equal(x, view.example_input(4, seed=3)) and not torch.equal(x, view.example_input(4, seed=4))
        assert "q_proj" in view.lora_targets and "down_proj" in view.lora_targets
    assert a.widths == [32] * 3 and b.widths == [48] * 4
    assert all(a.spatial(i) == () and a.tokens(i) == 1 for i in range(a.depth))
    assert all(stitchable(a, i, b, j) for i in range(a.depth) for j in range(b.depth))


@torch.no_grad()
def test_stitched_forward_equals_hand_composition(pair):
    a, b = pair
    ids = _ids(20)
    g = torch.Generator().manual_seed(5)
    for src, tgt in ((a, b), (b, a)):
        for i, j in ((0, 0), (0, tgt.depth - 2), (src.depth - 2, 1), (1, tgt.depth - 1)):
            layer = StitchLayer(src.feature_dim(i), tgt.feature_dim(j)).double()
            layer.linear.weight.copy_(torch.randn(layer.linear.weight.shape, generator=g, dtype=torch.float64)
                                      * src.feature_dim(i) ** -0.5)
            layer.linear.bias.copy_(torch.randn(layer.linear.bias.shape, generator=g, dtype=torch.float64))
            net = StitchedNet(src, i, tgt, j, layer).eval()
            sm, tm = src.model, tgt.model
            h = _hand_layers(sm, sm.model.embed_tokens(ids), 0, i + 1)
            h = _hand_layers(tm, h @ layer.linear.weight.T + layer.linear.bias, j + 1)
            ref = tm.lm_head(tm.model.norm(h))
            out = net(ids)
            assert out.shape == (BATCH, T, VOCAB)
            assert (out - ref).abs().max().item() < 1e-10, (src.name, i, tgt.name, j)


def test_flops_per_token_and_kv_bytes(pair):
    a, b = pair
    for view in pair:
        cfg = view.model.config
        assert view.stem_flops == 0 and view.head_flops == head_flops_per_token(cfg) == 2 * cfg.hidden_size * VOCAB
        assert [x.flops for x in view.infos] == [layer_flops_per_token(cfg, T)] * view.depth
        assert view.flops == flops_per_token(cfg, T)
        assert [x.shape for x in view.infos] == [(cfg.hidden_size,)] * view.depth
        kv = cfg.num_key_value_heads * cfg.head_dim
        assert view.kv_bytes_per_token() == 2 * cfg.num_hidden_layers * kv * 4
        assert view.kv_bytes_per_token(2) == view.kv_bytes_per_token() // 2
        assert sum(view.layer_kv_bytes(k) for k in range(view.depth)) == view.kv_bytes_per_token()
    # hand check of A's formula: q, k, v, o + 3 MLP matrices + attention over T, per token
    d, hd, h, kvh, inter = 32, 8, 4, 2, 44
    assert layer_flops_per_token(a.model.config, T) == (2 * d * h * hd * 2 + 2 * 2 * d * kvh * hd
                                                        + 3 * 2 * d * inter + 4 * h * hd * T)
    # a stitch is per token too: 2 * d_src * d_tgt for the layer
    assert stitch_layer_flops(a, 1, b, 2) == 2 * 32 * 48
    assert stitched_flops(a, 1, b, 2) == (2 * layer_flops_per_token(a.model.config, T) + 2 * 32 * 48
                                          + layer_flops_per_token(b.model.config, T) + b.head_flops)


def _tokenizer(words: list[str], path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(["[UNK]"] + words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(path))
    return path


@torch.no_grad()
def test_create_lm_anchor_from_folders_and_overrides(tmp_path):
    model = _model(ARGS_A, "sdpa", 7, dtype=torch.float32)  # from_pretrained's default (config.json omits it)
    folder = tmp_path / "lm-a"
    model.save_pretrained(folder)
    _tokenizer(["the", "cat", "sat"], folder / "tokenizer.json")
    ids = _ids(30)
    ref = model(input_ids=ids).logits

    view = create_lm_anchor(AnchorCfg("lm-a", "llama", weights=str(folder)), (T,), pretrained=True)
    assert isinstance(view, CausalLMView) and not view.training and view.model.dtype == torch.float32
    assert torch.allclose(view(ids), ref, atol=1e-6, rtol=0)
    assert view.weights_file == folder and view.tokenizer_file == folder / "tokenizer.json"
    assert view.flops == flops_per_token(model.config, T) and view.model.config._attn_implementation == "sdpa"
    assert all(torch.equal(p, q) for p, q in zip(view.model.state_dict().values(), model.state_dict().values()))
    # the one model_arg a saved model takes: its attention implementation
    v = create_lm_anchor(AnchorCfg("lm-a", "llama", dict(attn_implementation="eager"), weights=str(folder)), (T,),
                         pretrained=True)
    assert v.model.config._attn_implementation == "eager"
    assert torch.allclose(v(ids), v.original(ids), atol=1e-6, rtol=0) and torch.allclose(v(ids), ref, atol=1e-4)
    # the same weights through a dict override and a directory of <name>/ folders, on an anchor without its own
    for weights in ({"lm-a": str(folder)}, tmp_path):
        v = create_lm_anchor(AnchorCfg("lm-a", "llama", ARGS_A), (T,), weights=weights)
        assert torch.allclose(v(ids), ref, atol=1e-6, rtol=0) and v.weights_file == folder
    with pytest.raises(KlasError, match=r"no weights for anchor 'lm-z'"):
        create_lm_anchor(AnchorCfg("lm-z", "llama", ARGS_A), (T,), weights=tmp_path)
    # not pretrained: the folder's architecture, random weights
    v = create_lm_anchor(AnchorCfg("lm-a", "llama", weights=str(folder)), (T,))
    assert v.weights_file is None and v.depth == 3 and not torch.allclose(v(ids), ref)


@torch.no_grad()
def test_create_lm_anchor_from_an_embedded_file(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.setattr(_registry, "_EMBEDDED_WEIGHTS", tmp_path)
    args = dict(ARGS_B, tie_word_embeddings=True)
    anchor = AnchorCfg("lm-e", "llama", args, embedded_file="lm-e.safetensors")
    with pytest.raises(KlasError, match=r"embedded weights missing \(train them with `klas anchors train lm-e`\)"):
        create_lm_anchor(anchor, (T,), pretrained=True)
    model = _model(args, "sdpa", 8, dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    sd = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: saved once
    save_file(sd, str(tmp_path / "lm-e.safetensors"))
    view = create_lm_anchor(anchor, (T,), pretrained=True)
    ids = _ids(31)
    assert torch.allclose(view(ids), model(input_ids=ids).logits, atol=1e-6, rtol=0)
    assert view.weights_file == tmp_path / "lm-e.safetensors" and view.tokenizer_file is None
    assert create_lm_anchor(anchor, (T,)).weights_file is None  # not pretrained: random, no file read
    save_file(dict(sd, extra=torch.zeros(2)), str(tmp_path / "lm-e.safetensors"))
    with pytest.raises(KlasError, match=r"do not fit anchor 'lm-e'.*1 unexpected keys \(extra\)"):
        create_lm_anchor(anchor, (T,), pretrained=True)


def test_create_lm_anchor_hub_failure_is_one_line(monkeypatch):
    import transformers

    seen = []

    def offline(source, **kw):
        seen.append((source, kw.get("dtype")))
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", offline)
    for w in ("hf:someorg/some-lm", "someorg/some-lm"):
        with pytest.raises(KlasError) as e:
            create_lm_anchor(AnchorCfg("lm-h", "llama", weights=w), (T,), pretrained=True)
        msg = str(e.value)
        assert "\n" not in msg and "'lm-h'" in msg and "someorg/some-lm" in msg and "couldn't connect" in msg
    assert seen == [("someorg/some-lm", torch.float32)] * 2


def test_shared_tokenizer_check(tmp_path):
    a = create_lm_anchor(AnchorCfg("lm-a", "llama", ARGS_A), (T,))
    b = create_lm_anchor(AnchorCfg("lm-b", "llama", ARGS_B), (T,))
    assert check_shared_tokenizer([a, b]) is None  # no tokenizer files: only the vocab sizes are compared
    t1 = _tokenizer(["the", "cat", "sat"], tmp_path / "t1.json")
    t2 = _tokenizer(["the", "sat", "cat"], tmp_path / "t2.json")  # same tokens, different ids
    t3 = _tokenizer(["the", "cat", "sat"], tmp_path / "t3.json")
    assert load_tokenizer(t1).get_vocab() == load_tokenizer(t3).get_vocab()
    a.tokenizer_file, b.tokenizer_file = t1, t3
    assert check_shared_tokenizer([a, b]) == t1
    b.tokenizer_file = t2
    with pytest.raises(KlasError, match=r"^fam\.toml: anchors 'lm-a' and 'lm-b' have different tokenizers .*"
                                        r"2 tokens with different ids") as e:
        check_shared_tokenizer([a, b], where="fam.toml")
    assert "\n" not in str(e.value)
    c = create_lm_anchor(AnchorCfg("lm-c", "llama", dict(ARGS_A, vocab_size=VOCAB + 3)), (T,))
    with pytest.raises(KlasError, match=r"anchors 'lm-a' and 'lm-c' have different vocabulary sizes \(97 vs 100\)"):
        check_shared_tokenizer([a, c])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(KlasError, match=r"bad\.json: unreadable tokenizer"):
        load_tokenizer(tmp_path / "bad.json")
    with pytest.raises(KlasError, match=r"tokenizer file not found"):
        load_tokenizer(tmp_path / "none.json")
