"""Causal language models end to end: a user-style family (two tiny random Llama decoders of different width, head
dim and KV-head count, saved as save_pretrained folders with one tokenizer) on a generated text corpus, from a
config, through probes (tuned lenses), scores, selection, finetuning and evaluation; and the pieces against
independent references (float64 PyTorch)."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch

pytest.importorskip("transformers")

WORDS = ("the module function returns a list of values when called with keyword arguments and raises an error "
         "if the object is not iterable class method attribute string integer file path import package").split()


def _corpus(root, n_docs=40, seed=0):
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for d in range(n_docs):
        paras = []
        for _ in range(rng.randint(2, 4)):
            paras.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 120))) + ".")
        (root / f"doc{d:03d}.txt").write_text("\n\n".join(paras))
    with open(root / "more.jsonl", "w") as fh:
        for d in range(6):
            fh.write(json.dumps(dict(text=" ".join(rng.choice(WORDS) for _ in range(200)))) + "\n")
    return root


@pytest.fixture(scope="module")
def lm_family(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from klas.lm.data import open_corpus, train_tokenizer

    base = tmp_path_factory.mktemp("lmfam")
    corpus = _corpus(base / "text")
    tok = train_tokenizer((t for _, t in open_corpus("text", corpus).documents()), 320, base / "tokenizer.json")
    vocab = tok.get_vocab_size()
    folders = []
    for k, (d, n, h, hd, kv) in enumerate(((32, 2, 4, 8, 2), (48, 3, 3, 16, 1))):
        torch.manual_seed(k)
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=d, num_hidden_layers=n, num_attention_heads=h, head_dim=hd,
                          num_key_value_heads=kv, intermediate_size=2 * d, max_position_embeddings=64,
                          tie_word_embeddings=k == 0)
        m = LlamaForCausalLM(cfg)
        with torch.no_grad():
            for p in m.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 0.15)
        f = base / f"a{k}"
        m.save_pretrained(f)
        (f / "tokenizer.json").write_text((base / "tokenizer.json").read_text())
        folders.append(f)
    toml = base / "run.toml"
    toml.write_text(f'''
[run]
family = "tiny-llama"
threads = 1

[data]
root = "{corpus}"

[family]
name = "tiny-llama"
task = "causal-lm"
dataset = "text"

[family.input]
context = 24

[[family.anchors]]
name = "small"
weights = "{folders[0]}"

[[family.anchors]]
name = "large"
weights = "{folders[1]}"

[probes]
epochs = 1
batch_size = 8
lr = 1e-3
train_subset = 16
val_subset = 8
eval_batch_size = 8

[scores]
batch_size = 4
val_subset = 8
memory_mb = 1

[finetune]
epochs = 1
steps_per_epoch = 2
batch_size = 4
label_smoothing = 0.0
augment = false
max_stitches = 2
val_images = 4

[finetune.init]
samples = 8
batch_size = 4

[evaluation]
val_subset = 12
test_subset = 12
batch_size = 4
latency_repeats = 2
generations = 3
new_tokens = 4

[export]
parity_prompts = 3
greedy_steps = 8
decode_tokens = 4
decode_runs = 2
warmup = 1
runs = 2
precisions = "int8,int4"
max_perplexity_increase = 0.05
''')
    return dict(base=base, corpus=corpus, toml=toml, folders=folders, vocab=vocab)


@pytest.fixture(scope="module")
def lm_run(lm_family, tmp_path_factory):
    """The whole pipeline, ONNX decoders included, run once on the user-style family."""
    from klas.config import load_config
    from klas.pipeline import run_pipeline

    base = tmp_path_factory.mktemp("lmrun")
    mp = pytest.MonkeyPatch()
    mp.setenv("KLAS_CACHE_DIR", str(base / "cache"))
    try:
        cfg = load_config(lm_family["toml"])
        out = run_pipeline(cfg, base / "run", progress=False)
        yield dict(cfg=cfg, out=out, run=base / "run")
    finally:
        mp.undo()


def test_lm_pipeline_runs_to_an_evaluation(lm_family, lm_run):
    """The whole pipeline on the user-style family: the anchors untouched in the zoo, every model with its per-token
    costs, perplexities (equal to exp of the mean NLL computed independently for the untouched anchors) and ROUGE."""
    from klas.stages.s5_evaluation import EvaluationArtifact

    cfg, out = lm_run["cfg"], lm_run["out"]
    assert set(out) == {"probes", "scores", "selection", "finetune", "evaluation", "export"}
    ev = EvaluationArtifact.load(lm_run["run"] / "evaluation")
    assert ev.task == "causal-lm"
    assert [u["key"] for u in ev.untouched] == ["small", "large"]
    assert {z["name"] for z in ev.zoo if z["kind"] == "anchor"} == {"small", "large"}
    for r in ev.configs + ev.untouched:
        assert r["kv_bytes_per_token"] > 0 and r["flops"] > 0
        assert r["test_perplexity"] == pytest.approx(100.0 / r["test_acc"], rel=1e-6)
        assert {"test_rouge1", "test_rouge2", "test_rougeL"} <= set(r)
    stitched = [r for r in ev.configs if not r["anchor"]]
    assert stitched and all("admission" in r for r in stitched)
    # the untouched anchors' test perplexity from the Hugging Face models themselves, float64
    from transformers import AutoModelForCausalLM

    from klas.tasks import get_task

    test = get_task("causal-lm").open_split("tiny-llama", "test", cfg.data).subset(12)
    for u, folder in zip(ev.untouched, lm_family["folders"]):
        m = AutoModelForCausalLM.from_pretrained(folder).double().eval()
        with torch.no_grad():
            logits = m(input_ids=test.images.long()).logits
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), test.labels.long().reshape(-1))
        assert u["test_perplexity"] == pytest.approx(math.exp(float(nll)), rel=1e-4)
    # KV bytes: the source's layers up to the stitch, the target's after it
    for r in stitched:
        c = r["config"]
        per = {"small": 2 * 2 * 8 * 4, "large": 2 * 1 * 16 * 4}
        depth = {"small": 2, "large": 3}
        assert r["kv_bytes_per_token"] == per[c["source"]] * (c["i"] + 1) + per[c["target"]] * (depth[c["target"]] - c["j"] - 1)


def test_lm_zoo_exports_decoders_that_generate(lm_family, lm_run):
    """The export stage's decoder zoo: the untouched anchors (bit-identical weights) and the admitted stitches (mixed
    head dims in one cache), each with parity, perplexity, per-token costs and latency records; variants only with a
    recorded reason. Through the runtime: verify passes, pick by FLOPs per token chooses the lowest perplexity within
    budget, and greedy generation equals Hugging Face's own ``generate`` of the untouched anchor."""
    import json

    from transformers import AutoModelForCausalLM

    from klas.stages.s5_evaluation import EvaluationArtifact
    from klas_runtime.manifest import load_manifest
    from klas_runtime.runtime import Zoo, verify_zoo

    zoo = lm_run["run"] / "zoo"
    m = load_manifest(zoo)  # schema and every hash, the tokenizer's included
    assert (m["task"], m["runtime_entry"], m["cost_unit"]) == ("causal-lm", "generate", "token")
    assert (zoo / m["tokenizer"]["file"]).read_text() == (lm_family["base"] / "tokenizer.json").read_text() or \
        json.loads((zoo / m["tokenizer"]["file"]).read_text())["model"] == \
        json.loads((lm_family["base"] / "tokenizer.json").read_text())["model"]
    ev = EvaluationArtifact.load(lm_run["run"] / "evaluation")
    fp32 = [e for e in m["models"] if e.get("precision", "fp32") == "fp32"]
    assert sorted(e["name"] for e in fp32) == sorted(z["name"] for z in ev.zoo)
    rows = {z["name"]: z for z in ev.zoo}
    for e in fp32:
        assert e["parity"]["greedy_match"] == 1.0 and e["parity"]["relative_diff"] <= e["parity"]["atol"]
        assert e["test_acc"] == pytest.approx(rows[e["name"]]["test_acc"])
        # the graph's own perplexity on the evaluation's test sequences equals PyTorch's (float32 both)
        assert e["onnx_test_perplexity"] == pytest.approx(e["test_perplexity"], rel=1e-3)
        assert {r["batch"] for r in e["latency"]} == {1, 8}
        one = next(r for r in e["latency"] if r["batch"] == 1)
        assert one["peak_memory_mb"] >= 0 and one["ttft_ms"] and one["p50_ms"] <= one["p90_ms"] <= one["p99_ms"]
        if e["origin"] == "untouched":
            assert e["weights"]["check"].startswith("bit-identical")
    stitched = [e for e in fp32 if e["origin"] == "stitched"]
    if not stitched:  # none admitted at this tiny budget: export the run's first stitch alone, the same way
        from klas.export import export_models
        from klas.stages.s6_export import ExportConfig
        from klas.stitch import StitchConfig
        from klas.stitched import load_stitched
        from klas.tasks import get_task

        row = next(r for r in ev.configs if not r["anchor"])
        config = StitchConfig.from_dict(row["config"])
        test = get_task("causal-lm").open_split("tiny-llama", "test", lm_run["cfg"].data)
        extra = export_models([(config, lambda c: load_stitched(lm_run["run"], c), row)], lm_run["run"] / "zoo1",
                              "tiny-llama", test, ExportConfig(parity_prompts=3, greedy_steps=8, profile=False,
                                                              precisions="none"), progress=False,
                              evaluated=ev.n_test)
        stitched = extra["models"]
        assert verify_zoo(lm_run["run"] / "zoo1") == []
    for e in stitched:
        assert {layer["head_dim"] for layer in e["decoder"]["layers"]} == {8, 16}
        assert e["parity"]["greedy_match"] == 1.0 and e["parity"]["relative_diff"] <= e["parity"]["atol"]
        assert e["onnx_test_perplexity"] == pytest.approx(e["test_perplexity"], rel=1e-3)
    for v in (e for e in m["models"] if e.get("precision", "fp32") != "fp32"):
        # kept on val (the test increase is reported beside it)
        assert v["variant"]["kept_because"] and v["variant"]["val_perplexity_increase"] <= 0.05
        assert "perplexity_increase" in v["variant"]
    for r in m.get("rejected", []):
        assert r["reason"]
    assert verify_zoo(zoo) == []

    z = Zoo(zoo)
    small = next(e for e in fp32 if e["name"] == "small")
    budget = small["flops"]
    choice = z.pick(max_flops=budget, device="cpu")
    fits = [e for e in m["models"] if e["flops"] <= budget]
    names = {e["name"] for e in fits}  # a variant competes only where its parent does not fit
    fits = [e for e in fits if e.get("parent") not in names]
    assert choice.name == max(fits, key=lambda e: (e["test_acc"], -e["flops"], e.get("precision", "fp32") == "fp32",
                                                   e["name"]))["name"]
    # greedy generation of the untouched anchor through the zoo == HF generate on the user's own folder
    anchor = z.open("small", device="cpu")
    prompt = "the quick"
    ids = anchor.encode(prompt)
    got = anchor.generate_ids([ids], 8, stop_ids=())[0]
    hf = AutoModelForCausalLM.from_pretrained(lm_family["folders"][0]).eval()
    with torch.no_grad():
        want = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, len(ids):].tolist()
    assert got == want
    assert anchor.generate(prompt, 8, stop_ids=()) == anchor.decode(want)


