"""Deployment runtime: pick the most accurate zoo model that fits a budget, and run it -- numpy + onnxruntime only.

A deployment host gets a zoo folder (ONNX files + ``manifest.json``) and a budget: FLOPs per image, milliseconds
on its execution provider, a minimum accuracy. ``Zoo.pick`` answers with the best model that fits and an
``onnxruntime.InferenceSession`` for it, or a one-line error naming the cheapest model when nothing fits. The
manifest and every file hash are checked on load; this module never imports torch (deployment hosts lack it).
``verify_zoo`` lists every problem of a zoo (hash, ONNX validity, embedded metadata, input/output names).

Cascades (two models and a max-softmax threshold) are candidates like models: ``pick`` may answer with one, and
its ``CascadeChoice`` is used exactly like a model's ``Choice`` (``predict``, ``run``, ``input``, ``classes``).
What a choice is and runs comes from the zoo's runtime entry (``klas_runtime.entries``; ``classify`` for image
classification, ``klas_runtime.classify``); picking by FLOPs, latency and accuracy is the same for every entry.
"""
from __future__ import annotations

from pathlib import Path

from klas_runtime.budget import STATS, _precisions, check_budget, format_count, parse_count
from klas_runtime.classify import CascadeChoice, Choice, check_input, check_signature, softmax
from klas_runtime.entries import RuntimeEntry, make_choice, runtime_entry
from klas_runtime.errors import ZooError
from klas_runtime.manifest import (MANIFEST, PRECISIONS, check_embedded, is_cascade, load_manifest,
                                   make_zoo_hint, read_manifest, read_model_bytes)
from klas_runtime.manifest import precision as precision_of
from klas_runtime.preprocess import MAX_IMAGE_PIXELS, load_image, open_checked_image
from klas_runtime.session import device_label, open_model, provider_name, short_provider
from klas_runtime.variant_review import review

# The API this module has always offered (``from klas_runtime.runtime import Zoo, load_image``): what a choice
# is and how an image becomes its input now live in klas_runtime.classify and klas_runtime.preprocess.
__all__ = ["MAX_IMAGE_PIXELS", "CascadeChoice", "Choice", "Zoo", "check_input", "format_count", "load_image",
           "open_checked_image", "parse_count", "softmax", "verify_zoo"]

