"""Text data for causal language models: a corpus of documents -> one tokenization -> packed fixed-length sequences.

* A corpus is a folder of ``.txt`` / ``.rst`` / ``.md`` files (one document each) and ``.jsonl`` files (one document
  per line, its ``text`` field), the Python documentation sources of Debian's ``python3-doc`` (``python-docs``), or a
  Hugging Face ``datasets`` id for online users (``hf-datasets:NAME[:CONFIG]``).
* Documents are split train / val / test by a seeded permutation of the documents (never inside one), tokenized
  ONCE with the family's tokenizer into one int32 token file per split (``KLAS_CACHE_DIR``, default
  ``~/.cache/klas/tokens``, keyed by the corpus listing, the tokenizer and the split), written a few documents at a
  time: memory stays flat in the corpus size. Each document ends with the end-of-text token.
* A split is read as a :class:`TokenSet`: the token file memory-mapped and cut into ``N`` sequences of ``T + 1``
  tokens; inputs are the first ``T`` of each, targets the last ``T`` (next-token prediction). It is what
  ``klas.data.batches`` reads (an ``ImageSet`` whose "images" are token ids).
* Prompt/reference pairs for generation metrics come from a jsonl file (``prompt``/``reference``, or TruthfulQA's
  ``question``/``best_answer``), split 60/40 (seeded) as in the KLAS paper's TruthfulQA protocol; without one, pairs
  are cut from the test documents' paragraphs.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from klas.data.datasets import DataSpec, ImageSet
from klas.errors import KlasError

EOT = "<|endoftext|>"
SPLIT_FRACTIONS = dict(val=0.05, test=0.05)  # of the documents; the rest is train
SPLIT_SEED = 0
TEXT_SUFFIXES = (".txt", ".rst", ".md")
PYTHON_DOCS_GLOBS = ("/usr/share/doc/python3/html/_sources", "/usr/share/doc/python3-doc/html/_sources",
                     "/usr/share/doc/python3.*/html/_sources")
FORMAT = "klas-tokens-v1"


# --- the corpus -----------------------------------------------------------------------------------------------------

def python_docs_root() -> Path:
    """Where Debian's python3-doc put the reStructuredText sources (``make setup`` installs the package)."""
    for pattern in PYTHON_DOCS_GLOBS:
        for p in sorted(glob.glob(pattern)):
            if Path(p).is_dir() and any(Path(p).rglob("*.txt")):
                return Path(p).resolve()
    raise KlasError("python-docs: no /usr/share/doc/python3*/html/_sources; install it with "
                    "`apt-get install python3-doc` (make setup does)")


@dataclass(frozen=True)
class Corpus:
    """The documents of a text dataset: ``files`` (sorted, one document per text file, one per line of a jsonl)."""

    name: str
    root: str
    files: tuple[str, ...]

    def documents(self):
        """(document id, text) in a fixed order; a jsonl line is ``<file>:<line>``."""
        for f in self.files:
            if f.startswith("hf-datasets:"):
                yield from _hf_documents(f)
                continue
            path = Path(self.root) / f
            if path.suffix == ".jsonl":
                for n, rec in jsonl_records(path, "a jsonl document needs a 'text' field"):
                    if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                        raise KlasError(f"{path}:{n + 1}: expected an object with a string 'text' field")
                    yield f"{f}:{n}", rec["text"]
            else:
                yield f, path.read_text(encoding="utf-8", errors="replace")

    def fingerprint(self) -> str:
        """The listing (names, sizes, modification times): a changed corpus is tokenized again."""
        h = hashlib.sha256(self.name.encode())
        for f in self.files:
            p = Path(self.root) / f
            st = p.stat() if p.exists() else None
            h.update(f"{f}\0{st.st_size if st else 0}\0{int(st.st_mtime) if st else 0}\n".encode())
        return h.hexdigest()[:16]

    def sha256(self) -> str:
        """Content hash of every document (the model card records what the anchors were trained on)."""
        h = hashlib.sha256()
        for doc_id, text in self.documents():
            h.update(doc_id.encode() + b"\0" + text.encode("utf-8") + b"\0")
        return h.hexdigest()


