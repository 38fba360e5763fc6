"""``klas-runtime pick / predict / generate / profile / verify``: flags and printing only; the work is in
klas_runtime.runtime, klas_runtime.generate and klas_runtime.profile.

The full ``klas`` command registers these same subcommands through ``register`` (or ``add_pick`` etc.), so
``klas pick ...`` and ``klas-runtime pick ...`` take identical flags. Heavy imports (onnxruntime) happen inside the
handlers: building the parser stays cheap for ``klas --help``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from klas_runtime.errors import ZooError


# --- flags ---------------------------------------------------------------------------------------------------------

def budget_flags(parser: argparse.ArgumentParser, zoo_dir: bool = True) -> None:
    """ZOO_DIR and the budget of ``pick`` / ``predict`` / ``generate``."""
    if zoo_dir:
        parser.add_argument("zoo_dir", type=Path)
    parser.add_argument("--max-flops", "--max-flops-per-token", dest="max_flops", default=None,
                        help="FLOPs per image (decoder zoos: per token), with K/M/G suffix (e.g. 40M)")
    parser.add_argument("--max-latency-ms", type=float, default=None, help="latency budget per batch (ms)")
    parser.add_argument("--max-ms-per-token", type=float, default=None,
                        help="decoder zoos: ms per output token (the --percentile of the decode steps)")
    parser.add_argument("--max-ttft-ms", type=float, default=None,
                        help="decoder zoos: time to first token (ms) at --prompt-tokens")
    parser.add_argument("--prompt-tokens", type=int, default=None,
                        help="prompt length --max-ttft-ms is for (default: generate: the prompt's; pick: the "
                             "length the profile timed decoding after); between swept lengths: interpolated")
    parser.add_argument("--max-memory-mb", type=float, default=None,
                        help="decoder zoos: measured peak memory (MB) of generating (klas-runtime profile)")
    parser.add_argument("--min-accuracy", type=float, default=None,
                        help="minimum test accuracy (%%; decoder zoos: 100/perplexity)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when onnxruntime-gpu has it)")
    parser.add_argument("--threads", type=int, default=None, help="only latency measured with this many threads")
    parser.add_argument("--batch", type=int, default=1, help="batch size the latency budget is for")
    parser.add_argument("--percentile", "--stat", dest="stat", default="p90", choices=("p50", "p90", "p99", "mean"),
                        help="latency statistic the budget is checked against (default: p90)")
    parser.add_argument("--precision", action="extend", nargs="+", default=None,
                        choices=("fp32", "fp16", "int8", "int4"),
                        help="only entries of these precisions (default: all; cascades are fp32; int4: decoders)")
    parser.add_argument("--by-average", action="store_true",
                        help="check a cascade against --max-flops by its average FLOPs on val (default: worst case)")


def profile_flags(parser: argparse.ArgumentParser) -> None:
    """Latency measurement settings (``profile``, and ``klas export`` which profiles what it exports)."""
    parser.add_argument("--provider", action="append", default=None,
                        help="cpu or cuda (repeatable; default: best here)")
    parser.add_argument("--threads", type=int, action="extend", nargs="+", default=None,
                        help="intra-op threads (one or more, repeatable; default 1)")
    parser.add_argument("--batch", type=int, action="extend", nargs="+", default=None,
                        help="batch sizes (one or more, repeatable; default 1)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed runs first (default 20; decoders: 1 generation)")
    parser.add_argument("--runs", type=int, default=None,
                        help="timed runs per measurement (default 200; decoders: 5 generations)")


# --- handlers ------------------------------------------------------------------------------------------------------

def _profile(args) -> int:
    from klas_runtime.profile import FRONT_STATS, device_profile, profile_zoo, write_device_profile
    from klas_runtime.session import provider_name

    if args.percentile not in FRONT_STATS:
        raise ZooError(f"--percentile {args.percentile!r}: expected one of {', '.join(FRONT_STATS)}")
    manifest = profile_zoo(args.zoo_dir, providers=args.provider, threads=args.threads, batches=args.batch,
                           warmup=args.warmup, runs=args.runs, models=args.model, inputs=args.images,
                           prompt_lengths=args.prompt_lengths, prompt_tokens=args.prompt_tokens,
                           new_tokens=args.new_tokens, memory=False if args.no_memory else None)
    for m in manifest["models"]:
        for r in m["latency"]:
            if "ttft_ms" in r:  # a decoder's record: per output token, to the first token, memory
                ttft = " ".join(f"{k}:{v:.3g}" for k, v in sorted(r["ttft_ms"].items(), key=lambda kv: int(kv[0])))
                mem = f", peak {r['peak_memory_mb']:.1f} MB" if "peak_memory_mb" in r else ""
                print(f"[profile] {m['name']:44s} {r['provider']:22s} threads {r['threads']} batch {r['batch']:3d}  "
                      f"ms/token p50 {r['p50_ms']:.3f} p90 {r['p90_ms']:.3f} p99 {r['p99_ms']:.3f}, "
                      f"{r['tokens_per_s']:.1f} tokens/s, ttft ms {ttft}{mem}  ({r['device']})")
                continue
            extra = (f", {r['inputs']} inputs, {r['deferral']:.1%} deferred" if "inputs" in r and "deferral" in r
                     else "")
            print(f"[profile] {m['name']:44s} {r['provider']:22s} threads {r['threads']} batch {r['batch']:3d}  "
                  f"p50 {r['p50_ms']:8.3f} p90 {r['p90_ms']:8.3f} p99 {r['p99_ms']:8.3f} ms  ({r['device']}{extra})")
    if not args.images and any(m.get("kind") == "cascade" and (args.model is None or m["name"] in args.model)
                               for m in manifest["models"]):
        print("[profile] cascades were timed on random inputs, whose deferral rate is not that of real data; "
              "pass --images with real images for latency to budget on")
    for provider in dict.fromkeys(provider_name(p) for p in (args.provider or [None])):
        prof = device_profile(manifest, provider, args.percentile)
        for table in prof["settings"]:
            print(f"[profile] front on {prof['device']}, {table['threads']} thread(s), batch {table['batch']} "
                  f"({args.percentile}): {' < '.join(table['front'])}")
        files = write_device_profile(args.zoo_dir, manifest, provider, args.percentile)
        if files:
            png = "" if any(f.suffix == ".png" for f in files) else " (no plot: pip install matplotlib)"
            print(f"[profile] {prof['device']}: {', '.join(map(str, files))}{png}")
    return 0


def _choose(args, with_session: bool, zoo=None, prompt_tokens: int | None = None):
    from klas_runtime.runtime import Zoo

    zoo = zoo or Zoo(args.zoo_dir)
    return zoo.pick(max_flops=args.max_flops, max_latency_ms=args.max_latency_ms, device=args.device,
                    min_accuracy=args.min_accuracy, threads=args.threads, batch=args.batch, stat=args.stat,
                    with_session=with_session, by_average=args.by_average, precision=args.precision,
                    max_ms_per_token=args.max_ms_per_token, max_ttft_ms=args.max_ttft_ms,
                    prompt_tokens=prompt_tokens if prompt_tokens is not None else args.prompt_tokens,
                    max_memory_mb=args.max_memory_mb)


def _pick(args) -> int:
    choice = _choose(args, with_session=False)
    print(" ".join(choice.files))  # a cascade: both members' files, the cheaper first
    print(f"  why: {choice.reason}")
    return 0


def _predict(args) -> int:
    """Read each input and print its prediction through the zoo's runtime entry (``classify`` for images)."""
    from klas_runtime.runtime import Zoo

    zoo = Zoo(args.zoo_dir)
    rt = zoo.runtime  # an entry this runtime does not serve: one line naming the manifest, before any work
    choice = _choose(args, with_session=True, zoo=zoo)
    print(f"[predict] model {choice.name} ({choice.reason})")
    for path in args.images:
        print(f"{path}: {rt.describe(choice, rt.load_input(path, choice.input))}")
    return 0


