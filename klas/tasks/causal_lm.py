"""Causal language modelling: token ids in, next-token logits out; costs per token at the family's context length.

A sample is one packed sequence of ``T`` tokens (``klas.lm.data.TokenSet``); its targets are the next tokens. The
per-sample *prediction* kept by evaluation is, per token, the target's negative log-likelihood and whether the
argmax was right ([B, T, 2]); a sequence's *quality* is its geometric-mean token likelihood exp(-mean NLL), so the
admission test pairs per-sequence losses; the reported *score* is 100 / perplexity over all tokens of the split
(higher is better, like every klas metric), and the report adds perplexity and next-token accuracy. Probes are
lenses over the vocabulary (``klas.lm.lens``), trained on KL to the anchor's own final distribution.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from klas.tasks import register_task
from klas.tasks.base import Task


class CausalLM(Task):
    name = "causal-lm"
    cost_unit = "token"
    metric = "100/perplexity"
    runtime_entry = "generate"
    datasets = ("python-docs", "text")
    cascades = False  # a per-sequence early exit is not what a decoder deploys; no cascades are offered
    score_plugins = False  # the baseline metrics of the scores stage read pooled image features
    stages = None  # all, export included: ONNX decoders with per-layer KV caches (klas.lm.export)

    # --- family -------------------------------------------------------------------------------------------------
    def build_anchor(self, anchor, input_shape, *, pretrained=False, weights=None, num_classes=None):
        from klas.lm.family import create_lm_anchor

        return create_lm_anchor(anchor, input_shape, pretrained=pretrained, weights=weights)

    def parse_family(self, table, source, base):
        from klas.lm.family import parse_lm_family

        return parse_lm_family(table, source, base)

    def check_family(self, cfg, views, source: str = "") -> None:
        from klas.lm.family import check_shared_tokenizer

        check_shared_tokenizer(views, where=source)

    def anchor_trainer(self):
        from klas.lm.pretrain import LMRecipe, train_lm_family

        return LMRecipe, train_lm_family

    # --- data ---------------------------------------------------------------------------------------------------
    def open_split(self, family, split, data=None, *, root=None, dataset=None, augment=False):
        from klas.lm.data import open_text_split

        return open_text_split(family, split, data, root=root, dataset=dataset)

    def num_outputs(self, family) -> int:
        return getattr(family, "cfg", family).num_classes  # the vocabulary

    # --- probes -------------------------------------------------------------------------------------------------
    def probe_features(self, view, h):
        return h  # every token is read: [B, T, d]

    def new_probes(self, family, train, cfg, seed):
        from klas.lm.lens import new_lenses

        return new_lenses(family, cfg, seed)

    def probes_from_tensors(self, family, view, tensors: dict, where: str):
        from klas.lm.lens import lens_from_tensors

        return lens_from_tensors(view, tensors, where)

    def probe_objective(self, net, logits, feats, targets):
        """Sum over lenses and sequences of the token-mean KL(anchor's final distribution || lens distribution)
        (the tuned lens objective, Belrose et al. 2023)."""
        with torch.no_grad():
            t = torch.log_softmax(net.target(feats).float(), dim=-1)
        lp = torch.log_softmax(logits.float(), dim=-1)
        return (t.exp() * (t - lp)).sum(-1).mean(-1).sum()

    def score_chunks(self, family, nets, x, memory_mb: int):
        """Lens and head logits [depth + 1, rows, V] per anchor, a bounded number of token rows at a time: never the
        whole batch's [layers, tokens, V]."""
        from klas.lm.lens import score_chunks

        return score_chunks(family, nets, x, memory_mb)

    # --- training -----------------------------------------------------------------------------------------------
    def loss(self, logits, targets, *, label_smoothing=0.0, reduction="mean"):
        """Token cross-entropy; ``sum``: the sum over sequences of each sequence's token mean (per-sample semantics,
        as the probes' and the data-parallel scaling expect)."""
        v = logits.shape[-1]
        ce = F.cross_entropy(logits.float().reshape(-1, v), targets.reshape(-1).long(), label_smoothing=label_smoothing,
                             reduction="none").view(targets.shape)
        return ce.mean() if reduction == "mean" else ce.mean(-1).sum()

    def distillation(self, logits, teacher_logits, temperature):
        t = temperature
        v = logits.shape[-1]
        return F.kl_div(F.log_softmax(logits.float().reshape(-1, v) / t, dim=-1),
                        F.log_softmax(teacher_logits.float().reshape(-1, v) / t, dim=-1),
                        reduction="batchmean", log_target=True) * (t * t)

    # --- evaluation ---------------------------------------------------------------------------------------------
    def predict(self, logits, targets=None):
        """Per token (NLL of the target, argmax right) [B, T, 2]; confidence: the mean max probability [B]."""
        if targets is None:
            raise ValueError("causal-lm: a prediction needs the targets (the next tokens)")
        lp = torch.log_softmax(logits.float(), dim=-1)
        nll = -lp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
        top, arg = lp.max(dim=-1)
        return torch.stack([nll, (arg == targets).float()], dim=-1), top.exp().mean(-1)

    def quality(self, prediction, targets):
        return torch.exp(-prediction[..., 0].double().mean(-1))

    def score(self, prediction, targets):
        if len(targets) == 0:
            return 0.0
        return 100.0 * math.exp(-float(prediction[..., 0].double().mean()))

    def report(self, prediction, targets) -> dict:
        if len(targets) == 0:
            return {}
        nll = float(prediction[..., 0].double().mean())
        return dict(perplexity=round(math.exp(nll), 4), next_token_acc=round(100.0 * float(
            prediction[..., 1].double().mean()), 3), tokens=int(prediction[..., 0].numel()))

    def cost_fields(self, net) -> dict:
        from klas.lm.costs import kv_bytes_per_token

        return dict(kv_bytes_per_token=kv_bytes_per_token(net))

    def extra_metrics(self, net, ctx, family, cfg) -> dict:
        """ROUGE-1/2/L (F-measure, ``rouge-score``) of greedy continuations of the test prompts."""
        from klas.lm.generate import rouge_of

        return rouge_of(net, ctx, family, cfg)

    def print_summary(self, ev, run_dir) -> None:
        from klas.lm.summary import print_lm_zoo

        print_lm_zoo(ev, run_dir)

    # --- export and runtime -------------------------------------------------------------------------------------
    TOKENIZER_FILE = "tokenizer.json"

    def _tokenizer_bytes(self, family) -> bytes:
        from klas.lm.data import family_tokenizer

        return family_tokenizer(family).to_str().encode()

    def manifest_fields(self, family) -> dict:
        """The task fields plus what the ``generate`` entry needs: the tokenizer file (hashed) and how to generate
        (end-of-text id as stop and pad token; no BOS, as klas tokenized the training text; the longest context the
        anchors declare)."""
        from klas.lm.data import eot_id, family_tokenizer
        from klas_runtime.manifest import sha256_bytes

        raw = self._tokenizer_bytes(family)
        eot = eot_id(family_tokenizer(family))
        cfg = getattr(family, "cfg", family)
        # NOTE: the anchors' declared position limit where their configs state it (embedded families), else the
        # context the family is measured at; a decoder entry states its own (its two anchors') limit too
        contexts = [int(a.model_args["max_position_embeddings"]) for a in cfg.anchors
                    if "max_position_embeddings" in (getattr(a, "model_args", None) or {})]
        return dict(super().manifest_fields(family),
                    tokenizer=dict(file=self.TOKENIZER_FILE, sha256=sha256_bytes(raw), bytes=len(raw)),
                    generation=dict(eos_token_id=[eot], pad_token_id=eot, bos_token_id=None, add_bos=False,
                                    max_context=min(contexts) if contexts else int(cfg.input_shape[0])))

    def zoo_files(self, family) -> dict[str, bytes]:
        return {self.TOKENIZER_FILE: self._tokenizer_bytes(family)}

    def exporter(self):
        from klas.lm.export import DecoderExporter

        return DecoderExporter()

    def example_inputs(self, family, batch, seed=0):
        cfg = getattr(family, "cfg", family)
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, cfg.num_classes, (batch, *family.input_shape), generator=g)


CAUSAL_LM = register_task(CausalLM())
