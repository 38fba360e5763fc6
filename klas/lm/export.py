"""Language-model zoo files: every member as an ONNX decoder with per-layer KV caches (``klas.lm.decoder``), checked
against float64 PyTorch on real test text, its perplexity measured by onnxruntime, timed per token, and weight-only
int8 / int4 variants (onnxruntime's ``MatMulNBits``) kept only where they pay on this machine.

The export of one member (``DecoderExporter.export``, the causal-LM task's exporter):

1. ``torch.onnx.export(dynamo=True)`` of ``CachedDecoder(net)`` with every axis symbolic (batch, sequence, past
   sequence); the symbols are renamed to what they mean (``batch``, ``sequence``, ``past_sequence``, ...).
2. ``onnx.checker`` (full check), then parity on real prompts (prefixes of test sequences): prefill logits of the
   float32 onnxruntime graph against a float64 copy of the same decoder (relative max difference within
   ``export.atol``), and ``export.greedy_steps`` greedy decode steps through the runtime's own KV-cache loop
   (``klas_runtime.generate``) against float64 PyTorch recomputing the whole prefix per step (fraction of equal
   tokens >= ``export.min_agreement``).
3. The perplexity of the graph itself on the evaluation's test sequences (``onnx_test_perplexity``), the figure the
   variants are compared with.
4. Latency per output token at batch 1 and 8 with time to first token over a sweep of prompt lengths, and peak
   memory (``klas_runtime.profile``).
5. Variants (``export.precisions``: int8 / int4 weight-only, fp16): each measured like its parent and kept only if
   its val perplexity rose by at most ``export.max_perplexity_increase`` (relative; decided on as many val sequences
   as the test figures use, test perplexity reported beside) and it is faster per token (p90,
   batch 1) or needs less peak memory than its parent on this machine; otherwise listed under ``rejected`` with the
   figures.
"""
from __future__ import annotations

import copy
import json
import math
import re

import numpy as np
import torch

from klas.errors import KlasError
from klas.export.graph import finish_dynamo, quiet
from klas.export.member import ExportJob, Member, check_untouched, config_entry, file_name
from klas.lm.decoder import ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS, CachedDecoder, positions
from klas_runtime.manifest import METADATA_KEY, embedded_entry, sha256_bytes

EXAMPLE = dict(batch=3, sequence=4, past=7)  # distinct sizes, none 0 or 1: torch.export keeps each axis symbolic
PROMPT_TOKENS = 64  # prompt length of the parity prompts (cut to leave room for the greedy steps)
PPL_BATCH = 8
LM_PRECISIONS = ("fp16", "int8", "int4")
WEIGHT_BITS = {"int8": 8, "int4": 4}
BLOCK_SIZE = 32  # MatMulNBits quantization block along K: the smallest the CPU kernels serve, best accuracy


# --- the graph ---------------------------------------------------------------------------------------------------

def export_decoder(dec: CachedDecoder, opset: int):
    """``dec`` as an in-memory ONNX model, every axis symbolic and named, weights inside, no debug metadata."""
    Dim = torch.export.Dim
    b, t, p = EXAMPLE["batch"], EXAMPLE["sequence"], EXAMPLE["past"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, dec.vocab_size, (b, t), generator=g)
    mask = torch.ones(b, p + t, dtype=torch.long)
    args = (ids, mask, positions(mask, t), *dec.empty_past(b, p, generator=g))
    # NOTE: Dim.DYNAMIC, not named Dims: the mask's length is past + sequence, a relation named Dims cannot state,
    # and HF's kernels add a harmless guard (sequence != total) that named Dims would reject
    dyn = ({0: Dim.DYNAMIC, 1: Dim.DYNAMIC},) * 3 + (tuple({0: Dim.DYNAMIC, 2: Dim.DYNAMIC} for _ in args[3:]),)
    with quiet():
        program = torch.onnx.export(dec.eval(), args, dynamo=True, opset_version=opset,
                                    input_names=dec.input_names(), output_names=dec.output_names(),
                                    dynamic_shapes=dyn, external_data=False, optimize=True, verbose=False)
    model = finish_dynamo(program.model_proto)
    _name_axes(model)
    return model