DEFAULT_NEW_TOKENS = 64  # generate's --max-new-tokens when not given (fewer where the context ends sooner)
BUDGETS = ("max_flops", "max_latency_ms", "max_ms_per_token", "max_ttft_ms", "max_memory_mb", "min_accuracy")


def _generate(args) -> int:
    """Pick a decoder within the budget (or take --model), say which and why on stderr, stream the text."""
    from klas_runtime.generate import _check_stop, check_context, check_sampling, encode_prompt, load_tokenizer
    from klas_runtime.runtime import Zoo

    zoo = Zoo(args.zoo_dir)
    rt = zoo.runtime
    if rt.name != "generate":
        raise ZooError(f"{zoo.path}: a zoo of runtime entry {rt.name!r}; `generate` needs a decoder zoo "
                       f"(runtime_entry 'generate'); for this one use `predict`")
    check_sampling(args.temperature, args.top_k, args.top_p)
    stop = _check_stop(args.stop)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    ids = encode_prompt(load_tokenizer(zoo.path, zoo.manifest), zoo.manifest["generation"], prompt)
    context = zoo.manifest["generation"]["max_context"]
    new = args.max_new_tokens if args.max_new_tokens is not None else max(1, min(DEFAULT_NEW_TOKENS,
                                                                                 context - len(ids)))
    check_context(len(ids), new, context, "the prompt")
    from klas_runtime.genai import resolve_engine, use_engine

    engine = resolve_engine(args.engine)
    with_session = engine == "numpy"  # onnxruntime-genai loads the file itself: no session opened for nothing
    if args.model:
        given = [b for b in BUDGETS if getattr(args, b) is not None]
        if given:
            raise ZooError(f"--model {args.model} and --{given[0].replace('_', '-')}: give a model or a budget, "
                           f"not both")
        choice = zoo.open(args.model, args.device, args.threads, with_session=with_session,
                          reason="chosen by --model")
    else:
        choice = _choose(args, with_session=with_session, zoo=zoo,
                         prompt_tokens=len(ids) if args.max_ttft_ms is not None else None)
    use_engine(choice, engine, args.threads)
    print(f"[generate] model {choice.name}, engine {engine} ({choice.reason})", file=sys.stderr)
    kw = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=stop)
    if args.no_stream:
        print(choice.generate(prompt, new, **kw))
        return 0
    for piece in choice.stream(prompt, new, **kw):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


