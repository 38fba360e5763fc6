"""The ``generate`` runtime entry: text generation with a decoder zoo -- tokenizer, KV-cache loop, sampling,
streaming -- in numpy over an onnxruntime session, with no torch.

A decoder zoo (manifest schema version 5, ``runtime_entry: "generate"``) ships ONNX decoders that take
``input_ids`` / ``attention_mask`` / ``position_ids`` and the past keys and values of every layer, and return the
logits and the presents (``klas_runtime.decoder_schema.DECODER_MODEL``; each layer has its own KV heads and head width,
as a stitched model mixes two anchors' layers), plus one ``tokenizers`` JSON file hashed like the models.

``Decoder`` is the loop over token ids: left padding for a batch of prompts of different lengths (so every row's
next token sits in the last column), a prefill over the whole prompt with empty pasts, then one token per step
feeding the presents back as pasts; rows stop at a stop id or after ``max_new_tokens`` and leave the batch.
``sample`` turns logits into ids (greedy, temperature, top-k, top-p) in float64. ``DecoderChoice`` is what
``Zoo.pick`` / ``Zoo.open`` return for a decoder zoo: text in, text out (``generate``) or text pieces as tokens
arrive (``stream``). ``klas_runtime.entries`` registers this module's pieces as the ``generate`` entry; the
``tokenizers`` package is imported only when text is encoded or decoded.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from klas_runtime.choice import ModelChoice
from klas_runtime.decoder_schema import kv_names
from klas_runtime.errors import ZooError, first_line
from klas_runtime.manifest import MANIFEST, data_path, read_zoo_file

MAX_PROMPT_BYTES = 1 << 20  # a prompt file larger than this is refused (a prompt, not a corpus)
DESCRIBE_TOKENS = 16  # new tokens of the greedy continuation ``klas-runtime predict`` prints per prompt file


# --- tokenizer -------------------------------------------------------------------------------------------------------

def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ZooError("the tokenizers package is not installed: pip install tokenizers (a decoder zoo's "
                       "tokenizer is a tokenizers JSON file)") from None
    return tokenizers


def load_tokenizer(zoo_dir: Path | str, manifest: dict):
    """The zoo's ``tokenizers.Tokenizer``, from bytes whose size and sha256 were checked against the manifest just
    now (one ZooError line when the file is missing, altered or not a tokenizers JSON file)."""
    data = read_zoo_file(zoo_dir, manifest["tokenizer"], "tokenizer")
    where = data_path(zoo_dir, manifest["tokenizer"]["file"])
    tokenizers = _tokenizers()
    try:
        return tokenizers.Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # tokenizers' own exception type, or a UnicodeDecodeError
        raise ZooError(f"{where}: not a tokenizers JSON file ({first_line(e)})") from None


def encode_prompt(tokenizer, generation: dict, prompt: str, name: str = "prompt") -> list[int]:
    """The prompt's token ids (the bos id first when the manifest's ``add_bos``); an empty one is refused."""
    if not isinstance(prompt, str):
        raise ZooError(f"{name}: the prompt must be text (str), got {type(prompt).__name__}")
    ids = list(tokenizer.encode(prompt, add_special_tokens=False).ids)
    if not ids:
        raise ZooError(f"{name}: the prompt {prompt[:40]!r} is empty (it has no tokens)")
    if generation.get("add_bos"):
        ids = [int(generation["bos_token_id"])] + ids
    return ids


# --- sampling --------------------------------------------------------------------------------------------------------

def check_sampling(temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None) -> None:
    """One ZooError line naming the flag when a sampling setting is out of range."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0 \
            or not np.isfinite(temperature):
        raise ZooError(f"--temperature {temperature!r}: expected a number >= 0 (0: greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ZooError(f"--top-k {top_k!r}: expected an integer >= 1 (1: greedy)")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ZooError(f"--top-p {top_p!r}: expected a probability in (0, 1] (1: no nucleus cut)")


def sample_probs(logits: np.ndarray, temperature: float, top_k: int | None = None,
                 top_p: float | None = None) -> np.ndarray:
    """The distribution ``sample`` draws from (float64 [B, V]): softmax(logits / temperature), cut to the ``top_k``
    largest and then to the smallest nucleus whose cumulative probability reaches ``top_p`` (at least one token),
    renormalized. Ties are ordered by token id (a stable sort), so top-k 1 is the greedy argmax."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    order = np.argsort(-z, axis=1, kind="stable")
    zs = np.take_along_axis(z, order, axis=1)
    p = np.exp(zs - zs[:, :1])
    if top_k is not None:
        p[:, int(top_k):] = 0.0
    p /= p.sum(axis=1, keepdims=True)
    if top_p is not None and top_p < 1:
        before = np.cumsum(p, axis=1) - p  # probability of the tokens ranked above each one
        p[before >= top_p] = 0.0  # keeps the first token always (before = 0 < top_p)
        p /= p.sum(axis=1, keepdims=True)
    out = np.zeros_like(p)
    np.put_along_axis(out, order, p, axis=1)
    return out


def sample(logits: np.ndarray, rng: np.random.Generator, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None) -> np.ndarray:
    """Next token ids [B] (int64) from logits [B, V]: the argmax when ``temperature`` is 0 (greedy; ``top_k`` and
    ``top_p`` change nothing then), else one draw per row from ``sample_probs`` with ``rng``."""
    check_sampling(temperature, top_k, top_p)
    z = np.asarray(logits)
    if z.ndim != 2 or z.shape[1] < 1:
        raise ZooError(f"sample: logits of shape {tuple(z.shape)}, expected [batch, vocab]")
    if temperature == 0:
        return z.argmax(axis=1).astype(np.int64)
    p = sample_probs(z, temperature, top_k, top_p)
    u = rng.random(len(p))[:, None]
    ids = (np.cumsum(p, axis=1) < u).sum(axis=1)  # inverse CDF: the first id whose cumulative reaches u
    return np.minimum(ids, p.shape[1] - 1).astype(np.int64)


def check_context(prompt_tokens: int, max_new_tokens: int, max_context: int | None, what: str = "prompt") -> None:
    """One ZooError line when a prompt of ``prompt_tokens`` plus ``max_new_tokens`` exceeds ``max_context`` (the
    positions the models were trained for)."""
    if max_context is not None and prompt_tokens + max_new_tokens > max_context:
        raise ZooError(f"{what} of {prompt_tokens} tokens + --max-new-tokens {max_new_tokens} = "
                       f"{prompt_tokens + max_new_tokens} is longer than the context the models were trained for "
                       f"(generation.max_context {max_context}); shorten the prompt or ask for fewer new tokens")


# --- the KV-cache loop -----------------------------------------------------------------------------------------------

@dataclass
class DecodeState:
    """The live rows of a generation: their attention mask [b, T], per-layer (key, value) pasts, the last logits
    [b, V] and which prompt each row is (``rows``)."""

    mask: np.ndarray
    past: list
    logits: np.ndarray
    rows: np.ndarray

    def keep(self, live: np.ndarray) -> None:
        """Drop the rows that stopped (``live`` False) from the batch."""
        self.mask, self.logits, self.rows = self.mask[live], self.logits[live], self.rows[live]
        self.past = [(k[live], v[live]) for k, v in self.past]


class Decoder:
    """Token ids in, token ids out, through one onnxruntime session (or anything with ``run(names, feeds)``) of a
    decoder entry. ``generation`` is the manifest's block: ``pad_token_id`` fills the left padding, ``max_context``
    bounds prompt + new tokens, ``eos_token_id`` are the default stop ids (None: pad 0, no bound, no stop ids)."""

    def __init__(self, session, entry: dict, generation: dict | None = None):
        self.session, self.entry = session, entry
        gen = generation or {}
        self.pad = int(gen.get("pad_token_id", 0))
        self.max_context = gen.get("max_context")
        self.eos = tuple(gen.get("eos_token_id", ()))
        self.vocab = int(entry["output"]["vocab_size"])
        spec, dec = entry["input"], entry["decoder"]
        self.ids_name, self.mask_name, self.pos_name = spec["name"], spec["attention_mask"], spec["position_ids"]
        self.layers = [(int(layer["kv_heads"]), int(layer["head_dim"])) for layer in dec["layers"]]
        self.kv = [kv_names(dec, i) for i in range(len(self.layers))]
        self.outputs = [entry["output"]["name"]] + [n for names in self.kv
                                                    for n in (names["present_key"], names["present_value"])]

    @property
    def name(self) -> str:
        return self.entry["name"]

    def check_prompts(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        """The prompts as lists of ints, or one ZooError line: an empty batch or prompt, a non-integer or
        out-of-vocabulary id, or prompt + ``max_new_tokens`` beyond ``max_context``."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
            raise ZooError(f"--max-new-tokens {max_new_tokens!r}: expected an integer >= 1")
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise ZooError(f"{self.name}: expected a non-empty list of prompts (lists of token ids)")
        out = []
        for k, p in enumerate(prompts):
            if isinstance(p, (str, bytes)) or not isinstance(p, (Sequence, np.ndarray)) or len(p) == 0:
                raise ZooError(f"{self.name}: prompt {k} is empty or not a list of token ids")
            bad = [t for t in p if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer))]
            if bad:
                raise ZooError(f"{self.name}: prompt {k} holds {bad[0]!r}, not an integer token id")
            ids = [int(t) for t in p]
            off = [t for t in ids if not 0 <= t < self.vocab]
            if off:
                raise ZooError(f"{self.name}: prompt {k} holds token id {off[0]}, outside the vocabulary "
                               f"[0, {self.vocab})")
            check_context(len(ids), max_new_tokens, self.max_context, f"{self.name}: prompt {k}")
            out.append(ids)
        return out

    def _run(self, ids: np.ndarray, mask: np.ndarray, past: list) -> tuple[np.ndarray, list]:
        """One forward pass: logits of the last position [b, V] and the presents."""
        pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, -ids.shape[1]:]
        feeds = {self.ids_name: ids, self.mask_name: mask, self.pos_name: np.ascontiguousarray(pos)}
        for names, (k, v) in zip(self.kv, past):
            feeds[names["past_key"]], feeds[names["past_value"]] = k, v
        outs = self.session.run(self.outputs, feeds)
        logits = np.asarray(outs[0])
        if logits.ndim != 3 or logits.shape[:2] != ids.shape or logits.shape[2] != self.vocab:
            raise ZooError(f"{self.name}: the model returned logits of shape {tuple(logits.shape)}, expected "
                           f"[{ids.shape[0]}, {ids.shape[1]}, {self.vocab}] (output.vocab_size in {MANIFEST})")
        last = logits[:, -1, :]
        if not np.isfinite(last).all():
            raise ZooError(f"{self.name}: the model returned non-finite logits (NaN or inf); the decoder's "
                           f"masking of padded positions or its weights are broken -- re-export the zoo")
        return last, [(outs[1 + 2 * i], outs[2 + 2 * i]) for i in range(len(self.layers))]

    def prefill(self, prompts: list[list[int]]) -> DecodeState:
        """The whole (left-padded) batch of prompts in one pass, from empty pasts [B, kv_heads_i, 0, head_dim_i]."""
        width = max(len(p) for p in prompts)
        ids = np.full((len(prompts), width), self.pad, dtype=np.int64)
        mask = np.zeros((len(prompts), width), dtype=np.int64)
        for b, p in enumerate(prompts):
            ids[b, width - len(p):], mask[b, width - len(p):] = p, 1
        past = [(np.zeros((len(prompts), h, 0, d), np.float32), np.zeros((len(prompts), h, 0, d), np.float32))
                for h, d in self.layers]
        logits, past = self._run(ids, mask, past)
        return DecodeState(mask, past, logits, np.arange(len(prompts)))

    def advance(self, state: DecodeState, tokens: np.ndarray) -> None:
        """Feed one new token per live row: the presents become the pasts, the mask grows by a 1."""
        state.mask = np.concatenate([state.mask, np.ones((len(state.mask), 1), np.int64)], axis=1)
        state.logits, state.past = self._run(np.asarray(tokens, np.int64).reshape(-1, 1), state.mask, state.past)

    def steps(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
              top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
              stop_ids: Sequence[int] | None = None) -> Iterator[list[tuple[int, int]]]:
        """Generate lazily: per step the (prompt index, new token id) pairs of the rows still going. A row ends at
        a stop id (``stop_ids``; None: the manifest's ``eos_token_id``), which is not yielded, or after
        ``max_new_tokens``; the generator ends when every row has (closing it early stops the loop)."""
        prompts = self.check_prompts(prompts, max_new_tokens)
        check_sampling(temperature, top_k, top_p)
        stops = np.array(sorted(set(int(t) for t in (self.eos if stop_ids is None else stop_ids))), np.int64)
        rng = np.random.default_rng(seed)
        state = self.prefill(prompts)
        for step in range(max_new_tokens):
            tokens = sample(state.logits, rng, temperature, top_k, top_p)
            live = ~np.isin(tokens, stops)
            yield [(int(r), int(t)) for r, t, ok in zip(state.rows, tokens, live) if ok]
            if step == max_new_tokens - 1 or not live.any():
                return
            if not live.all():
                state.keep(live)
                tokens = tokens[live]
            self.advance(state, tokens)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stop_ids: Sequence[int] | None = None,
                 on_token: Callable[[int, int], object] | None = None) -> list[list[int]]:
        """The new token ids of every prompt (without the prompt and without the stop id); ``on_token(prompt index,
        token id)`` is called as each one arrives."""
        out: list[list[int]] = [[] for _ in prompts]
        for pairs in self.steps(prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                seed=seed, stop_ids=stop_ids):
            for row, token in pairs:
                out[row].append(token)
                if on_token is not None:
                    on_token(row, token)
        return out