def test_lm_zoo_in_the_runtime_only_install(lm_run, runtime_env, tmp_path):
    """``klas-runtime verify / pick / generate`` on the exported decoder zoo in a venv without torch or klas: the
    pick is the one made here, greedy text equals the in-process runtime's, streamed output equals it too, and a
    bad budget or a tampered tokenizer is one line and a non-zero exit."""
    import shutil
    import subprocess

    from klas_runtime.runtime import Zoo

    venv, env = runtime_env
    zoo = lm_run["run"] / "zoo"

    def run(*args):
        return subprocess.run([str(venv / "bin" / "klas-runtime"), *map(str, args)], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=120)

    r = run("verify", zoo)
    assert r.returncode == 0 and r.stderr == "", r.stdout + r.stderr
    z = Zoo(zoo)
    budget = sorted(e["flops"] for e in z.models)[-2]
    here = z.pick(max_flops=budget, device="cpu")
    r = run("pick", zoo, "--max-flops-per-token", budget, "--device", "cpu")
    assert r.returncode == 0 and r.stdout.splitlines()[0] == here.entry["file"], r.stdout + r.stderr
    prompt = "the module function"
    want = here.generate(prompt, 6)
    r = run("generate", zoo, prompt, "--max-flops-per-token", budget, "--max-new-tokens", 6, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == want and f"[generate] model {here.name}" in r.stderr
    r = run("generate", zoo, prompt, "--max-flops-per-token", budget, "--max-new-tokens", 6, "--no-stream")
    assert r.returncode == 0 and r.stdout.rstrip("\n") == want
    r = run("generate", zoo, prompt, "--max-ms-per-token", "-1")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    bad = tmp_path / "bad"
    shutil.copytree(zoo, bad)
    tok = bad / z.manifest["tokenizer"]["file"]
    tok.write_text(tok.read_text().replace("the", "teh", 1))
    r = run("verify", bad)
    assert r.returncode == 1 and "tokenizer" in r.stderr and "sha256" in r.stderr, r.stdout + r.stderr
    r = run("generate", bad, prompt)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "sha256" in r.stderr, r.stderr


def test_generate_through_onnxruntime_genai(lm_run, capsys):
    """``generate --engine onnxruntime-genai`` on the exported zoo prints the numpy engine's text and says which
    engine ran (token-for-token equality on mixed head dims: tests/test_lm_export.py)."""
    from klas_runtime.cli import main
    from klas_runtime.genai import resolve_engine

    zoo = lm_run["run"] / "zoo"
    assert resolve_engine("auto") == "onnxruntime-genai"
    out = {}
    for engine in ("numpy", "onnxruntime-genai"):
        assert main(["generate", str(zoo), "the module function", "--model", "small", "--max-new-tokens", "6",
                     "--engine", engine]) == 0
        o, err = capsys.readouterr()
        assert f"engine {engine}" in err
        out[engine] = o
    assert out["numpy"] == out["onnxruntime-genai"]


def test_score_chunks_bound_memory_and_do_not_change_the_scores(lm_family, tmp_path, monkeypatch):
    """Chunked lens logits (a bound of a few rows) give the same KL tables as one chunk, and no chunk is larger than
    the bound allows."""
    monkeypatch.setenv("KLAS_CACHE_DIR", str(tmp_path / "cache"))
    from klas.config import load_config
    from klas.families import create_family
    from klas.lm.lens import new_lenses, rows_per_chunk, score_chunks
    from klas.stages.s1_probes import ProbesConfig
    from klas.stages.s2_scores import ScoreAccumulator

    load_config(lm_family["toml"])  # registers the family
    fam = create_family("tiny-llama", pretrained=True)
    nets = new_lenses(fam, ProbesConfig(), 0)
    for n in nets.values():
        with torch.no_grad():
            for p in n.parameters():
                p.normal_(0.0, 0.05)
    x = torch.randint(0, lm_family["vocab"], (3, 24), generator=torch.Generator().manual_seed(1))
    names, depths = [v.name for v in fam], [v.depth for v in fam]
    big, small = ScoreAccumulator(names, depths), ScoreAccumulator(names, depths)
    for lg, _ in score_chunks(fam, nets, x, 1 << 12):
        big.update(lg)
    step = rows_per_chunk(fam, 1)
    assert step < 72  # a 1 MB bound at this vocabulary: fewer rows than the batch's 72 tokens
    n_chunks = 0
    for lg, _ in score_chunks(fam, nets, x, 1):
        assert all(t.shape[1] <= step for t in lg.values())
        small.update(lg)
        n_chunks += 1
    assert n_chunks == -(-72 // step)
    rb, rs = big.results(), small.results()
    assert rb["count"] == rs["count"] == 72
    for p in rb["D"]:
        torch.testing.assert_close(rb["D"][p], rs["D"][p], rtol=1e-5, atol=1e-8)  # float32 logits, other shapes
    torch.testing.assert_close(rb["anchor_kl"], rs["anchor_kl"], rtol=1e-5, atol=1e-8)


def test_lenses_against_the_model(lm_family):
    """A zero-initialised tuned lens is the logit lens; the logit lens of the last layer is the model's own logits;
    a lens folds to the affine map it applies (float64)."""
    from klas.lm.family import create_lm_anchor
    from klas.families._registry import AnchorCfg
    from klas.lm.lens import LensProbes, lens_from_tensors

    v = create_lm_anchor(AnchorCfg("large", "", {}, weights=str(lm_family["folders"][1])), (24,), pretrained=True)
    v.double()
    x = torch.randint(0, lm_family["vocab"], (2, 24), generator=torch.Generator().manual_seed(2))
    h = v.forward_stem(x)
    feats = []
    for blk in v.blocks:
        h = blk(h)
        feats.append(h)
    tuned, logit = LensProbes(v, "tuned").double(), LensProbes(v, "logit").double()
    torch.testing.assert_close(tuned(feats), logit(feats), rtol=0, atol=0)
    ref = v.model(input_ids=x).logits
    torch.testing.assert_close(logit(feats)[-1], ref, rtol=1e-10, atol=1e-10)
    low = LensProbes(v, "lowrank", rank=3, seed=1).double()
    with torch.no_grad():
        for p in list(tuned.parameters()) + list(low.parameters()):
            p.normal_(0.0, 0.1)
    for lens in (tuned, low):
        tensors = {f"large/{k}.{n}": t for k, (w, b) in enumerate(lens.folded()) for n, t in (("weight", w),
                                                                                               ("bias", b))}
        back = lens_from_tensors(v, tensors, "test").double()
        torch.testing.assert_close(back(feats), lens(feats), rtol=1e-9, atol=1e-9)
    # the lens never trains its anchor: gradients reach the lens parameters only
    tuned.float(), v.float()
    loss = tuned([f.float().detach() for f in feats]).logsumexp(-1).sum()
    loss.backward()
    assert all(p.grad is None for p in v.model.parameters())
    assert all(p.grad is not None for p in tuned.parameters())


def test_task_losses_and_metrics_match_float64_references():
    from klas.tasks import get_task

    task = get_task("causal-lm")
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 7, 11, generator=g) * 4
    logits[0, 0, 3] = 80.0  # an extreme value
    y = torch.randint(0, 11, (5, 7), generator=g)
    lp = torch.log_softmax(logits.double(), -1)
    nll = -lp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    assert float(task.loss(logits, y)) == pytest.approx(float(nll.mean()), rel=1e-5)
    assert float(task.loss(logits, y, reduction="sum")) == pytest.approx(float(nll.mean(-1).sum()), rel=1e-5)
    pred, conf = task.predict(logits, y)
    assert float(task.score(pred, y)) == pytest.approx(100 * math.exp(-float(nll.mean())), rel=1e-5)
    torch.testing.assert_close(task.quality(pred, y), torch.exp(-nll.mean(-1)), rtol=1e-5, atol=1e-7)
    rep = task.report(pred, y)
    assert rep["perplexity"] == pytest.approx(math.exp(float(nll.mean())), rel=1e-4)
    assert rep["next_token_acc"] == pytest.approx(100 * float((lp.argmax(-1) == y).double().mean()), abs=1e-3)
    teacher = torch.randn(5, 7, 11, generator=g)
    pt = torch.softmax(teacher.double() / 2, -1)
    kl = (pt * (pt.log() - torch.log_softmax(logits.double() / 2, -1))).sum(-1).mean() * 4
    assert float(task.distillation(logits, teacher, 2.0)) == pytest.approx(float(kl), rel=1e-4)
    with pytest.raises(ValueError):
        task.predict(logits)


def test_text_data_split_by_document_and_packed(lm_family, tmp_path, monkeypatch):
    """Documents never straddle splits; the token files are made once; sequences are the token stream cut in
    context + 1 pieces (inputs and next-token targets)."""
    monkeypatch.setenv("KLAS_CACHE_DIR", str(tmp_path / "cache"))
    from klas.lm.data import (eot_id, open_corpus, packed, read_prompts, split_of_documents, split_prompts,
                              tokenize_corpus)
    from tokenizers import Tokenizer
    from klas.data.datasets import DataSpec

    corpus = open_corpus("text", lm_family["corpus"])
    docs = list(corpus.documents())
    assert len(docs) == 46 and docs[-1][0] == "more.jsonl:5"
    which = split_of_documents(len(docs))
    assert which == split_of_documents(len(docs)) and set(which) == {"train", "val", "test"}
    tok = Tokenizer.from_file(str(lm_family["base"] / "tokenizer.json"))
    paths = tokenize_corpus(corpus, tok)
    mtime = paths["val"].stat().st_mtime_ns
    assert tokenize_corpus(corpus, tok)["val"].stat().st_mtime_ns == mtime  # reused, not made again
    stream = []
    for (_, text), s in zip(docs, which):
        if s == "val":
            stream += tok.encode(text, add_special_tokens=False).ids + [eot_id(tok)]
    ts = packed(paths["val"], 10, DataSpec("t", 320, 0, 10, (), ()), "val")
    assert len(ts) == len(stream) // 11
    flat = ts.seqs.reshape(-1).tolist()
    assert flat == stream[:len(ts) * 11]
    assert torch.equal(ts.labels[:, :-1], ts.images[:, 1:]) and ts.normalize(ts.images[:2]).dtype == torch.int64
    # prompts: 60 / 40, seeded, disjoint
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps(dict(question=f"q{k}", best_answer=f"a{k}")) for k in range(10)))
    a, b = split_prompts(read_prompts(f))
    assert len(a) == 6 and len(b) == 4 and not {p.prompt for p in a} & {p.prompt for p in b}
    f.write_text('{"prompt": 1}')
    from klas.errors import KlasError

    with pytest.raises(KlasError, match="p.jsonl:1"):
        read_prompts(f)