def _verify(args) -> int:
    from klas_runtime.entries import runtime_entry
    from klas_runtime.manifest import MANIFEST, read_manifest
    from klas_runtime.runtime import verify_zoo

    manifest = read_manifest(args.zoo_dir)  # a missing or invalid manifest: one ZooError line
    entries = manifest["models"]
    c = sum(e.get("kind") == "cascade" for e in entries)
    what = f"{len(entries) - c} models" + (f" and {c} cascade(s)" if c else "")
    problems = verify_zoo(args.zoo_dir)
    for line in problems:
        print(line, file=sys.stderr)
    where = Path(args.zoo_dir) / MANIFEST
    if problems:
        print(f"[verify] {where}: {len(problems)} problem(s) in {what}")
        return 1
    runs = ", every cascade runs on its members" if c else ""
    print(f"[verify] {where}: {what}, {runtime_entry(manifest, args.zoo_dir).verified}{runs}")
    return 0


# --- subcommands ---------------------------------------------------------------------------------------------------

def add_profile(sub) -> argparse.ArgumentParser:
    pr = sub.add_parser("profile", help="measure a zoo's latency on this machine and add it to the manifest")
    pr.add_argument("zoo_dir", type=Path)
    pr.add_argument("--model", action="append", default=None, help="only this model or cascade (repeatable)")
    pr.add_argument("--images", nargs="+", type=Path, default=None,
                    help="real images to time cascades on (their latency depends on how many samples the second "
                         "member gets); default: random inputs, recorded as such")
    profile_flags(pr)
    pr.add_argument("--prompt-lengths", type=int, action="extend", nargs="+", default=None,
                    help="decoder zoos: prompt lengths time to first token is swept over (default 16 64 128)")
    pr.add_argument("--prompt-tokens", type=int, default=None,
                    help="decoder zoos: prompt length decoding is timed after (default 64)")
    pr.add_argument("--new-tokens", type=int, default=None,
                    help="decoder zoos: decode steps timed per generation (default 32)")
    pr.add_argument("--no-memory", action="store_true",
                    help="decoder zoos: skip the peak-memory measurement (a fresh process per record)")
    pr.add_argument("--percentile", default="p90", choices=("p50", "p90", "p99"),
                    help="latency statistic the per-device front is drawn on (default: p90)")
    pr.set_defaults(func=_profile)
    return pr


def add_pick(sub) -> argparse.ArgumentParser:
    pk = sub.add_parser("pick", help="the most accurate zoo model (or cascade) within a FLOPs / latency / accuracy "
                        "budget")
    budget_flags(pk)
    pk.set_defaults(func=_pick)
    return pk


def add_predict(sub) -> argparse.ArgumentParser:
    pd = sub.add_parser("predict", help="classify images with the model `pick` would choose")
    budget_flags(pd)
    pd.add_argument("images", nargs="+", type=Path)
    pd.set_defaults(func=_predict)
    return pd