# --- text ------------------------------------------------------------------------------------------------------------

def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the earliest occurrence of any stop string (not included), and whether one occurred."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


def _held_back(text: str, stop: Sequence[str]) -> int:
    """How many trailing characters of ``text`` a stream must hold back: an incomplete UTF-8 sequence (decoded as
    U+FFFD) and any suffix that may be the start of a stop string."""
    n = len(text) - len(text.rstrip("\ufffd"))
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                n = max(n, k)
                break
    return n


def _check_stop(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    if any(not isinstance(s, str) or s == "" for s in stop):
        raise ZooError(f"--stop {list(stop)!r}: expected non-empty strings")
    return stop


@dataclass
class DecoderChoice(ModelChoice):
    """The picked decoder: what every choice has (``ModelChoice``: ``entry``, ``session``, ``reason``, ``provider``,
    ``latency_ms``, ``latency_record``, ``name``, ``kind``, ``files``, ``members``, ``input``), plus the zoo's
    tokenizer (loaded, hash-checked, on first use) and generation settings; ``generate`` / ``stream`` take and give
    text."""

    zoo_dir: Path | None = None
    manifest: dict | None = field(default=None, repr=False)
    _tokenizer: object = field(default=None, repr=False)
    engine: object = field(default=None, repr=False)  # a Decoder-like engine set by klas_runtime.genai.use_engine

    @property
    def generation(self) -> dict:
        return (self.manifest or {}).get("generation", {})

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if self.zoo_dir is None or self.manifest is None:
                raise ZooError(f"{self.name}: opened without its zoo; no tokenizer (use Zoo(...).open or pick)")
            self._tokenizer = load_tokenizer(self.zoo_dir, self.manifest)
        return self._tokenizer

    @property
    def engine_name(self) -> str:
        return getattr(self.engine, "ENGINE", "numpy")

    @property
    def decoder(self) -> Decoder:
        if self.engine is not None:
            return self.engine
        if self.session is None:
            raise ZooError(f"{self.name}: picked without a session (with_session=False); nothing to run")
        return Decoder(self.session, self.entry, self.generation)

    def encode(self, prompt: str) -> list[int]:
        """The prompt's token ids (``encode_prompt``)."""
        return encode_prompt(self.tokenizer, self.generation, prompt, self.name)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def generate_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64, **kw) -> list[list[int]]:
        """``Decoder.generate`` on token ids (``temperature``, ``top_k``, ``top_p``, ``seed``, ``stop_ids``,
        ``on_token``)."""
        return self.decoder.generate(prompts, max_new_tokens, **kw)

    def generate(self, prompt: str, max_new_tokens: int = 64, *, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stop: Sequence[str] | str | None = None, stop_ids: Sequence[int] | None = None) -> str:
        """The continuation of ``prompt`` as text, cut before the first ``stop`` string."""
        stop = _check_stop(stop)
        ids = self.decoder.generate([self.encode(prompt)], max_new_tokens, temperature=temperature, top_k=top_k,
                                    top_p=top_p, seed=seed, stop_ids=stop_ids)[0]
        return cut_at_stop(self.decode(ids), stop)[0]

    def stream(self, prompt: str, max_new_tokens: int = 64, *, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, seed: int | None = None, stop: Sequence[str] | str | None = None,
               stop_ids: Sequence[int] | None = None) -> Iterator[str]:
        """The continuation as text pieces while tokens arrive; joined, they are ``generate``'s text. Each step
        decodes the whole continuation so far and yields what is new, holding back an incomplete UTF-8 sequence
        and a possible start of a stop string; generation ends at the first stop string."""
        stop = _check_stop(stop)
        steps = self.decoder.steps([self.encode(prompt)], max_new_tokens, temperature=temperature, top_k=top_k,
                                   top_p=top_p, seed=seed, stop_ids=stop_ids)
        ids: list[int] = []
        sent = 0
        try:
            for pairs in steps:
                ids += [t for _, t in pairs]
                text, hit = cut_at_stop(self.decode(ids), stop)
                if hit:
                    if len(text) > sent:
                        yield text[sent:]
                    return
                safe = len(text) - _held_back(text, stop)
                if safe > sent:
                    yield text[sent:safe]
                    sent = safe
            text = cut_at_stop(self.decode(ids), stop)[0]
            if len(text) > sent:
                yield text[sent:]
        finally:
            steps.close()


