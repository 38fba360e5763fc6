"""Budgets of decoder zoos: the lowest-perplexity decoder within FLOPs per token, milliseconds per output token,
time to first token and peak memory, measured on this device (``Zoo.pick`` of a ``generate`` zoo).

A decoder's latency records (``klas_runtime.decoder_profile.generation_latency_record``) hold, per (device, provider,
threads, batch): ms per output token (p50/p90/p99/mean of the decode steps), time to first token per swept prompt
length (``ttft_ms``) and, when measured, the peak memory of a fresh process generating at the largest length. One
record (one thread setting) must meet every time and memory budget at once; of those, the one with the lowest
per-token ``stat`` is used.

Time to first token at a prompt length the profile did not sweep (``ttft_at``): the measured value at a swept
length, linear interpolation between the two neighbouring swept lengths, the smallest swept length's value below
it (prefill time grows with the prompt, so that is an upper bound), and *not measured* beyond the largest (such an
entry does not fit; the error says which lengths to profile). Prefill cost is linear in the prompt plus a
quadratic attention term, i.e. convex, so the linear interpolation errs high -- on the safe side of a budget.
"""
from __future__ import annotations

import math

from klas_runtime.errors import ZooError
from klas_runtime.budget import STATS, _precisions, format_count, parse_count
from klas_runtime.manifest import DECODER_PRECISIONS
from klas_runtime.manifest import precision as precision_of
from klas_runtime.session import device_label, provider_name, short_provider

BUDGETS = ("max_flops", "max_ms_per_token", "max_ttft_ms", "max_memory_mb", "min_accuracy")


def ttft_at(record: dict, prompt_tokens: int | None = None) -> float | None:
    """Time to first token (ms) of ``record`` at ``prompt_tokens`` (None: the record's own ``prompt_tokens``): see
    the module docstring; None beyond the largest swept length."""
    table = sorted((int(k), float(v)) for k, v in record["ttft_ms"].items())
    n = record["prompt_tokens"] if prompt_tokens is None else prompt_tokens
    if n <= table[0][0]:
        return table[0][1]
    for (a, ta), (b, tb) in zip(table, table[1:]):
        if a <= n <= b:
            return ta + (tb - ta) * (n - a) / (b - a)
    return table[-1][1] if n == table[-1][0] else None