class Zoo:
    """A zoo folder: the validated manifest, hash-checked model files, budget queries.

    ``entries`` are all candidates in manifest order (models and cascades), ``models`` the model entries (one ONNX
    file each), ``cascades`` the cascade entries (two of those models and a threshold)."""

    def __init__(self, path: Path | str, verify: bool = True):
        self.path = Path(path)
        self.manifest = load_manifest(self.path, verify_files=verify)

    @property
    def runtime(self) -> RuntimeEntry:
        """The runtime entry that serves this zoo (its manifest's ``runtime_entry``; ``classify`` when absent);
        one ZooError line when this runtime has no such entry."""
        return runtime_entry(self.manifest, self.path)

    @property
    def entries(self) -> list[dict]:
        return self.manifest["models"]

    @property
    def models(self) -> list[dict]:
        return [e for e in self.entries if not is_cascade(e)]

    @property
    def cascades(self) -> list[dict]:
        return [e for e in self.entries if is_cascade(e)]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, name: str) -> dict:
        for m in self.entries:
            if m["name"] == name:
                return m
        raise ZooError(f"{self.path}: no model {name!r}; models: {', '.join(m['name'] for m in self.entries)}")

    def session(self, entry: dict | str, device: str | None = None, threads: int | None = None):
        """An InferenceSession for one model, from bytes whose hash was checked just now."""
        entry = self[entry] if isinstance(entry, str) else entry
        if is_cascade(entry):
            raise ZooError(f"{entry['name']}: a cascade has no file (and no session) of its own; use "
                           f"Zoo.open({entry['name']!r}), which opens both members")
        data = read_model_bytes(self.path, entry)  # hash and ONNX structure checked (no external data)
        session = open_model(data, str(self.path / entry["file"]), provider_name(device), threads)
        check_embedded(entry, session.get_modelmeta().custom_metadata_map, str(self.path / entry["file"]))
        return session

    def open(self, entry: dict | str, device: str | None = None, threads: int | None = None,
             with_session: bool = True, reason: str = "chosen by name") -> Choice:
        """The zoo's runtime entry's choice for one entry: a model's ``Choice`` or a cascade's ``CascadeChoice``
        (sessions of both members) under ``classify``."""
        entry = self[entry] if isinstance(entry, str) else entry
        rt, provider = self.runtime, provider_name(device)
        if is_cascade(entry):
            parts = tuple(self.open(name, provider, threads, with_session, reason=f"member of {entry['name']}")
                          for name in entry["members"])
            sessions = tuple(p.session for p in parts) if with_session else None
            return make_choice(rt, entry, sessions, reason, provider, parts)
        return make_choice(rt, entry, self.session(entry, provider, threads) if with_session else None, reason,
                           provider, context=rt.context(self.path, self.manifest) if rt.context else None)

    @staticmethod
    def cost(entry: dict, by_average: bool = False) -> float:
        """FLOPs per image a FLOPs budget is checked against: ``flops`` (a cascade's worst case, both members) or,
        with ``by_average``, a cascade's average on validation data (``flops_avg.val``; the threshold was chosen
        there). A model's cost is its ``flops`` either way."""
        return float(entry["flops_avg"]["val"]) if (by_average and is_cascade(entry)) else entry["flops"]

    def latency(self, entry: dict, provider: str, batch: int = 1, threads: int | None = None,
                stat: str = "p90") -> tuple[float, dict] | None:
        """The entry's latency measured on this device (hardware label and provider) for (batch[, threads]); the
        fastest thread setting when ``threads`` is None. None when never measured here: figures of other machines
        are not used (``klas profile`` measures this one). A cascade's latency depends on its inputs: figures
        taken on real images win over ones on random inputs."""
        if stat not in STATS:
            raise ZooError(f"latency statistic {stat!r}: expected one of {', '.join(STATS)}")
        recs = [r for r in entry["latency"] if r["provider"] == provider and r["batch"] == batch
                and (threads is None or r["threads"] == threads) and r["device"] == device_label(provider)]
        recs = [r for r in recs if r.get("inputs") != "random"] or recs
        if not recs:
            return None
        best = min(recs, key=lambda r: r[f"{stat}_ms"])
        return best[f"{stat}_ms"], best

    def pick(self, max_flops: float | str | None = None, max_latency_ms: float | None = None,
             device: str | None = None, min_accuracy: float | None = None, threads: int | None = None,
             batch: int = 1, stat: str = "p90", with_session: bool = True, by_average: bool = False,
             precision: str | list[str] | tuple | None = None, *, max_ms_per_token: float | None = None,
             max_ttft_ms: float | None = None, prompt_tokens: int | None = None,
             max_memory_mb: float | None = None) -> Choice:
        """The most accurate model or cascade within every given budget (ties: lower cost, then float32 before a
        variant), with sessions on ``device``; ``precision`` ('fp32', 'fp16', 'int8', a list or a comma-separated
        string of them; cascades count as fp32) restricts the candidates.

        Budgets are inclusive (a model costing exactly ``max_flops`` fits). A cascade's FLOPs are its worst case
        (both members on every sample) unless ``by_average``, then its average on validation data. Latency uses the
        manifest's ``stat`` percentile measured on this device (its hardware and ``device``'s provider) at
        ``batch`` (a cascade's own records); measure with ``klas profile`` first.

        A zoo's runtime entry says which budgets it has figures for (``RuntimeEntry.budgets``) and may pick in its
        own way: decoder zoos (``klas_runtime.decoder_pick``) take ``max_flops`` per token, ``max_ms_per_token``,
        ``max_ttft_ms`` (at ``prompt_tokens``), ``max_memory_mb`` and ``min_accuracy`` (100 / perplexity); a
        budget the zoo has no figures for is refused in one line.
        """
        rt = self.runtime
        for flag, value, hi in (("--max-latency-ms", max_latency_ms, None), ("--min-accuracy", min_accuracy, 100),
                                ("--max-ms-per-token", max_ms_per_token, None), ("--max-ttft-ms", max_ttft_ms, None),
                                ("--max-memory-mb", max_memory_mb, None)):
            check_budget(value, flag, hi)
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 0):
            raise ZooError(f"--threads {threads!r}: expected a whole number >= 0 (0: onnxruntime's default)")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ZooError(f"--batch {batch!r}: expected a whole number >= 1")
        given = dict(max_flops=max_flops, max_latency_ms=max_latency_ms, min_accuracy=min_accuracy,
                     max_ms_per_token=max_ms_per_token, max_ttft_ms=max_ttft_ms, max_memory_mb=max_memory_mb)
        for key, value in given.items():
            if value is not None and key not in rt.budgets:
                takes = ", ".join("--" + b.replace("_", "-") for b in rt.budgets)
                raise ZooError(f"--{key.replace('_', '-')}: {self.path} is a zoo of runtime entry {rt.name!r}, "
                               f"which has no such figures (its budgets: {takes})" + _BUDGET_HINTS.get(key, ""))
        if prompt_tokens is not None and "max_ttft_ms" not in rt.budgets:
            raise ZooError(f"--prompt-tokens {prompt_tokens}: {self.path} is not a decoder zoo (no prompts)")
        if rt.pick is not None:
            return rt.pick(self, device=device, threads=threads, batch=batch, stat=stat, with_session=with_session,
                           precision=precision, prompt_tokens=prompt_tokens,
                           **{k: v for k, v in given.items() if k in rt.budgets})
        provider = provider_name(device)
        flops_cap = parse_count(max_flops) if max_flops is not None else None
        wanted = _precisions(precision)
        lat = {m["name"]: self.latency(m, provider, batch, threads, stat) for m in self.entries}

        def cost(m):
            return self.cost(m, by_average)

        tests = []
        if flops_cap is not None:
            tests.append(("flops", lambda m: cost(m) <= flops_cap))
        if max_latency_ms is not None:
            tests.append(("latency", lambda m: lat[m["name"]] is not None and lat[m["name"]][0] <= max_latency_ms))
        if min_accuracy is not None:
            tests.append(("accuracy", lambda m: m["test_acc"] >= min_accuracy))
        pool = [m for m in self.entries if wanted is None or precision_of(m) in wanted]
        if not pool:
            have = sorted({precision_of(m) for m in self.entries}, key=PRECISIONS.index)
            extra = [p for p in wanted if p != "fp32"]
            raise ZooError(f"--precision {','.join(wanted)}: this zoo has no such entry (its precisions: "
                           f"{', '.join(have)}); to re-export it with them, "
                           + make_zoo_hint(self.path, f" --force --precisions {','.join(extra) or 'fp16,int8'}"))
        where = f"{short_provider(provider)}, batch {batch}" + (f", {threads} thread(s)" if threads else "")
        # variants compete with their parent on measured speed; on accuracy only where the paired test says so
        reviews = review(pool, lat, stat, where, provider, batch, device_label(provider))
        offered = [m for m in pool if m["name"] not in reviews or reviews[m["name"]].offered]
        fits = [m for m in offered if all(t(m) for _, t in tests)]
        budget = _budget_text(flops_cap, max_latency_ms, min_accuracy, stat, where, by_average and self.cascades)
        if wanted is not None:
            budget += f", precision {'/'.join(wanted)}"
        if not fits:
            raise ZooError(self._nothing_fits(lat, flops_cap, max_latency_ms, min_accuracy, stat, where, budget,
                                               cost, pool, provider, batch, threads))
        def rank(m):
            r = reviews.get(m["name"])
            faster = r is not None and r.faster
            return (r.accuracy if r else m["test_acc"], -cost(m), faster, -lat[m["name"]][0] if faster else 0.0,
                    precision_of(m) == "fp32", m["name"])

        best = max(fits, key=rank)
        latency = lat[best["name"]]
        reason = self._reason(best, fits, latency, stat, where, budget, cost, by_average, flops_cap)
        reason += _variants_text(best, reviews)
        use_threads = latency[1]["threads"] if (latency and max_latency_ms is not None) else threads
        choice = self.open(best, provider, use_threads, with_session, reason)
        choice.latency_ms, choice.latency_record = (latency[0], latency[1]) if latency else (None, None)
        return choice

    def _nothing_fits(self, lat, flops_cap, max_latency_ms, min_accuracy, stat, where, budget, cost, pool=None,
                      provider=None, batch=1, threads=None) -> str:
        pool = self.entries if pool is None else pool
        cheapest = min(pool, key=lambda m: (cost(m), m["name"]))
        if flops_cap is not None and cost(cheapest) > flops_cap:
            return (f"max_flops {format_count(flops_cap)} is below the cheapest model, {cheapest['name']} "
                    f"({format_count(cost(cheapest))} FLOPs)")
        if max_latency_ms is not None:
            measured = [m for m in pool if lat[m["name"]] is not None]
            if not measured:
                sp = short_provider(provider) if provider else "cpu"
                return (f"no entry of this zoo has a latency measured on this device ({device_label(provider)}, "
                        f"{where}); measure it with `klas profile {self.path} --provider {sp} --threads "
                        f"{1 if threads is None else threads} --batch {batch}`")
            fastest = min(measured, key=lambda m: lat[m["name"]][0])
            if lat[fastest["name"]][0] > max_latency_ms:
                return (f"max_latency_ms {max_latency_ms:g} is below the fastest model, {fastest['name']} "
                        f"({stat} {lat[fastest['name']][0]:.3g} ms on {where})")
        if min_accuracy is not None:
            top = max(pool, key=lambda m: m["test_acc"])
            if top["test_acc"] < min_accuracy:
                return (f"min_accuracy {min_accuracy:g}% is above the most accurate model, {top['name']} "
                        f"({top['test_acc']:.2f}%)")
        return (f"no single model meets {budget} together (each budget alone is met by some model; "
                f"the cheapest is {cheapest['name']}, {format_count(cost(cheapest))} FLOPs, "
                f"{cheapest['test_acc']:.2f}%)")

    def _reason(self, best, fits, latency, stat, where, budget, cost, by_average, flops_cap) -> str:
        if is_cascade(best):
            first, second = best["members"]
            d, fa = best["deferral"], best["flops_avg"]
            parts = [f"cascade {best['name']}: {first} answers, {second} runs on the samples whose max softmax "
                     f"probability from {first} is below the threshold {best['threshold']:g} (deferred: "
                     f"{d['val']:.1%} of val, {d['test']:.1%} of test)",
                     f"test accuracy {best['test_acc']:.2f}%, {format_count(best['flops'])} FLOPs worst case "
                     f"(both members), {format_count(fa['val'])} on average on val ({format_count(fa['test'])} on "
                     f"test), {format_count(best['params'])} params"]
            if flops_cap is not None:
                parts.append("FLOPs budget checked against its average on validation data (the data its threshold "
                             "was chosen on; by_average)" if by_average else
                             "FLOPs budget checked against its worst case (by_average / --by-average would use its "
                             "average on validation data)")
        else:
            variant = (f" ({best['precision']} variant of {best['parent']})" if precision_of(best) != "fp32"
                       else "")
            parts = [f"{best['name']}{variant}: test accuracy {best['test_acc']:.2f}%, "
                     f"{format_count(best['flops'])} FLOPs, {format_count(best['params'])} params"]
        if latency:
            inputs = f", {latency[1]['inputs']} inputs" if is_cascade(best) and latency[1].get("inputs") else ""
            parts.append(f"{stat} {latency[0]:.3g} ms on {where} ({latency[1]['threads']} thread(s), "
                         f"{latency[1]['device']}{inputs})")
        what = "models and cascades" if self.cascades else "models"
        parts.append(f"most accurate of {len(fits)}/{len(self)} {what} within {budget}")
        group = best.get("parent") or best["name"]  # its parent and variants: compared in _variants_text
        better = [m for m in self.entries if m["test_acc"] > best["test_acc"]
                  and (m.get("parent") or m["name"]) != group]
        if better:
            nxt = min(better, key=lambda m: (cost(m), -m["test_acc"]))
            avg = " on average on val" if by_average and is_cascade(nxt) else ""
            parts.append(f"the next more accurate, {nxt['name']} ({nxt['test_acc']:.2f}%), needs "
                         f"{format_count(cost(nxt))} FLOPs{avg}")
        if flops_cap is not None and not by_average:
            avg_fit = [m for m in better if is_cascade(m) and self.cost(m, True) <= flops_cap < m["flops"]]
            if avg_fit:
                top = max(avg_fit, key=lambda m: (m["test_acc"], -self.cost(m, True)))
                parts.append(f"cascade {top['name']} ({top['test_acc']:.2f}%) would fit by its average FLOPs on "
                             f"val, {format_count(self.cost(top, True))} (by_average / --by-average)")
        return "; ".join(parts)