def jsonl_records(path: Path, what: str):
    """(line number from 0, decoded record) of every non-blank line of a jsonl file; a line that is not JSON is one
    line naming the file, the line and ``what`` the file should hold."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError:
                raise KlasError(f"{path}:{n + 1}: not a JSON object ({what})") from None


def open_corpus(dataset: str | None, root: str | Path | None) -> Corpus:
    """The corpus of ``[data] dataset`` (python-docs or text) at ``[data] root``; one-line errors."""
    if root is not None and str(root).startswith("hf-datasets:"):
        return Corpus("hf-datasets", str(root), (str(root),))
    if dataset == "python-docs" and root is None:
        base = python_docs_root()
    elif root is None:
        raise KlasError(f"[data] root: the {dataset or 'text'} dataset needs a folder of .txt/.jsonl files "
                        f"(or hf-datasets:NAME for online users)")
    else:
        base = Path(root).expanduser()
    if not base.is_dir():
        raise KlasError(f"[data] root {str(base)!r}: not a directory (expected a folder of .txt/.jsonl documents)")
    files = sorted(str(p.relative_to(base)) for p in base.rglob("*")
                   if p.is_file() and (p.suffix in TEXT_SUFFIXES + (".jsonl",) or p.name.endswith(".rst.txt")))
    if not files:
        raise KlasError(f"[data] root {str(base)!r}: no .txt, .rst, .md or .jsonl files")
    return Corpus(dataset or "text", str(base), tuple(files))


def _hf_documents(spec: str):
    """Documents of a Hugging Face dataset (online users): ``hf-datasets:NAME[:CONFIG]``, its train split's
    ``text`` column."""
    try:
        import datasets
    except ImportError:
        raise KlasError(f"{spec}: reading a hub dataset needs `pip install datasets`") from None
    name, _, config = spec[len("hf-datasets:"):].partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split="train")
    except Exception as e:  # noqa: BLE001 -- offline, unknown id, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise KlasError(f"{spec}: cannot load the dataset ({first})") from None
    for n, rec in enumerate(ds):
        yield f"{name}:{n}", str(rec.get("text", ""))


def split_of_documents(n: int, seed: int = SPLIT_SEED) -> list[str]:
    """The split of each of ``n`` documents: a seeded permutation, the first 5 % val, the next 5 % test (at least one
    each when there are 3 or more documents), the rest train."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = max(1 if n >= 3 else 0, round(SPLIT_FRACTIONS["val"] * n))
    n_test = max(1 if n >= 3 else 0, round(SPLIT_FRACTIONS["test"] * n))
    out = ["train"] * n
    for k in order[:n_val]:
        out[k] = "val"
    for k in order[n_val:n_val + n_test]:
        out[k] = "test"
    return out


# --- the tokenizer ----------------------------------------------------------------------------------------------------

def tokenizer_digest(tokenizer) -> str:
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]


def eot_id(tokenizer) -> int:
    """The end-of-text id: the tokenizer's ``<|endoftext|>`` (klas-trained), else its ``</s>`` / ``<|end_of_text|>``."""
    for tok in (EOT, "<|end_of_text|>", "</s>", "<eos>"):
        i = tokenizer.token_to_id(tok)
        if i is not None:
            return int(i)
    raise KlasError("tokenizer: no end-of-text token (<|endoftext|>, <|end_of_text|>, </s> or <eos>)")