def _name_axes(model) -> None:
    """Rename the exporter's shape symbols (s10, s70 + s89, ...) after what they are: batch, sequence,
    past_sequence; every past tensor's length is the same past_sequence, the mask's past_sequence + sequence."""
    names = {}
    ins = {v.name: v for v in model.graph.input}
    dims = lambda v: v.type.tensor_type.shape.dim  # noqa: E731
    ids = dims(ins[INPUT_IDS])
    names[ids[0].dim_param], names[ids[1].dim_param] = "batch", "sequence"
    for v in model.graph.input:
        if v.name.startswith("past_key_values."):
            names[dims(v)[0].dim_param] = "batch"
            names[dims(v)[2].dim_param] = "past_sequence"
    total = dims(ins[ATTENTION_MASK])[1].dim_param
    names[total] = "past_sequence + sequence"
    pattern = re.compile(r"\bs\d+\b")
    for v in (*model.graph.input, *model.graph.output):
        for d in dims(v):
            if d.dim_param:
                d.dim_param = names.get(d.dim_param) or pattern.sub(lambda m: names.get(m.group(0), m.group(0)),
                                                                    d.dim_param)
                if d.dim_param in ("past_sequence + sequence", "sequence + past_sequence"):
                    d.dim_param = "past_sequence + sequence"


# --- measurements ------------------------------------------------------------------------------------------------

def _feeds(dec_entry: dict, ids: np.ndarray, past_len: int = 0) -> dict:
    b, t = ids.shape
    mask = np.ones((b, past_len + t), dtype=np.int64)
    feeds = {INPUT_IDS: ids.astype(np.int64), ATTENTION_MASK: mask,
             POSITION_IDS: np.broadcast_to(np.arange(past_len, past_len + t, dtype=np.int64), (b, t)).copy()}
    d = dec_entry["decoder"]
    for i, layer in enumerate(d["layers"]):
        shape = (b, layer["kv_heads"], past_len, layer["head_dim"])
        feeds[d["past_key"].format(i=i)] = np.zeros(shape, np.float32)
        feeds[d["past_value"].format(i=i)] = np.zeros(shape, np.float32)
    return feeds


def onnx_nll(session, entry: dict, seqs: torch.Tensor, batch: int = PPL_BATCH) -> np.ndarray:
    """Per-sequence mean next-token NLL (float64) of the graph on packed sequences [N, T + 1], prefill only."""
    out = []
    for s in range(0, len(seqs), batch):
        chunk = seqs[s:s + batch].long().numpy()
        logits = session.run([LOGITS], _feeds(entry, chunk[:, :-1]))[0].astype(np.float64)
        z = logits - logits.max(-1, keepdims=True)
        lp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        nll = -np.take_along_axis(lp, chunk[:, 1:, None], axis=-1)[..., 0]
        out.append(nll.mean(-1))
    return np.concatenate(out) if out else np.zeros(0)


def _probe(test, n: int = 4) -> np.ndarray:
    """The inputs of the first ``n`` test sequences: the prefill a variant's logits are compared with its parent's
    on."""
    return test.seqs[:n, :-1].long().numpy()


def perplexity(nll: np.ndarray) -> float:
    return float(math.exp(float(np.mean(nll)))) if len(nll) else float("nan")