def test_esta_positions_are_depth_matched():
    from klas.stages.s2_scores import depth_matched
    from klas.stages.s3_selection import ESTA

    t = dict(depth_src=4, depth_tgt=6, i=[i for i in range(4) for _ in range(6)], j=list(range(6)) * 4)
    (bk, chosen), = ESTA().choose([t], [(None, None)], None)
    picked = [(i, j) for i, j, c in zip(t["i"], t["j"], chosen) if c]
    assert picked == [(i, depth_matched(i, 4, 6)) for i in range(4) if depth_matched(i, 4, 6) < 5]
    assert picked == [(0, 1), (1, 2), (2, 4)]


def test_lm_family_config_errors(lm_family, tmp_path):
    from klas.errors import KlasError
    from klas.families.user import parse_family

    good = dict(name="x", task="causal-lm", anchors=[dict(name="a", weights=str(lm_family["folders"][0])),
                                                     dict(name="b", weights=str(lm_family["folders"][1]))])
    cfg = parse_family(good, "f.toml", tmp_path)
    assert cfg.num_classes == lm_family["vocab"] and cfg.input_shape == (512,)
    with pytest.raises(KlasError, match=r"f.toml: \[family\] anchors\[1\] \(b\) weights = 'nope'"):
        parse_family(dict(good, anchors=[good["anchors"][0], dict(name="b", weights="nope")]), "f.toml", tmp_path)
    with pytest.raises(KlasError, match="context"):
        parse_family(dict(good, input=dict(context=0)), "f.toml", tmp_path)


def test_lora_wraps_the_decoder_projections(lm_family):
    """The frozen recipe's LoRA goes on every q/k/v/o/gate/up/down projection of the decoder layers after the stitch,
    and starts as the identity update (the logits do not move)."""
    from klas.families._registry import AnchorCfg
    from klas.lm.family import create_lm_anchor
    from klas.stitch import add_lora, merge_lora

    v = create_lm_anchor(AnchorCfg("large", "", {}, weights=str(lm_family["folders"][1])), (24,), pretrained=True)
    x = torch.randint(0, lm_family["vocab"], (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = v(x)
    names = add_lora(v, 1, rank=2, alpha=4.0, generator=torch.Generator().manual_seed(0))
    assert len(names) == 7 * 2 and all(n.startswith(("model.layers.1.", "model.layers.2.")) for n in names)
    with torch.no_grad():
        torch.testing.assert_close(v(x), before, rtol=0, atol=0)
    assert merge_lora(v.model) == 14