def add_generate(sub) -> argparse.ArgumentParser:
    gn = sub.add_parser("generate", help="continue a prompt with the decoder `pick` would choose (decoder zoos), "
                        "streaming the text")
    gn.add_argument("zoo_dir", type=Path)
    gn.add_argument("prompt", help="the prompt text, or - to read it from stdin")
    budget_flags(gn, zoo_dir=False)
    gn.set_defaults(by_average=False)
    gn.add_argument("--model", default=None, help="this decoder instead of a budget pick")
    gn.add_argument("--max-new-tokens", type=int, default=None,
                    help="at most this many new tokens (default 64, or what the models' context leaves)")
    gn.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; else softmax sampling")
    gn.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    gn.add_argument("--top-p", type=float, default=None, help="sample within the nucleus of this probability")
    gn.add_argument("--seed", type=int, default=None, help="random seed of the sampling (reproducible runs)")
    gn.add_argument("--stop", action="extend", nargs="+", default=None,
                    help="end the text before the first of these strings (the stop tokens of the manifest always)")
    gn.add_argument("--no-stream", action="store_true", help="print the text once it is complete")
    gn.add_argument("--engine", default="auto", choices=("auto", "numpy", "onnxruntime-genai"),
                    help="the generation loop: klas-runtime's numpy KV-cache loop, or onnxruntime-genai's "
                         "(auto: onnxruntime-genai where it is installed)")
    gn.set_defaults(func=_generate)
    return gn


def add_verify(sub) -> argparse.ArgumentParser:
    vf = sub.add_parser("verify", help="check a zoo: manifest schema, every file's sha256, every file loads as ONNX")
    vf.add_argument("zoo_dir", type=Path)
    vf.set_defaults(func=_verify)
    return vf


def register(sub) -> None:
    """Add ``profile``, ``pick``, ``predict``, ``generate`` and ``verify`` to an argparse subparsers object."""
    add_profile(sub)
    add_pick(sub)
    add_predict(sub)
    add_generate(sub)
    add_verify(sub)


def build_parser() -> argparse.ArgumentParser:
    from klas_runtime import __version__

    p = argparse.ArgumentParser(prog="klas-runtime", description="Use a klas model zoo (ONNX files + manifest.json) "
                                "without torch: verify it, pick a model within a budget, predict, generate, profile.")
    p.add_argument("--version", action="version", version=f"klas-runtime {__version__}")
    register(p.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return p


_OS_HINTS = {"ENOSPC": "no space left on the device; free some space and run the same command again (finished "
                       "work is kept)",
             "EDQUOT": "disk quota exceeded; free some space and run the same command again",
             "EACCES": "permission denied; choose a folder you can write to, or fix its permissions",
             "EPERM": "operation not permitted; choose a folder you can write to, or fix its permissions",
             "EROFS": "read-only file system; choose a folder you can write to",
             "ENOTDIR": "a part of this path is a file, not a directory",
             "EISDIR": "is a directory, where a file was expected",
             "EEXIST": "already exists",
             "ENOENT": "no such file or directory",
             "ENAMETOOLONG": "file name too long",
             "EMFILE": "too many open files", "ELOOP": "too many levels of symbolic links"}


def os_error_line(e: OSError) -> str:
    """One line for an operating-system error: the path(s) it concerns and what to do."""
    import errno

    name = errno.errorcode.get(e.errno or 0, "")
    what = _OS_HINTS.get(name) or (e.strerror or str(e) or type(e).__name__)
    paths = " -> ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
    return (f"{paths}: {what}" if paths else what) + (f" [{name}]" if name else "")


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None, interrupted: str = "interrupted") -> int:
    """Parse and run one command: a user error (``ZooError`` and its subclasses) is one line and exit 2; an
    unexpected internal error is one line naming the file the full traceback was saved to, and exit 1; an
    operating-system error (``OSError``: full disk, permissions, a file where a folder goes) is one line naming the
    path, and exit 2."""
    prog = parser.prog
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ZooError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130
    except OSError as e:  # the operating system refused (full disk, permissions, a file where a folder goes)
        print(f"{prog}: error: {os_error_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug, or an OS failure nobody anticipated: one line, the traceback kept in a file
        import tempfile
        import time
        import traceback

        path = Path(tempfile.gettempdir()) / f"{prog}-traceback-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
        try:
            path.write_text(traceback.format_exc())
            where = f"full traceback in {path}"
        except OSError:
            where = "the traceback could not be saved"
        msg = str(e).splitlines()[0][:200] if str(e) else ""
        print(f"{prog}: internal error: {type(e).__name__}: {msg} ({where})", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
