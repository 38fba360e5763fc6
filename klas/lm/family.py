"""Building causal-LM anchors (``CausalLMView``) from an ``AnchorCfg``, and checking that anchors share a tokenizer.

Where an anchor's weights come from (``create_lm_anchor``):

* ``embedded_file``: a safetensors file under ``klas/families/weights/``; ``arch`` is a HF ``model_type`` ("llama")
  and ``model_args`` that config's kwargs; loaded strictly into the model built from them.
* ``weights`` = a local folder as ``save_pretrained`` writes it (config.json + *.safetensors): ``from_pretrained``.
* ``weights`` = a local weights file: loaded strictly into the model built from ``arch`` / ``model_args``.
* ``weights`` = a hub id (``hf:org/name``, ``hf-hub:org/name``, or ``org/name`` that is no existing path):
  ``from_pretrained`` from the Hugging Face hub (online users).

As for timm anchors, weights are loaded when ``pretrained`` (or a ``weights`` override is given); otherwise the
architecture is built with random weights (tests, training) from the same config.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from klas.errors import KlasError
from klas.families import _registry
from klas.families._registry import AnchorCfg, load_weights_file
from klas.lm.view import CausalLMView

_HUB_PREFIXES = ("hf:", "hf-hub:")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_WEIGHT_EXTS = (".safetensors", ".pth", ".pt", ".bin")


def _first_line(e: BaseException, limit: int = 200) -> str:
    lines = [x for x in str(e).splitlines() if x.strip()]
    return f"{type(e).__name__}: {(lines[0] if lines else '')[:limit]}"


def hub_id(weights: str | None) -> str | None:
    """The repo id of a hub reference (``hf:org/name``, ``hf-hub:org/name``, or a bare ``org/name`` that is not an
    existing local path), else None."""
    if not weights:
        return None
    for p in _HUB_PREFIXES:
        if weights.startswith(p):
            return weights[len(p):]
    if not Path(weights).expanduser().exists() and _REPO_ID.fullmatch(weights):
        return weights
    return None


def _override(anchor: AnchorCfg, weights) -> Path | None:
    """A ``weights`` override for this anchor: a dict name -> folder/file, or a directory holding ``<name>/`` folders
    (or ``<name>.safetensors`` files); None when the dict does not name the anchor (its own source then applies)."""
    if weights is None:
        return None
    if isinstance(weights, dict):
        return Path(weights[anchor.name]).expanduser() if anchor.name in weights else None
    root = Path(weights).expanduser()
    if not root.is_dir():
        raise KlasError(f"{root}: pass a directory of per-anchor folders (<name>/config.json) or a dict name->path "
                        f"for an LM family")
    if (root / anchor.name).is_dir():
        return root / anchor.name
    for ext in _WEIGHT_EXTS:
        if (root / f"{anchor.name}{ext}").is_file():
            return root / f"{anchor.name}{ext}"
    raise KlasError(f"{root}: no weights for anchor {anchor.name!r} (expected a folder {anchor.name}/ with "
                    f"config.json, or {anchor.name}.safetensors)")


def _config_from_args(anchor: AnchorCfg):
    """The HF config named by ``arch`` (a model_type) and ``model_args``; one-line errors naming the anchor."""
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(anchor.arch, **dict(anchor.model_args))
    except Exception as e:  # noqa: BLE001 -- unknown model_type, bad kwargs
        raise KlasError(f"anchor {anchor.name!r}: cannot build a Hugging Face config for model_type "
                        f"{anchor.arch!r} with {anchor.model_args or 'default args'} ({_first_line(e)})") from None


def _from_config(anchor: AnchorCfg, config):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_config(config)
    except Exception as e:  # noqa: BLE001 -- e.g. a model_type without a causal-LM class
        raise KlasError(f"anchor {anchor.name!r}: cannot build a causal LM from its {config.model_type!r} config "
                        f"({_first_line(e)})") from None


def _from_pretrained(anchor: AnchorCfg, source: str, where: str):
    from transformers import AutoModelForCausalLM

    kw = {}
    if "attn_implementation" in anchor.model_args:  # the one model_arg that applies to a saved/hub model
        kw["attn_implementation"] = anchor.model_args["attn_implementation"]
    try:
        return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kw)
    except Exception as e:  # noqa: BLE001 -- offline, missing files, unknown architecture
        raise KlasError(f"anchor {anchor.name!r}: cannot load {source} {where} ({_first_line(e)})") from None


def _load_file_strict(model, path: Path, anchor: AnchorCfg) -> None:
    """Load a state-dict file into ``model`` strictly (``klas.families._registry.load_weights_file``);
    ``lm_head.weight`` may be absent when the config ties it to the embeddings, and must equal them when present."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))

    def untied(sd) -> list[str]:
        if tied and "lm_head.weight" in sd and "model.embed_tokens.weight" in sd \
                and not torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"]):
            return ["lm_head.weight differs from model.embed_tokens.weight but the config ties them"]
        return []

    load_weights_file(model, path, anchor, optional=frozenset({"lm_head.weight"} if tied else ()), problems=untied)


