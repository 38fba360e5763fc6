"""``klas export`` / ``klas profile`` / ``klas pick`` / ``klas predict``: a run's Pareto models as an ONNX zoo, and
budget-driven use of that zoo. Flags only; the work is in klas.stages.s6_export, klas.profile and klas.runtime."""
from __future__ import annotations

from pathlib import Path


def _export(args) -> int:
    from klas.stages.s6_export import ExportOptions, export_zoo

    opts = ExportOptions(opset=args.opset, parity_images=args.parity_images, atol=args.atol,
                         min_agreement=args.min_agreement, accuracy_images=args.accuracy_images,
                         profile=not args.no_profile, providers=tuple(args.provider or [None]),
                         threads=tuple(args.threads or [1]), batches=tuple(args.batch or [1]), warmup=args.warmup,
                         runs=args.runs, data_root=args.data_root)
    manifest = export_zoo(args.run_dir, args.out, options=opts)
    for m in manifest["models"]:
        p = m["parity"]
        print(f"[export] {m['file']:48s} {m['flops'] / 1e6:9.2f} MFLOPs  acc {m['test_acc']:6.2f}%  "
              f"parity max|d| {p['max_abs_diff']:.1e} top-1 {p['top1_agreement'] * 100:.2f}%")
    print(f"[export] {len(manifest['models'])} models -> {Path(args.out) / 'manifest.json'}")
    return 0


def _profile(args) -> int:
    from klas.profile import profile_zoo

    manifest = profile_zoo(args.zoo_dir, providers=args.provider, threads=args.threads, batches=args.batch,
                           warmup=args.warmup, runs=args.runs, models=args.model)
    for m in manifest["models"]:
        for r in m["latency"]:
            print(f"[profile] {m['name']:44s} {r['provider']:22s} threads {r['threads']} batch {r['batch']:3d}  "
                  f"p50 {r['p50_ms']:8.3f} p90 {r['p90_ms']:8.3f} p99 {r['p99_ms']:8.3f} ms  ({r['device']})")
    return 0


def _budget(parser) -> None:
    parser.add_argument("zoo_dir", type=Path)
    parser.add_argument("--max-flops", default=None, help="FLOPs per image, with K/M/G suffix (e.g. 40M)")
    parser.add_argument("--max-latency-ms", type=float, default=None, help="latency budget per batch (ms)")
    parser.add_argument("--min-accuracy", type=float, default=None, help="minimum test accuracy (%%)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when onnxruntime-gpu has it)")
    parser.add_argument("--threads", type=int, default=None, help="only latency measured with this many threads")
    parser.add_argument("--batch", type=int, default=1, help="batch size the latency budget is for")
    parser.add_argument("--stat", default="p90", choices=("p50", "p90", "p99", "mean"))


def _choose(args, with_session: bool):
    from klas.runtime import Zoo

    return Zoo(args.zoo_dir).pick(max_flops=args.max_flops, max_latency_ms=args.max_latency_ms, device=args.device,
                                  min_accuracy=args.min_accuracy, threads=args.threads, batch=args.batch,
                                  stat=args.stat, with_session=with_session)


def _pick(args) -> int:
    choice = _choose(args, with_session=False)
    print(f"{choice.entry['file']}")
    print(f"  why: {choice.reason}")
    return 0


def _predict(args) -> int:
    from klas.runtime import load_image

    choice = _choose(args, with_session=True)
    classes = choice.entry["output"]["classes"]
    print(f"[predict] model {choice.name} ({choice.reason})")
    for path in args.images:
        cls, probs = choice.predict(load_image(path, choice.entry["input"]))
        k = int(cls[0])
        label = classes[k] if k < len(classes) else str(k)
        print(f"{path}: {label} (class {k}, p={probs[0, k]:.3f})")
    return 0


def register(sub) -> None:
    ex = sub.add_parser("export", help="export a run's Pareto models and anchors to an ONNX zoo with a manifest")
    ex.add_argument("run_dir", type=Path)
    ex.add_argument("--out", type=Path, required=True, help="zoo directory (ONNX files + manifest.json)")
    ex.add_argument("--opset", type=int, default=18)
    ex.add_argument("--parity-images", type=int, default=1000, help="test images for the ONNX vs PyTorch check")
    ex.add_argument("--atol", type=float, default=1e-3, help="max |logit difference| allowed")
    ex.add_argument("--min-agreement", type=float, default=0.999, help="min top-1 agreement (fraction)")
    ex.add_argument("--accuracy-images", type=int, default=None,
                    help="test images for accuracy of models evaluation.json lacks (default: all)")
    ex.add_argument("--no-profile", action="store_true", help="skip latency measurement (run `klas profile` later)")
    ex.add_argument("--data-root", type=Path, default=None)
    _profile_flags(ex)
    ex.set_defaults(func=_export)

    pr = sub.add_parser("profile", help="measure a zoo's latency on this machine and add it to the manifest")
    pr.add_argument("zoo_dir", type=Path)
    pr.add_argument("--model", action="append", default=None, help="only this model (repeatable)")
    _profile_flags(pr)
    pr.set_defaults(func=_profile)

    pk = sub.add_parser("pick", help="the most accurate zoo model within a FLOPs / latency / accuracy budget")
    _budget(pk)
    pk.set_defaults(func=_pick)

    pd = sub.add_parser("predict", help="classify images with the model `klas pick` would choose")
    _budget(pd)
    pd.add_argument("images", nargs="+", type=Path)
    pd.set_defaults(func=_predict)


def _profile_flags(p) -> None:
    p.add_argument("--provider", action="append", default=None, help="cpu or cuda (repeatable; default: best here)")
    p.add_argument("--threads", type=int, action="append", default=None, help="intra-op threads (repeatable; 1)")
    p.add_argument("--batch", type=int, action="append", default=None, help="batch size (repeatable; 1)")
    p.add_argument("--warmup", type=int, default=20, help="untimed runs first")
    p.add_argument("--runs", type=int, default=200, help="timed runs per measurement")