# --- the entry's hooks (klas_runtime.entries) --------------------------------------------------------------------------

def load_prompt(path: Path | str, spec: dict | None = None) -> str:
    """A prompt from a UTF-8 text file (at most ``MAX_PROMPT_BYTES``), for ``klas-runtime predict ZOO prompt.txt``."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise ZooError(f"{path}: not a regular file (expected a UTF-8 text file holding a prompt)")
        if size > MAX_PROMPT_BYTES:
            raise ZooError(f"{path}: {size} bytes is larger than a prompt may be ({MAX_PROMPT_BYTES} bytes)")
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ZooError(f"{path}: prompt file not found") from None
    except UnicodeDecodeError as e:
        raise ZooError(f"{path}: not UTF-8 text (byte {e.start}); a prompt file must be UTF-8") from None
    except OSError as e:
        raise ZooError(f"{path}: cannot read the prompt file ({e.strerror or e})") from None


def describe(choice: DecoderChoice, prompt: str) -> str:
    """A short greedy continuation of ``prompt`` on one line (JSON-quoted, so newlines show as \\n)."""
    ids = choice.encode(prompt)
    n = DESCRIBE_TOKENS
    limit = choice.generation.get("max_context")
    if limit is not None:
        n = max(1, min(n, limit - len(ids)))
    new = choice.decoder.generate([ids], n)[0]
    return f"{json.dumps(choice.decode(new), ensure_ascii=False)} ({len(new)} new tokens, greedy)"


def context(zoo_dir: Path | str, manifest: dict) -> dict:
    """What a choice of this zoo needs beyond its entry: the zoo (for the tokenizer and the generation block)."""
    return dict(zoo_dir=Path(zoo_dir), manifest=manifest)


def _dims(value) -> list:
    return list(value.shape) if value.shape is not None else []


def check_model(session, entry: dict, where: str) -> None:
    """What ``verify_zoo`` asks of a decoder file: exactly the manifest's inputs (token ids, mask, positions, every
    layer's past key and value) with dynamic batch / sequence dims and the layer's KV heads and head width fixed,
    the logits and presents among the outputs, and a prefill of 3 tokens plus one decode step giving presents of
    [1, kv_heads_i, 3 then 4, head_dim_i] and logits over ``vocab_size``."""
    dec, spec, vocab = entry["decoder"], entry["input"], entry["output"]["vocab_size"]
    layers = [(layer["kv_heads"], layer["head_dim"]) for layer in dec["layers"]]
    want = {spec["name"]: ("tensor(int64)", [None, None]), spec["attention_mask"]: ("tensor(int64)", [None, None]),
            spec["position_ids"]: ("tensor(int64)", [None, None])}
    for i, (h, d) in enumerate(layers):
        names = kv_names(dec, i)
        want[names["past_key"]] = want[names["past_value"]] = ("tensor(float)", [None, h, None, d])
    got = {i.name: i for i in session.get_inputs()}
    if set(got) != set(want):
        extra, missing = sorted(set(got) - set(want)), sorted(set(want) - set(got))
        raise ZooError(f"{where}: model inputs do not match {MANIFEST}" + (f"; missing {', '.join(missing)}"
                       if missing else "") + (f"; unexpected {', '.join(extra)}" if extra else ""))
    for name, (dtype, shape) in want.items():
        dims = _dims(got[name])
        ok = got[name].type == dtype and len(dims) == len(shape) and all(
            (not isinstance(g, int)) if w is None else g == w for g, w in zip(dims, shape))
        if not ok:
            text = ", ".join("dynamic" if w is None else str(w) for w in shape)
            raise ZooError(f"{where}: input {name} is {got[name].type}{dims}, {MANIFEST} says {dtype}[{text}] "
                           f"(batch and sequence dims must be dynamic, KV heads and head width as the layer's)")
    outs = [o.name for o in session.get_outputs()]
    missing = [n for n in Decoder(session, entry).outputs if n not in outs]
    if missing:
        raise ZooError(f"{where}: no output {missing[0]!r} (the file has {', '.join(outs)})")
    decoder = Decoder(session, entry)
    try:
        state = decoder.prefill([[0, min(1, vocab - 1), 0]])
        sizes = [3]
        decoder.advance(state, np.zeros(1, np.int64))
        sizes.append(4)
    except ZooError as e:
        raise ZooError(f"{where}: {e}") from None
    except Exception as e:  # onnxruntime's own errors
        raise ZooError(f"{where}: does not run a prefill and a decode step ({first_line(e)})") from None
    for i, ((k, v), (h, d)) in enumerate(zip(state.past, layers)):
        for what, a in (("key", k), ("value", v)):
            if tuple(a.shape) != (1, h, sizes[-1], d):
                raise ZooError(f"{where}: layer {i} present {what} has shape {tuple(a.shape)} after 4 tokens, "
                               f"{MANIFEST} says [1, kv_heads {h}, 4, head_dim {d}]")


def check_zoo(zoo_dir: Path | str, manifest: dict) -> list[str]:
    """The zoo-level problems of a decoder zoo: its tokenizer file matches its sha256, loads as a tokenizers JSON
    file, and has no more ids than the models' vocabulary."""
    try:
        tok = load_tokenizer(zoo_dir, manifest)
    except ZooError as e:
        if "tokenizers package is not installed" in str(e):
            raise  # a problem of this host, not of the zoo
        return [str(e)]
    where = data_path(zoo_dir, manifest["tokenizer"]["file"])
    problems = []
    for m in manifest["models"]:
        if tok.get_vocab_size() > m["output"]["vocab_size"]:
            problems.append(f"{where}: the tokenizer has {tok.get_vocab_size()} ids, more than the vocabulary of "
                            f"{m['name']!r} (vocab_size {m['output']['vocab_size']})")
    return problems


VERIFIED = ("every file (the tokenizer too) matches its sha256; every decoder loads as ONNX, agrees with the "
            "manifest, takes and returns each layer's cache with its KV heads and head width, and runs a prefill "
            "and a decode step; the tokenizer loads")
