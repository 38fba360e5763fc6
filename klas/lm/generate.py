"""Greedy continuations of prompts and their ROUGE against the references (``rouge-score``, F-measure).

Prompts of equal token length are continued as one batch, without padding (so positions and attention are those of
a single prompt), re-running the whole prefix per new token: no KV cache is needed for a handful of tokens on the
evaluation set (the cached decoder is the export's business)."""
from __future__ import annotations

from functools import lru_cache

import torch

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


@lru_cache(maxsize=8)
def _prompts(family_name: str, data_key: tuple, n: int, reference_tokens: int):
    from klas.config import DataConfig
    from klas.lm.data import eval_prompts

    data = DataConfig(**dict(data_key))
    return tuple(eval_prompts(family_name, data, n=n, reference_tokens=reference_tokens))


@torch.inference_mode()
def greedy(net, prompts: list[list[int]], new_tokens: int, context: int, stop: int | None = None,
           batch: int = 16) -> list[list[int]]:
    """The ``new_tokens`` greedy continuation of every prompt (cut at ``stop``), prompts cut from the left so that
    prompt + continuation fit ``context``."""
    was = net.training
    net.eval()
    keep = max(1, context - new_tokens)
    prompts = [p[-keep:] for p in prompts]
    out: list[list[int] | None] = [None] * len(prompts)
    by_len: dict[int, list[int]] = {}
    for k, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(k)
    for idx_all in by_len.values():
        for s in range(0, len(idx_all), batch):
            idx = idx_all[s:s + batch]
            ids = torch.tensor([prompts[k] for k in idx], dtype=torch.long)
            for _ in range(new_tokens):
                nxt = net(ids)[:, -1].float().argmax(-1, keepdim=True)
                ids = torch.cat([ids, nxt], dim=1)
            for row, k in enumerate(idx):
                cont = ids[row, len(prompts[k]):].tolist()
                out[k] = cont[:cont.index(stop)] if stop is not None and stop in cont else cont
    net.train(was)
    return out  # type: ignore[return-value]


def rouge_scores(predictions: list[str], references: list[str]) -> dict:
    """Mean ROUGE-1/2/L F-measure (fractions) of ``predictions`` against ``references``."""
    from rouge_score import rouge_scorer

    sc = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    tot = dict.fromkeys(ROUGE_TYPES, 0.0)
    for p, r in zip(predictions, references):
        s = sc.score(r, p)
        for k in ROUGE_TYPES:
            tot[k] += s[k].fmeasure
    n = max(len(predictions), 1)
    return {k: round(v / n, 5) for k, v in tot.items()}


def rouge_of(net, ctx, family, cfg) -> dict:
    """``test_rouge1/2/L`` of ``net``'s greedy continuations of the run's evaluation prompts (none: {})."""
    from dataclasses import asdict

    from klas.lm.data import eot_id, family_cfg, family_tokenizer

    if not cfg.generations:
        return {}
    fcfg = family_cfg(family)
    pairs = _prompts(fcfg.name, tuple(sorted(asdict(ctx.data).items())), cfg.generations, cfg.new_tokens)
    if not pairs:
        return {}
    tok = family_tokenizer(fcfg)
    ids = [tok.encode(p.prompt, add_special_tokens=False).ids for p in pairs]
    conts = greedy(net, ids, cfg.new_tokens, int(fcfg.input_shape[0]), stop=eot_id(tok))
    res = rouge_scores([tok.decode(c) for c in conts], [p.reference for p in pairs])
    return {f"test_{k}": v for k, v in res.items()} | dict(test_generations=len(pairs))
