"""The embedded language-model family: a byte-level BPE tokenizer and three Llama-architecture anchors trained from
scratch on the Python documentation (Debian's python3-doc), with one recipe and a model card.

``klas anchors train pydoc-llama`` trains the tokenizer (when missing) on the train documents, then every anchor with
the same recipe (AdamW, warm-up + cosine, grad norm <= 1, the same seed and data order) through the anchor trainer's
resumable loop (``klas.families.trainer.fit``), and writes ``<anchor>.safetensors`` plus ``pydoc-llama-card.json``
(recipe, corpus sha256, tokenizer sha256, per-epoch history, val/test perplexity).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from klas.contract import overrides
from klas.families._registry import _EMBEDDED_WEIGHTS, get_family_cfg
from klas.families.trainer import Recipe, fit
from klas.io import load_json, save_json, save_tensors, sha256_file
from klas_runtime.machine import machine_info


@dataclass(frozen=True)
@overrides(epochs=2, batch_size=16, lr=1.5e-3, weight_decay=0.1, warmup_epochs=0.1, label_smoothing=0.0,
           train_subset=5000)
class LMRecipe(Recipe):
    """The anchors' recipe: ``batch_size`` sequences of the family's context length per step, ``train_subset`` of
    the packed training sequences (a seeded sample of the documents), ``epochs`` passes."""


def card_path(family: str, out_dir: Path) -> Path:
    return Path(out_dir) / f"{family}-card.json"


def _state_to_save(model) -> dict:
    sd = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)  # the same tensor as the embedding: safetensors stores it once
    return sd


def train_lm_family(family: str, out_dir: Path | None = None, recipe: LMRecipe = LMRecipe(),
                    data_root: Path | None = None, anchors: list[str] | None = None,
                    threads: int | None = None) -> Path:
    """Train the tokenizer (if its file is missing) and the anchors of ``family``; returns the card's path."""
    from klas.config import DataConfig
    from klas.lm.data import (SPLIT_SEED, family_tokenizer, open_corpus, open_text_split, split_of_documents,
                              tokenizer_digest, train_tokenizer)
    from klas.tasks import task_of

    cfg = get_family_cfg(family)
    if not cfg.embedded or not (cfg.input or {}).get("tokenizer"):
        from klas.errors import KlasError

        raise KlasError(f"family {family}: `klas anchors train` trains an embedded family's anchors and tokenizer "
                        f"from scratch; this one's anchors are pretrained models")
    task = task_of(cfg)
    out_dir = Path(out_dir) if out_dir else _EMBEDDED_WEIGHTS
    if threads:
        torch.set_num_threads(threads)
    data = DataConfig(dataset=cfg.dataset, root=str(data_root) if data_root else None)
    corpus = open_corpus(cfg.dataset, data.root)
    tok_file = _EMBEDDED_WEIGHTS / cfg.input["tokenizer"]
    if not tok_file.is_file():
        docs = list(corpus.documents())
        which = split_of_documents(len(docs), SPLIT_SEED)
        print(f"[anchors] training the tokenizer ({cfg.num_classes} tokens) on {sum(w == 'train' for w in which)} "
              f"train documents", flush=True)
        train_tokenizer((t for (_, t), w in zip(docs, which) if w == "train"), cfg.num_classes, tok_file)
    tok = family_tokenizer(cfg)
    train = open_text_split(cfg, "train", data).subset(recipe.train_subset)
    val = open_text_split(cfg, "val", data).subset(256)
    test = open_text_split(cfg, "test", data)
    path = card_path(family, out_dir)
    card = load_json(path) if path.is_file() else {}
    entries = {e["name"]: e for e in card.get("anchors", [])}
    corpus_sha = card.get("corpus_sha256") or corpus.sha256()
    for a in cfg.anchors:
        if anchors and a.name not in anchors:
            continue
        torch.manual_seed(recipe.seed)
        view = task.build_anchor(a, cfg.input_shape, pretrained=False)
        state = fit(view, train, val, recipe, out_dir / f"{a.name}.ckpt", a.name, resume_tag=asdict(recipe),
                    task=task, eval_batch=32, log="anchors")
        from klas.metrics import network_score

        view.eval()
        test_score = network_score(task, view, test, 32)
        weights = out_dir / a.embedded_file
        save_tensors(_state_to_save(view.model), weights, metadata={"family": family, "anchor": a.name})
        (out_dir / f"{a.name}.ckpt").unlink(missing_ok=True)
        entries[a.name] = dict(
            name=a.name, arch=a.arch, model_args=a.model_args, params=view.num_params,
            flops_per_token=view.flops, context=int(cfg.input_shape[0]), kv_bytes_per_token=view.kv_bytes_per_token(),
            val_perplexity=round(100.0 / state["history"][-1]["val_acc"], 3),
            test_perplexity=round(100.0 / test_score, 3),
            history=[dict(h, val_perplexity=round(100.0 / h["val_acc"], 3)) for h in state["history"]],
            train_wall_s=round(state["wall_s"], 1), file=weights.name, sha256=sha256_file(weights))
        print(f"[anchors] {a.name}: test perplexity {entries[a.name]['test_perplexity']:.2f}", flush=True)
        card = dict(family=family, dataset=cfg.dataset, corpus_root=corpus.root, corpus_sha256=corpus_sha,
                    documents=len(corpus.files), tokenizer=dict(file=tok_file.name, sha256=sha256_file(tok_file),
                                                                digest=tokenizer_digest(tok), vocab=tok.get_vocab_size()),
                    recipe=asdict(recipe), tokens_seen=recipe.epochs * len(train) * train.context,
                    command=f"klas anchors train {family}", machine=machine_info(),
                    anchors=[entries[x.name] for x in cfg.anchors if x.name in entries])
        save_json(card, path)
    return path