_BUDGET_HINTS = {"max_latency_ms": "; a decoder zoo is budgeted per output token (--max-ms-per-token) and to the "
                                  "first token (--max-ttft-ms)",
                 "max_ms_per_token": "; --max-ms-per-token is a decoder zoo's budget (image zoos: --max-latency-ms)",
                 "max_ttft_ms": "; --max-ttft-ms (time to first token) is a decoder zoo's budget",
                 "max_memory_mb": "; peak memory is measured for decoder zoos (`klas-runtime profile`)"}


def _variants_text(best: dict, reviews: dict) -> str:
    """The pick's explanation of variants against their parent: the chosen one's (or its parent's) group, and how
    many variants of other models were not offered."""
    group = best.get("parent") or best["name"]
    mine = [r for r in reviews.values() if r.parent == group]
    others = [r for r in reviews.values() if r.parent != group and not r.offered]
    parts = [r.text for r in mine]
    if others:
        parts.append(f"{len(others)} variant(s) of other models not offered: slower than their float32 parent "
                     f"where timed and not significantly more accurate ({', '.join(r.name for r in others)})")
    return "".join(f"; {p}" for p in parts)


def verify_zoo(zoo_dir: Path | str) -> list[str]:
    """Every problem of a zoo, one line each (empty when sound): per model file, that it is a plain name in the
    folder, exists, matches its sha256, loads in onnxruntime as an ONNX model, carries an embedded entry that agrees
    with the manifest, and has the inputs and outputs the manifest gives (the runtime entry's ``check_model``;
    image models' by default). That this runtime has the zoo's runtime entry, and the entry's zoo-level checks
    (``check_zoo``: a decoder zoo's tokenizer). Per cascade (whose claims against its members the schema already
    checked): that both members passed, and that the composite runs on a small random batch (the entry's
    ``check_cascade``). A manifest that is missing or fails the schema raises ZooError (nothing else can be checked
    then)."""
    root = Path(zoo_dir)
    manifest = read_manifest(root)
    cpu = provider_name("cpu")  # onnxruntime missing: an error of this host (raised), not a problem of the zoo
    try:
        rt, missing_entry = runtime_entry(manifest, root), None
    except ZooError as e:
        rt, missing_entry = None, str(e)
    check_model = rt.check_model if rt is not None and rt.check_model is not None else check_signature
    problems, sessions = [], {}
    for entry in manifest["models"]:
        if is_cascade(entry):
            continue
        where = str(root / entry["file"])
        try:
            session = open_model(read_model_bytes(root, entry), where, cpu, 1)
            check_embedded(entry, session.get_modelmeta().custom_metadata_map, where)
            check_model(session, entry, where)
        except ZooError as e:
            problems.append(str(e))
            continue
        sessions[entry["name"]] = session
    if rt is None:
        return problems + [missing_entry]
    if rt.check_zoo is not None:
        problems += rt.check_zoo(root, manifest)
    models = {e["name"]: e for e in manifest["models"] if not is_cascade(e)}
    for entry in manifest["models"]:
        if is_cascade(entry):
            problems += _check_cascade_runs(rt, entry, models, sessions, root, cpu)
    return problems