@torch.no_grad()
def torch_greedy(net64, prompts: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy continuation [N, steps] by float64 PyTorch, the whole prefix re-run per step (no cache)."""
    ids = prompts.long()
    for _ in range(steps):
        ids = torch.cat([ids, net64(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[:, prompts.shape[1]:]


def check_decoder_parity(raw: bytes, entry: dict, dec: CachedDecoder, net, test, options, name: str,
                         generation: dict | None = None) -> tuple[dict, dict]:
    """Prefill logits and greedy decoding of the graph against float64 PyTorch on real prompts (prefixes of the
    first ``options.parity_prompts`` test sequences); raises past the tolerances. Returns the manifest's
    ``parity`` and the greedy run (prompts, onnxruntime tokens) its variants are compared with."""
    from klas_runtime.generate import Decoder
    from klas_runtime.session import open_session

    n = min(options.parity_prompts, len(test))
    if n < 1:
        raise KlasError(f"{name}: the test split is empty: no prompts for the ONNX parity check")
    steps = options.greedy_steps
    plen = max(1, min(PROMPT_TOKENS, test.context - steps))
    prompts = test.seqs[:n, :plen].long()
    session = open_session(raw, "cpu")
    got = session.run([LOGITS], _feeds(entry, prompts.numpy()))[0]
    dec64 = copy.deepcopy(dec).double().eval()
    with torch.no_grad():
        mask = torch.ones(n, plen, dtype=torch.long)
        want = dec64(prompts, mask, positions(mask, plen), *dec64.empty_past(n, 0, dtype=torch.float64))[0].numpy()
    diff = float(np.abs(got.astype(np.float64) - want).max())
    rel = diff / max(1.0, float(np.abs(want).max()))
    runtime = Decoder(session, entry, {**(generation or {}), "eos_token_id": []})  # no stop: every step compared
    ort_tokens = np.array(runtime.generate(prompts.tolist(), steps, temperature=0.0, stop_ids=()))
    net64 = copy.deepcopy(net).double().eval()
    ref_tokens = torch_greedy(net64, prompts, steps).numpy()
    match = float((ort_tokens == ref_tokens).mean()) if ort_tokens.shape == ref_tokens.shape else 0.0
    first_diff = [int(np.argmax(a != b)) for a, b in zip(ort_tokens, ref_tokens) if (a != b).any()] \
        if ort_tokens.shape == ref_tokens.shape else []
    result = dict(prompts=n, prompt_tokens=plen, max_abs_diff=diff, relative_diff=rel, atol=options.atol,
                  greedy_steps=steps, greedy_match=match, min_agreement=options.min_agreement,
                  reference="pytorch float64 (prefill: the same cached decoder; greedy: the network re-run on the "
                            "whole prefix per step), onnxruntime CPU float32 through klas_runtime's KV-cache loop")
    if first_diff:
        result["greedy_first_divergence"] = min(first_diff)
    if not (rel <= options.atol and match >= options.min_agreement):
        raise KlasError(f"{name}: ONNX decoder parity failed on {n} test prompts of {plen} tokens: relative max "
                        f"|logit diff| {rel:.3g} (tolerance {options.atol:g}), greedy tokens equal {match:.4f} of "
                        f"{steps} steps (need {options.min_agreement:g}); not exported")
    return result, dict(prompts=prompts.tolist(), tokens=ort_tokens, generation=generation, session=session)


def _profile(raw: bytes, entry: dict, options, generation: dict) -> list[dict]:
    """Latency records at ``export.batch`` and 8 (ms per output token, time to first token over prompt lengths),
    the first with the peak memory measured in a fresh process."""
    from klas_runtime.decoder_profile import generation_latency_record

    return [generation_latency_record(raw, entry, options.provider, options.threads, batch, generation=generation,
                                      new_tokens=options.decode_tokens, warmup=min(options.warmup, 3),
                                      runs=max(1, min(options.runs, options.decode_runs)),
                                      memory=batch == options.batch)
            for batch in dict.fromkeys((options.batch, 8))]


# --- the exporter ------------------------------------------------------------------------------------------------

def _stamp(model, entry: dict, header: dict, doc: str) -> bytes:
    import onnx

    del model.metadata_props[:]
    model.metadata_props.add(key=METADATA_KEY, value=json.dumps(embedded_entry(entry, header)))
    model.doc_string = doc
    onnx.checker.check_model(model, full_check=True)
    raw = model.SerializeToString()
    entry.update(sha256=sha256_bytes(raw), bytes=len(raw))
    return raw


def _p90(entry: dict, batch: int) -> float | None:
    recs = [r for r in entry.get("latency", []) if r["batch"] == batch]
    return min(r["p90_ms"] for r in recs) if recs else None


def _memory(entry: dict) -> float | None:
    vals = [r["peak_memory_mb"] for r in entry.get("latency", []) if "peak_memory_mb" in r]
    return min(vals) if vals else None


class DecoderExporter:
    """The causal-LM task's exporter: ``export(job, member) -> (entries, rejected)``, the float32 decoder first."""

    def export(self, job: ExportJob, member: Member) -> tuple[list[dict], list[dict]]:
        import onnx

        options, header, config = job.options, job.header, member.config
        net = member.network()
        dec = CachedDecoder(net).eval()
        test = job.test.subset(job.evaluated) if job.evaluated else job.test
        row = member.row or {}
        entry = dict(name=member.name or config.key, file=file_name(config, member.name), sha256="0" * 64,
                     bytes=0, precision="fp32", config=config_entry(config, net),
                     params=sum(p.numel() for p in dec.parameters()), flops=int(net.flops),
                     flops_context=int(job.family.input_shape[0]),
                     origin="untouched" if member.untouched is not None else (
                         "finetuned" if config.is_anchor else "stitched"),
                     kv_bytes_per_token=int(job.task.cost_fields(net)["kv_bytes_per_token"]))
        if member.untouched is not None:
            entry["weights"] = check_untouched(member.untouched)
        try:
            model = export_decoder(dec, options.opset)
        except Exception as e:  # noqa: BLE001 -- torch.export / onnxscript failures: one line, the model named
            from klas.export.graph import _one_line

            raise KlasError(f"{config.key}: the ONNX decoder export failed ({_one_line(e)})") from None
        entry["exporter"] = dict(exporter="dynamo")
        onnx.checker.check_model(model, full_check=True)
        entry.update(input=dict(name=INPUT_IDS, kind="decoder", dtype="int64", shape=["batch", "sequence"],
                                attention_mask=ATTENTION_MASK, position_ids=POSITION_IDS),
                     output=dict(name=LOGITS, vocab_size=dec.vocab_size),
                     decoder=dict(layers=dec.layer_shapes, past_key="past_key_values.{i}.key",
                                  past_value="past_key_values.{i}.value", present_key="present.{i}.key",
                                  present_value="present.{i}.value", kv_dtype="float32",
                                  max_context=min(int(v.config.max_position_embeddings) for v in (net.src, net.tgt))),
                     opset=options.opset)
        raw = model.SerializeToString()
        entry["parity"], greedy = check_decoder_parity(raw, entry, dec, net, test, options, config.key,
                                                       header.get("generation"))
        # what every variant is compared with, computed once on the parent's session: perplexity, greedy run, logits
        reference = dict(greedy, nll=onnx_nll(greedy["session"], entry, test.seqs),
                         logits=greedy["session"].run([LOGITS], _feeds(entry, _probe(test)))[0])
        nll = reference["nll"]
        if row.get("val_acc") is not None:
            entry.update(val_acc=float(row["val_acc"]), val_perplexity=round(100.0 / float(row["val_acc"]), 4))
        if row.get("test_acc") is not None:
            entry.update(test_acc=float(row["test_acc"]), test_acc_source="evaluation stage (PyTorch): 100 / test "
                         "perplexity", test_perplexity=round(100.0 / float(row["test_acc"]), 4))
        else:
            entry.update(test_acc=100.0 / perplexity(nll), test_perplexity=round(perplexity(nll), 4),
                         test_acc_source=f"onnxruntime on {len(test)} {test.spec.name} test sequences")
        entry.update(onnx_test_perplexity=round(perplexity(nll), 4), latency=[])
        raw = _stamp(model, entry, header, f"klas {header['family']} zoo decoder {config.key}")
        if options.profile:
            entry["latency"] = _profile(raw, entry, options, header.get("generation") or {})
        job.stage(entry["file"], raw)
        if job.val is None:
            return [entry], []
        # NOTE: whether a variant stays is decided on val sequences (as many as the test figures use); test reports
        val = job.val.subset(len(test))
        reference["val_nll"] = onnx_nll(greedy["session"], entry, val.seqs)
        made, refused = [], []
        for precision in self.precisions(options.precisions):
            v, vraw, why = self.variant(entry, raw, reference, precision, test, header, options, val)
            if why is None:
                job.stage(v["file"], vraw)
                made.append(v)
            else:
                refused.append(why)
        return [entry, *made], refused

    @staticmethod
    def precisions(text: str | None) -> tuple[str, ...]:
        from klas.export.variants import parse_precisions

        return parse_precisions(text, LM_PRECISIONS, "language-model decoders")

    def variant(self, parent: dict, parent_raw: bytes, reference: dict, precision: str, test, header,
                options, val) -> tuple[dict, bytes, dict | None]:
        """One variant: (entry, bytes, None) when kept, else (entry, bytes, the rejected record); ``reference``:
        the parent's perplexity, greedy run and probe logits (``export``)."""
        import onnx

        from klas_runtime.session import open_session

        model = onnx.load_from_string(parent_raw)
        del model.metadata_props[:]
        if precision == "fp16":
            from klas.export.variants import to_fp16

            out = to_fp16(model)
            method = "float16 weights and activations, float32 inputs/outputs (onnxruntime.transformers.float16)"
        else:
            out = weight_only(model, WEIGHT_BITS[precision])
            method = (f"onnxruntime MatMulNBits weight-only {WEIGHT_BITS[precision]}-bit, symmetric, block "
                      f"{BLOCK_SIZE}, every MatMul with a constant weight; activations and the embedding float32")
        name = f"{parent['name']}.{precision}"
        entry = dict(name=name, file=parent["file"][:-len(".onnx")] + f".{precision}.onnx", sha256="0" * 64,
                     bytes=0, precision=precision, parent=parent["name"],
                     **{k: parent[k] for k in ("config", "params", "flops", "flops_context", "origin",
                                               "kv_bytes_per_token", "input", "output", "decoder", "opset")})
        vraw = out.SerializeToString()
        session = open_session(vraw, "cpu")
        nll = onnx_nll(session, parent, test.seqs)
        ppl, parent_ppl = perplexity(nll), perplexity(reference["nll"])
        increase = ppl / parent_ppl - 1.0
        val_increase = perplexity(onnx_nll(session, parent, val.seqs)) / perplexity(reference["val_nll"]) - 1.0
        n = len(test)
        # NOTE: the zoo's figures are the evaluation's (PyTorch) for the parent; the variant's test metric is the
        # parent's scaled by the ratio both graphs measured on the same test sequences
        entry.update(test_acc=parent["test_acc"] * parent_ppl / ppl, test_perplexity=round(
            parent["test_perplexity"] * ppl / parent_ppl, 4), onnx_test_perplexity=round(ppl, 4),
            test_acc_source=f"the parent's test metric x its onnxruntime perplexity / this variant's, both on {n} "
                            f"{test.spec.name} test sequences")
        logits_p, greedy = reference["logits"], reference
        logits_v = session.run([LOGITS], _feeds(parent, _probe(test)))[0]
        from klas_runtime.generate import Decoder

        steps = greedy["tokens"].shape[1]
        mine = np.array(Decoder(session, parent, {**(greedy["generation"] or {}), "eos_token_id": []}).generate(
            greedy["prompts"], steps, temperature=0.0, stop_ids=()))
        entry["parity"] = dict(prompts=len(greedy["prompts"]), max_abs_diff=float(np.abs(logits_p - logits_v).max()),
                               top1_agreement=float((logits_p.argmax(-1) == logits_v.argmax(-1)).mean()),
                               greedy_steps=steps, greedy_match=float((mine == greedy["tokens"]).mean()),
                               reference=f"onnxruntime CPU: this {precision} decoder vs its float32 parent "
                                         f"{parent['name']!r} (prefill logits of {min(4, n)} test sequences; greedy "
                                         f"tokens after the parity prompts)")
        entry["variant"] = dict(method=method, parent_test_perplexity=parent["onnx_test_perplexity"],
                                perplexity_increase=round(increase, 6), val_perplexity_increase=round(val_increase, 6),
                                val_sequences=len(val), max_perplexity_increase=options.max_perplexity_increase)
        entry["latency"] = []
        vraw = _stamp(out, entry, header, f"klas {header['family']} zoo decoder {name} ({precision} variant of "
                                          f"{parent['name']})")
        if options.profile:
            entry["latency"] = _profile(vraw, entry, options, header.get("generation") or {})
        keep, reason = self.judge(entry, parent, val_increase, options)
        entry["variant"]["kept_because"] = reason
        if keep:
            return entry, vraw, None
        return entry, vraw, dict(name=name, parent=parent["name"], precision=precision, reason=reason,
                                 perplexity_increase=round(increase, 6), val_perplexity_increase=round(val_increase, 6),
                                 bytes=len(vraw))

    @staticmethod
    def judge(entry: dict, parent: dict, increase: float, options) -> tuple[bool, str]:
        """Kept only within the perplexity margin and faster per token (p90, batch 1) or lighter in peak memory
        than the parent on this machine."""
        margin = options.max_perplexity_increase
        if increase > margin:
            return False, (f"val perplexity {increase:+.2%} against its float32 parent, more than "
                           f"export.max_perplexity_increase = {margin:g}")
        if not options.profile:
            return True, f"val perplexity {increase:+.2%} (within {margin:g}); not profiled (export.profile = false)"
        lat, plat = _p90(entry, options.batch), _p90(parent, options.batch)
        mem, pmem = _memory(entry), _memory(parent)
        faster = lat is not None and plat is not None and lat < plat
        lighter = mem is not None and pmem is not None and mem < pmem
        figures = (f"p90 {lat:.3g} vs {plat:.3g} ms/token at batch {options.batch}, peak memory "
                   f"{mem if mem is not None else float('nan'):.1f} vs {pmem if pmem is not None else float('nan'):.1f}"
                   f" MB, val perplexity {increase:+.2%}")
        if faster or lighter:
            return True, ("faster" if faster else "") + (" and " if faster and lighter else "") + \
                ("lighter" if lighter else "") + f" than its float32 parent on this machine: {figures}"
        return False, f"neither faster nor lighter than its float32 parent on this machine: {figures}"


def weight_only(model, bits: int):
    """Weight-only quantization of every MatMul with a constant weight (onnxruntime ``MatMulNBits``)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from klas.export.variants import _quiet

    fresh = copy.deepcopy(model)
    with _quiet(), quiet():
        q = MatMulNBitsQuantizer(fresh, bits=bits, block_size=BLOCK_SIZE, is_symmetric=True)
        q.process()
    return q.model.model