def _tokenizer_beside(path: Path | None) -> Path | None:
    """The tokenizer.json of a weights folder, or beside a weights file (``<stem>.tokenizer.json`` first)."""
    if path is None:
        return None
    candidates = [path / "tokenizer.json"] if path.is_dir() else \
        [path.with_name(f"{path.stem}.tokenizer.json"), path.with_name("tokenizer.json")]
    return next((c for c in candidates if c.is_file()), None)


def _cached_hub_tokenizer(repo: str) -> Path | None:
    """tokenizer.json of a hub repo when it is in the local HF cache (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
        found = try_to_load_from_cache(repo, "tokenizer.json")
    except Exception:  # noqa: BLE001 -- no cache, bad id: simply no tokenizer known
        return None
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def create_lm_anchor(anchor: AnchorCfg, input_shape, pretrained: bool = False, weights=None) -> CausalLMView:
    """Build one causal-LM anchor as a ``CausalLMView`` measured at ``input_shape = (T,)`` (eval mode, float32).

    ``pretrained`` loads the anchor's weights (embedded file, local folder/file, hub id); ``weights`` (a dict
    name -> folder/file, or a directory of ``<name>/`` folders) overrides them. Without either, random weights.
    Sets ``view.weights_file`` (the file or folder loaded, or None) and ``view.tokenizer_file`` (or None)."""
    override = _override(anchor, weights)
    own = anchor.weights
    repo = None if override is not None else hub_id(own)
    local: Path | None = override
    if local is None and own and repo is None:
        local = Path(own).expanduser()
    if local is None and repo is None and anchor.embedded_file:
        local = _registry._EMBEDDED_WEIGHTS / anchor.embedded_file  # looked up at call time (tests redirect it)
    load = pretrained or override is not None

    if local is not None and load and not local.exists():
        if override is None and own is None and anchor.embedded_file:
            raise KlasError(f"{local}: embedded weights missing (train them with `klas anchors train {anchor.name}`)")
        raise KlasError(f"{local}: weights not found for anchor {anchor.name!r}")
    if local is not None and local.is_dir() and not (local / "config.json").is_file():
        raise KlasError(f"{local}: not a Hugging Face model folder for anchor {anchor.name!r} (no config.json; "
                        f"expected what save_pretrained writes)")

    weights_file = None
    if local is not None and local.is_dir():
        if load:
            model, weights_file = _from_pretrained(anchor, str(local), "(a local model folder)"), local
        else:
            from transformers import AutoConfig
            try:
                config = AutoConfig.from_pretrained(str(local))
            except Exception as e:  # noqa: BLE001
                raise KlasError(f"{local}/config.json: unreadable config for anchor {anchor.name!r} "
                                f"({_first_line(e)})") from None
            model = _from_config(anchor, config)
    elif repo is not None:
        if load:
            model = _from_pretrained(anchor, repo, "from the Hugging Face hub")
        else:
            from transformers import AutoConfig
            try:
                config = AutoConfig.from_pretrained(repo)
            except Exception as e:  # noqa: BLE001 -- offline without a cached config
                raise KlasError(f"anchor {anchor.name!r}: cannot fetch the config of {repo} from the Hugging Face "
                                f"hub ({_first_line(e)})") from None
            model = _from_config(anchor, config)
    else:
        if load and local is None:
            raise KlasError(f"anchor {anchor.name!r}: no weights to load (give it an embedded file, or weights = a "
                            f"model folder, a weights file or a hub id)")
        model = _from_config(anchor, _config_from_args(anchor))
        if load:
            _load_file_strict(model, local, anchor)
            weights_file = local

    model = model.float().eval()
    from klas.families.blockview import block_view
    view = block_view(model, anchor.name, tuple(input_shape))  # a one-line KlasError for a non-Llama-like model
    view.weights_file = weights_file
    view.tokenizer_file = _cached_hub_tokenizer(repo) if repo is not None else _tokenizer_beside(local)
    return view


def load_tokenizer(path):
    """A ``tokenizers.Tokenizer`` from a tokenizer.json; a one-line KlasError when missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise KlasError(f"{path}: tokenizer file not found")
    try:
        from tokenizers import Tokenizer
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 -- any decoding failure is the file's fault
        raise KlasError(f"{path}: unreadable tokenizer ({_first_line(e, 160)})") from None