def train_tokenizer(texts, vocab_size: int, path: Path | str):
    """A byte-level BPE tokenizer (``tokenizers``) trained on ``texts``, with ``<|endoftext|>`` as id 0; saved as
    ``tokenizer.json`` at ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    from klas.io import atomic_path

    with atomic_path(path) as tmp:
        tok.save(str(tmp))
    return tok


# --- tokenization, once -------------------------------------------------------------------------------------------

def cache_dir() -> Path:
    return Path(os.environ.get("KLAS_CACHE_DIR") or Path.home() / ".cache" / "klas" / "tokens")


def tokenize_corpus(corpus: Corpus, tokenizer, *, seed: int = SPLIT_SEED, progress: bool = False,
                    extra_train: list[str] | None = None) -> dict[str, Path]:
    """Token files (int32) of the train / val / test documents of ``corpus``, made once per corpus listing,
    tokenizer and split seed and reused; ``extra_train``: more training documents (the 60 % of prompt pairs)."""
    extra = list(extra_train or [])
    key = hashlib.sha256(json.dumps([FORMAT, corpus.name, corpus.root, corpus.fingerprint(), tokenizer_digest(tokenizer),
                                     seed, SPLIT_FRACTIONS, hashlib.sha256("\0".join(extra).encode()).hexdigest()]
                                    ).encode()).hexdigest()[:16]
    folder = cache_dir() / key
    paths = {s: folder / f"{s}.int32" for s in ("train", "val", "test")}
    done = folder / "tokens.json"
    if done.is_file() and all(p.is_file() for p in paths.values()):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    eot = eot_id(tokenizer)
    docs = list(corpus.documents()) if corpus.name == "hf-datasets" else None
    n_docs = len(docs) if docs is not None else _count_documents(corpus)
    which = split_of_documents(n_docs, seed)
    tmp = {s: p.with_suffix(f".int32.tmp{os.getpid()}") for s, p in paths.items()}
    files = {s: open(t, "wb") for s, t in tmp.items()}
    counts = dict(train=0, val=0, test=0)
    docs_per = dict(train=0, val=0, test=0)
    from tqdm import tqdm

    try:
        batch: list[tuple[str, str]] = []

        def flush():
            enc = tokenizer.encode_batch([t for _, t in batch], add_special_tokens=False)
            for (s, _), e in zip(batch, enc):
                ids = np.asarray(e.ids + [eot], dtype=np.int32)
                files[s].write(ids.tobytes())
                counts[s] += len(ids)
                docs_per[s] += 1
            batch.clear()

        it = docs if docs is not None else corpus.documents()
        bar = tqdm(it, total=n_docs, desc=f"[data] tokenizing {corpus.name} once", disable=not progress,
                   mininterval=2)
        for k, (_, text) in enumerate(bar):
            batch.append((which[k], text))
            if len(batch) >= 32:
                flush()
        for text in extra:
            batch.append(("train", text))
        flush()
    finally:
        for f in files.values():
            f.close()
    for s in paths:
        os.replace(tmp[s], paths[s])
    from klas.io import save_json

    save_json(dict(format=FORMAT, corpus=corpus.name, root=corpus.root, documents=docs_per, tokens=counts,
                   tokenizer=tokenizer_digest(tokenizer), seed=seed), done)
    return paths


def _count_documents(corpus: Corpus) -> int:
    n = 0
    for f in corpus.files:
        path = Path(corpus.root) / f
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8", errors="replace") as fh:
                n += sum(1 for line in fh if line.strip())
        else:
            n += 1
    return n


# --- a split as packed sequences -----------------------------------------------------------------------------------

class TokenSet(ImageSet):
    """Packed next-token sequences of one split: ``images`` = inputs int32 [N, T], ``labels`` = targets int32 [N, T]
    (both views of one memory-mapped [N, T + 1] array: nothing is read until a batch is)."""

    train_mode = "none"  # no image augmentation (klas.data.batches)

    def __init__(self, spec: DataSpec, split: str, seqs: torch.Tensor, tokens_file: Path | None = None):
        super().__init__(spec, split, seqs[:, :-1], seqs[:, 1:])
        self.seqs = seqs
        self.tokens_file = tokens_file

    def normalize(self, ids: torch.Tensor) -> torch.Tensor:
        return ids.long()

    def subset(self, n: int | None) -> "TokenSet":
        if n is None or n >= len(self):
            return self
        return TokenSet(self.spec, self.split, self.seqs[:n], self.tokens_file)

    @property
    def context(self) -> int:
        return int(self.seqs.shape[1]) - 1

    @property
    def num_tokens(self) -> int:
        return len(self) * self.context


def packed(path: Path, context: int, spec: DataSpec, split: str) -> TokenSet:
    """The token file ``path`` memory-mapped as ``len // (context + 1)`` sequences of ``context + 1`` tokens."""
    n_tok = path.stat().st_size // 4
    n = n_tok // (context + 1)
    if n == 0:
        raise KlasError(f"{path}: the {split} split has {n_tok} tokens, fewer than one sequence of {context + 1}; "
                        f"give the corpus more text")
    arr = np.memmap(path, dtype=np.int32, mode="r", shape=(n * (context + 1),)).reshape(n, context + 1)
    # NOTE: torch warns about the read-only memmap; nothing writes to it
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        seqs = torch.from_numpy(arr)
    return TokenSet(spec, split, seqs, path)