def _check_cascade_runs(rt: RuntimeEntry, entry: dict, models: dict, sessions: dict, root: Path,
                        cpu: str) -> list[str]:
    where = f"{root / MANIFEST}: cascade {entry['name']!r}"
    bad = [m for m in entry["members"] if m not in sessions]
    if bad:
        return [f"{where}: member {m!r} failed verification (its file's problem is listed above)" for m in bad]
    parts = tuple(make_choice(rt, models[m], sessions[m], "verify", cpu) for m in entry["members"])
    try:
        choice = make_choice(rt, entry, tuple(p.session for p in parts), "verify", cpu, parts)
    except ZooError as e:
        return [f"{where}: {e}"]
    problem = rt.check_cascade(choice) if rt.check_cascade else None
    return [f"{where}: {problem}"] if problem else []


def _budget_text(flops_cap, max_latency_ms, min_accuracy, stat, where, by_average=False) -> str:
    parts = []
    if flops_cap is not None:
        parts.append(f"max_flops={format_count(flops_cap)}" + (" (cascades: average on val)" if by_average else ""))
    if max_latency_ms is not None:
        parts.append(f"max_latency_ms={max_latency_ms:g} ({stat}, {where})")
    if min_accuracy is not None:
        parts.append(f"min_accuracy={min_accuracy:g}%")
    return ", ".join(parts) if parts else "no budget"