def _vocab_difference(a: dict, b: dict) -> str:
    """What differs between two token -> id maps, briefly."""
    if len(a) != len(b):
        return f"{len(a)} vs {len(b)} tokens"
    only = sorted(set(a) - set(b))
    if only:
        return f"{len(only)} tokens of the first not in the second (e.g. {only[0]!r})"
    moved = sorted(t for t in a if a[t] != b[t])
    return f"{len(moved)} tokens with different ids (e.g. {moved[0]!r}: {a[moved[0]]} vs {b[moved[0]]})"


def check_shared_tokenizer(views, where: str = "") -> Path | None:
    """Stitched LMs must read the same token ids: every anchor's ``vocab_size`` must be equal, and every anchor that
    has a tokenizer file the same vocabulary. One-line KlasError naming the two anchors otherwise; returns the
    tokenizer file of the first anchor that has one (None if none has)."""
    prefix = f"{where}: " if where else ""
    views = list(views)
    for v in views[1:]:
        if v.vocab_size != views[0].vocab_size:
            raise KlasError(f"{prefix}anchors {views[0].name!r} and {v.name!r} have different vocabulary sizes "
                            f"({views[0].vocab_size} vs {v.vocab_size}); stitched LMs must share one tokenizer")
    ref = ref_vocab = None
    for v in views:
        path = getattr(v, "tokenizer_file", None)
        if path is None:
            continue
        vocab = load_tokenizer(path).get_vocab()
        if ref is None:
            ref, ref_vocab = v, vocab
        elif vocab != ref_vocab:
            raise KlasError(f"{prefix}anchors {ref.name!r} and {v.name!r} have different tokenizers "
                            f"({ref.tokenizer_file} vs {path}: {_vocab_difference(ref_vocab, vocab)}); stitched LMs "
                            f"must share one tokenizer")
    return None if ref is None else Path(ref.tokenizer_file)


# --- a language-model family from the config -------------------------------------------------------------------------

LM_FAMILY_KEYS = ("name", "task", "dataset", "num_classes", "description", "input", "anchors")
LM_INPUT_KEYS = ("context", "tokenizer")
LM_ANCHOR_KEYS = ("name", "arch", "model_args", "weights")