def _ms_budget(value, flag: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
        raise ZooError(f"{flag} {value!r}: expected a number >= 0")
    return float(value)


def pick(zoo, *, max_flops=None, max_ms_per_token=None, max_ttft_ms=None, max_memory_mb=None, min_accuracy=None,
         prompt_tokens: int | None = None, device: str | None = None, threads: int | None = None, batch: int = 1,
         stat: str = "p90", with_session: bool = True, precision=None):
    """The decoder of ``zoo`` with the lowest test perplexity (highest ``test_acc`` = 100 / perplexity) within every
    given budget (inclusive; ties: fewer FLOPs per token, then float32), opened on ``device``. ``max_flops`` is per
    token (at the entry's ``flops_context``); the time and memory budgets use this device's records at ``batch``
    (and ``threads`` when given): ``max_ms_per_token`` against ``stat``, ``max_ttft_ms`` at ``prompt_tokens``
    (``ttft_at``), ``max_memory_mb`` against ``peak_memory_mb``. One ZooError line when nothing fits."""

    if stat not in STATS:
        raise ZooError(f"latency statistic {stat!r}: expected one of {', '.join(STATS)}")
    if prompt_tokens is not None and (isinstance(prompt_tokens, bool) or not isinstance(prompt_tokens, int)
                                      or prompt_tokens < 1):
        raise ZooError(f"--prompt-tokens {prompt_tokens!r}: expected an integer >= 1")
    provider = provider_name(device)
    cap = parse_count(max_flops, "--max-flops-per-token") if max_flops is not None else None
    ms_tok, ttft, mem = (_ms_budget(max_ms_per_token, "--max-ms-per-token"), _ms_budget(max_ttft_ms, "--max-ttft-ms"),
                         _ms_budget(max_memory_mb, "--max-memory-mb"))
    wanted = _precisions(precision, DECODER_PRECISIONS)
    pool = [m for m in zoo.models if wanted is None or precision_of(m) in wanted]
    if not pool:
        have = sorted({precision_of(m) for m in zoo.models}, key=DECODER_PRECISIONS.index)
        raise ZooError(f"--precision {','.join(wanted)}: this zoo has no such entry (its precisions: "
                       f"{', '.join(have)})")
    label = device_label(provider)
    recs = {m["name"]: [r for r in m["latency"] if r["provider"] == provider and r["batch"] == batch
                        and r["device"] == label and (threads is None or r["threads"] == threads)] for m in pool}
    timed = ms_tok is not None or ttft is not None or mem is not None

    def fits_record(r: dict) -> bool:
        if ms_tok is not None and r[f"{stat}_ms"] > ms_tok:
            return False
        if ttft is not None:
            t = ttft_at(r, prompt_tokens)
            if t is None or t > ttft:
                return False
        return mem is None or ("peak_memory_mb" in r and r["peak_memory_mb"] <= mem)

    chosen = {}
    for m in pool:
        ok = [r for r in recs[m["name"]] if fits_record(r)] if timed else recs[m["name"]]
        chosen[m["name"]] = min(ok, key=lambda r: (r[f"{stat}_ms"], r["threads"])) if ok else None
    fits = [m for m in pool if (cap is None or m["flops"] <= cap) and (not timed or chosen[m["name"]] is not None)
            and (min_accuracy is None or m["test_acc"] >= min_accuracy)]
    where = f"{short_provider(provider)}, batch {batch}" + (f", {threads} thread(s)" if threads else "")
    parts = []
    if cap is not None:
        parts.append(f"max_flops_per_token={format_count(cap)}")
    if ms_tok is not None:
        parts.append(f"max_ms_per_token={ms_tok:g} ({stat}, {where})")
    if ttft is not None:
        parts.append(f"max_ttft_ms={ttft:g} (" + (f"{prompt_tokens} prompt tokens" if prompt_tokens else
                                                 "at each record's prompt_tokens") + f", {where})")
    if mem is not None:
        parts.append(f"max_memory_mb={mem:g} ({where})")
    if min_accuracy is not None:
        parts.append(f"min 100/perplexity={min_accuracy:g} (perplexity <= {100 / max(min_accuracy, 1e-12):.4g})")
    budget = ", ".join(parts) or "no budget"
    if wanted is not None:
        budget += f", precision {'/'.join(wanted)}"
    if not fits:
        raise ZooError(_nothing_fits(zoo, pool, recs, cap, ms_tok, ttft, mem, min_accuracy, prompt_tokens, stat,
                                     where, budget, provider, batch, threads))
    # NOTE: a variant is the same network with cheaper weights; its perplexity differs from its parent's by
    # rounding noise (or a loss), so it is a candidate only where its parent does not fit the budget -- never
    # chosen over a fitting parent for a noise-sized "gain" while being slower
    names = {m["name"] for m in fits}
    fits = [m for m in fits if precision_of(m) == "fp32" or m.get("parent") not in names]
    best = max(fits, key=lambda m: (m["test_acc"], -m["flops"], precision_of(m) == "fp32", m["name"]))
    rec = chosen[best["name"]]
    reason = _reason(zoo, best, fits, pool, rec, stat, where, budget, prompt_tokens)
    choice = zoo.open(best, provider, rec["threads"] if (rec and timed) else threads, with_session, reason)
    choice.latency_ms, choice.latency_record = (rec[f"{stat}_ms"], rec) if rec else (None, None)
    return choice


def _describe_entry(m: dict) -> str:

    variant = f" ({m['precision']} variant of {m['parent']})" if precision_of(m) != "fp32" else ""
    return (f"{m['name']}{variant}: test perplexity {m['test_perplexity']:.4g} (100/perplexity {m['test_acc']:.2f}), "
            f"{format_count(m['flops'])} FLOPs per token at context {m['flops_context']}, "
            f"{format_count(m['params'])} params, KV cache {m['kv_bytes_per_token']} bytes per token")


def _reason(zoo, best, fits, pool, rec, stat, where, budget, prompt_tokens) -> str:

    parts = [_describe_entry(best)]
    if rec:
        n = prompt_tokens or rec["prompt_tokens"]
        t = ttft_at(rec, n)
        first = f", first token in {t:.3g} ms at {n} prompt tokens" if t is not None else ""
        memory = f", peak memory {rec['peak_memory_mb']:.1f} MB" if "peak_memory_mb" in rec else ""
        parts.append(f"{stat} {rec[f'{stat}_ms']:.3g} ms per output token ({rec['tokens_per_s']:.3g} tokens/s)"
                     f"{first}{memory} on {where} ({rec['threads']} thread(s), {rec['device']})")
    parts.append(f"lowest perplexity of {len(fits)}/{len(zoo.models)} decoders within {budget}")
    better = [m for m in pool if m["test_acc"] > best["test_acc"]]
    if better:
        nxt = min(better, key=lambda m: (m["flops"], -m["test_acc"]))
        parts.append(f"the next lower perplexity, {nxt['name']} ({nxt['test_perplexity']:.4g}), needs "
                     f"{format_count(nxt['flops'])} FLOPs per token")
    return "; ".join(parts)


def _nothing_fits(zoo, pool, recs, cap, ms_tok, ttft, mem, min_accuracy, prompt_tokens, stat, where, budget,
                  provider, batch, threads) -> str:

    profile = (f"`klas-runtime profile {zoo.path} --provider {short_provider(provider)} --threads {threads or 1} "
               f"--batch {batch}`")
    cheapest = min(pool, key=lambda m: (m["flops"], m["name"]))
    if cap is not None and cheapest["flops"] > cap:
        return (f"max_flops_per_token {format_count(cap)} is below the cheapest decoder, {cheapest['name']} "
                f"({format_count(cheapest['flops'])} FLOPs per token)")
    all_recs = [(m, r) for m in pool for r in recs[m["name"]]]
    if (ms_tok is not None or ttft is not None or mem is not None) and not all_recs:
        return (f"no decoder of this zoo has generation figures measured on this device ({device_label(provider)}, "
                f"{where}); measure them with {profile}")
    if ms_tok is not None:
        m, r = min(all_recs, key=lambda mr: mr[1][f"{stat}_ms"])
        if r[f"{stat}_ms"] > ms_tok:
            return (f"max_ms_per_token {ms_tok:g} is below the fastest decoder, {m['name']} ({stat} "
                    f"{r[f'{stat}_ms']:.3g} ms per output token on {where})")
    if ttft is not None:
        known = [(m, r, ttft_at(r, prompt_tokens)) for m, r in all_recs]
        known = [k for k in known if k[2] is not None]
        if not known:
            longest = max(max(int(k) for k in r["ttft_ms"]) for _, r in all_recs)
            return (f"--max-ttft-ms: a prompt of {prompt_tokens} tokens is longer than every prompt length profiled "
                    f"on this device (up to {longest}); measure it with {profile} --prompt-lengths ... "
                    f"{prompt_tokens}")
        m, r, t = min(known, key=lambda k: k[2])
        if t > ttft:
            n = prompt_tokens or r["prompt_tokens"]
            return (f"max_ttft_ms {ttft:g} is below the fastest first token, {m['name']} ({t:.3g} ms at {n} prompt "
                    f"tokens on {where})")
    if mem is not None:
        measured = [(m, r) for m, r in all_recs if "peak_memory_mb" in r]
        if not measured:
            return (f"--max-memory-mb: no decoder of this zoo has a peak memory measured on this device ({where}); "
                    f"measure it with {profile}")
        m, r = min(measured, key=lambda mr: mr[1]["peak_memory_mb"])
        if r["peak_memory_mb"] > mem:
            return (f"max_memory_mb {mem:g} is below the smallest peak memory, {m['name']} "
                    f"({r['peak_memory_mb']:.1f} MB on {where})")
    if min_accuracy is not None:
        top = max(pool, key=lambda m: m["test_acc"])
        if top["test_acc"] < min_accuracy:
            return (f"min 100/perplexity {min_accuracy:g} (perplexity <= {100 / max(min_accuracy, 1e-12):.4g}) is "
                    f"above the best decoder, {top['name']} (perplexity {top['test_perplexity']:.4g})")
    return (f"no single decoder meets {budget} together (each budget alone is met by some decoder; the cheapest is "
            f"{cheapest['name']}, {format_count(cheapest['flops'])} FLOPs per token, perplexity "
            f"{cheapest['test_perplexity']:.4g})")