# --- prompt / reference pairs ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PromptPair:
    prompt: str
    reference: str


def read_prompts(path: Path | str) -> list[PromptPair]:
    """``{"prompt", "reference"}`` (or TruthfulQA's ``{"question", "best_answer"}``) per line of a jsonl file."""
    path = Path(path)
    if not path.is_file():
        raise KlasError(f"[data] prompts {str(path)!r}: no such file (expected jsonl with prompt/reference)")
    out = []
    for n, rec in jsonl_records(path, "expected prompt and reference"):
        p = rec.get("prompt", rec.get("question")) if isinstance(rec, dict) else None
        r = rec.get("reference", rec.get("best_answer")) if isinstance(rec, dict) else None
        if not isinstance(p, str) or not isinstance(r, str):
            raise KlasError(f"{path}:{n + 1}: expected string 'prompt' and 'reference' (or 'question' and "
                            f"'best_answer')")
        out.append(PromptPair(p, r))
    if not out:
        raise KlasError(f"{path}: no prompt/reference pairs")
    return out


def split_prompts(pairs: list[PromptPair], seed: int = SPLIT_SEED) -> tuple[list[PromptPair], list[PromptPair]]:
    """60 % for finetuning, 40 % for the generation metrics (the paper's TruthfulQA protocol), seeded."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    k = round(0.6 * len(pairs))
    return [pairs[i] for i in order[:k]], [pairs[i] for i in order[k:]]


def corpus_prompts(corpus: Corpus, tokenizer, split: str = "test", *, n: int = 64, prompt_tokens: int = 48,
                   reference_tokens: int = 24, seed: int = SPLIT_SEED) -> list[PromptPair]:
    """Pairs cut from the ``split`` documents: a paragraph's first ``prompt_tokens`` tokens as the prompt, the next
    ``reference_tokens`` as the reference; ``n`` paragraphs drawn (seeded) from those long enough."""
    docs = list(corpus.documents()) if corpus.name == "hf-datasets" else None
    n_docs = len(docs) if docs is not None else _count_documents(corpus)
    which = split_of_documents(n_docs, seed)
    cands = []
    for k, (_, text) in enumerate(docs if docs is not None else corpus.documents()):
        if which[k] != split:
            continue
        for para in text.split("\n\n"):
            para = para.strip()
            if len(para) < 300 or para.startswith(("..", "=", "*", "-", ">>>")):
                continue  # directives, headings, lists and code prompts say little about language modelling
            cands.append(para)
    rng = random.Random(seed)
    rng.shuffle(cands)
    out = []
    for para in cands:
        ids = tokenizer.encode(para, add_special_tokens=False).ids
        if len(ids) < prompt_tokens + reference_tokens:
            continue
        out.append(PromptPair(tokenizer.decode(ids[:prompt_tokens]),
                              tokenizer.decode(ids[prompt_tokens:prompt_tokens + reference_tokens])))
        if len(out) >= n:
            break
    return out


# --- a family's text splits ------------------------------------------------------------------------------------------

_TOKENIZERS: dict[str, object] = {}


def family_cfg(family):
    """The ``FamilyCfg`` of a registered name, a built ``Family`` or a ``FamilyCfg``."""
    from klas.families._registry import get_family_cfg

    return get_family_cfg(family) if isinstance(family, str) else getattr(family, "cfg", family)


def family_tokenizer(family):
    """The one tokenizer of a language-model family: ``[family.input] tokenizer`` (a tokenizer.json; relative:
    beside the embedded weights), else the first anchor folder's tokenizer.json, else the first anchor's hub id."""
    from klas.families._registry import _EMBEDDED_WEIGHTS

    cfg = family_cfg(family)
    spec = (cfg.input or {}).get("tokenizer")
    source = None
    if spec:
        p = Path(spec)
        source = str(p if p.is_absolute() else _EMBEDDED_WEIGHTS / p)
    else:
        for a in cfg.anchors:
            if a.weights and (Path(a.weights) / "tokenizer.json").is_file():
                source = str(Path(a.weights) / "tokenizer.json")
                break
        else:
            hub = next((a.weights for a in cfg.anchors if a.weights and not Path(a.weights).exists()), None)
            if hub is None:
                raise KlasError(f"family {cfg.name}: no tokenizer (set [family.input] tokenizer = a tokenizer.json, "
                                f"or give the anchors folders holding one)")
            source = "hub:" + hub.removeprefix("hf:")
    if source not in _TOKENIZERS:
        from tokenizers import Tokenizer

        try:
            _TOKENIZERS[source] = Tokenizer.from_pretrained(source[4:]) if source.startswith("hub:") \
                else Tokenizer.from_file(source)
        except Exception as e:  # noqa: BLE001 -- a missing or broken file, offline
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise KlasError(f"{source}: cannot read the family's tokenizer ({first})") from None
    tok = _TOKENIZERS[source]
    if tok.get_vocab_size() > cfg.num_classes:
        raise KlasError(f"{source}: the tokenizer has {tok.get_vocab_size()} tokens, the anchors' vocabulary "
                        f"{cfg.num_classes}")
    return tok


def open_text_split(family, split: str, data=None, *, root=None, dataset=None) -> TokenSet:
    """Split ``split`` of the run's text, tokenized once with the family's tokenizer, packed at its context length."""
    cfg = family_cfg(family)
    dataset = dataset or (data.dataset if data is not None else None) or cfg.dataset
    root = root if root is not None else (data.root if data is not None else None)
    corpus = open_corpus(dataset, root)
    tok = family_tokenizer(cfg)
    prompts = getattr(data, "prompts", None)
    extra = [p.prompt + " " + p.reference for p in split_prompts(read_prompts(prompts))[0]] if prompts else None
    paths = tokenize_corpus(corpus, tok, extra_train=extra, progress=True)
    context = int(cfg.input_shape[0])
    spec = DataSpec(name=corpus.name, num_classes=cfg.num_classes, in_chans=0, img_size=context, mean=(), std=())
    return packed(paths[split], context, spec, split)


def eval_prompts(family, data=None, *, n: int = 48, reference_tokens: int = 24) -> list[PromptPair]:
    """The prompts whose continuations are scored: 40 % of ``[data] prompts``, else pairs cut from the test
    documents."""
    cfg = family_cfg(family)
    if getattr(data, "prompts", None):
        return split_prompts(read_prompts(data.prompts))[1][:n]
    corpus = open_corpus((data.dataset if data is not None else None) or cfg.dataset,
                         data.root if data is not None else None)
    return corpus_prompts(corpus, family_tokenizer(cfg), "test", n=n, reference_tokens=reference_tokens)