def parse_lm_family(table: dict, source: str, base: Path):
    """A causal-lm ``[family]`` table: anchors are model folders (what ``save_pretrained`` writes) or hub ids;
    ``[family.input] context`` the sequence length costs are stated at (and data is packed to), ``tokenizer`` a
    tokenizer.json (default: the first anchor folder's)."""
    from klas.families._registry import FamilyCfg
    from klas.families.user import _keys_and_name
    from klas.tasks import get_task

    where = f"{source}: [family]"
    name = _keys_and_name(table, LM_FAMILY_KEYS, where, "name")
    datasets = get_task("causal-lm").datasets
    dataset = table.get("dataset", "text")
    if dataset not in datasets:
        raise KlasError(f"{where} dataset = {dataset!r}: expected one of {', '.join(datasets)}")
    description = table.get("description", "")
    if not isinstance(description, str):
        raise KlasError(f"{where} description: expected a string")
    inp = table.get("input", {})
    if not isinstance(inp, dict) or any(k not in LM_INPUT_KEYS for k in inp):
        bad = next((k for k in inp if k not in LM_INPUT_KEYS), None) if isinstance(inp, dict) else None
        raise KlasError(f"{source}: [family.input] {bad or ''}: expected a table with keys "
                        f"{', '.join(LM_INPUT_KEYS)}".replace("]  :", "]:"))
    context = inp.get("context", 512)
    if not isinstance(context, int) or isinstance(context, bool) or not 2 <= context <= 1 << 20:
        raise KlasError(f"{source}: [family.input] context = {context!r}: expected an integer >= 2")
    out_inp = dict(context=context)
    if "tokenizer" in inp:
        tok = Path(str(inp["tokenizer"])).expanduser()
        tok = (tok if tok.is_absolute() else Path(base) / tok).resolve()
        if not tok.is_file():
            raise KlasError(f"{source}: [family.input] tokenizer = {inp['tokenizer']!r}: file not found ({tok})")
        out_inp["tokenizer"] = str(tok)
    raw = table.get("anchors")
    if not isinstance(raw, list) or len(raw) < 2:
        raise KlasError(f"{where} anchors: expected at least two [[family.anchors]] tables")
    anchors = []
    for k, t in enumerate(raw):
        aw = f"{where} anchors[{k}]"
        if not isinstance(t, dict):
            raise KlasError(f"{aw}: expected a table (name, weights)")
        an = _keys_and_name(t, LM_ANCHOR_KEYS, aw, "anchor name")
        aw = f"{aw} ({an})"
        w = t.get("weights")
        if not isinstance(w, str) or not w:
            raise KlasError(f"{aw} weights: expected a model folder (config.json + safetensors) or a hub id "
                            f"(org/name)")
        if hub_id(w) is None:
            p = Path(w).expanduser()
            p = (p if p.is_absolute() else Path(base) / p).resolve()
            if not (p / "config.json").is_file():
                raise KlasError(f"{aw} weights = {w!r}: not a model folder with config.json ({p})")
            w = str(p)
        args = t.get("model_args", {})
        if not isinstance(args, dict):
            raise KlasError(f"{aw} model_args: expected a table")
        anchors.append(AnchorCfg(name=an, arch=str(t.get("arch", "")), model_args=dict(args), weights=w))
    names = [a.name for a in anchors]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise KlasError(f"{where} anchors: name {dup!r} is used twice")
    vocab = table.get("num_classes") or _vocab_size(anchors[0], where)
    return FamilyCfg(name=name, anchors=tuple(anchors), input_shape=(int(context),), dataset=dataset,
                     num_classes=int(vocab), description=description or f"from {source}", input=out_inp,
                     source=source, task="causal-lm")


def _vocab_size(anchor: AnchorCfg, where: str) -> int:
    from transformers import AutoConfig

    src = hub_id(anchor.weights) or anchor.weights
    try:
        return int(AutoConfig.from_pretrained(src).vocab_size)
    except Exception as e:  # noqa: BLE001 -- offline hub id, broken config
        raise KlasError(f"{where} anchors ({anchor.name}): cannot read its config's vocab_size from {src} "
                        f"({_first_line(e)})") from None
