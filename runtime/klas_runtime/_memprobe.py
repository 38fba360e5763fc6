"""The child process of ``klas_runtime.profile.measure_peak_memory``: one decoder, one generation, its peak memory.

Reads a JSON spec on stdin (model path and sha256, manifest entry, generation block, provider, threads, batch,
prompt length, new tokens, seed), prints one JSON line ``{"baseline_mb": ..., "peak_mb": ...}``: the maximum
resident set size (``ru_maxrss``) after the imports, and after loading the model and generating. Run by
``sys.executable -m klas_runtime._memprobe``; nothing else should call it.
"""
from __future__ import annotations

import json
import resource
import sys


def _max_rss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024  # bytes on macOS, KiB on Linux


def main() -> int:
    spec = json.loads(sys.stdin.read())
    import numpy as np
    import onnxruntime  # noqa: F401  (its import is part of the baseline, not of the model)

    from klas_runtime.errors import ZooError
    from klas_runtime.generate import Decoder
    from klas_runtime.manifest import read_regular, sha256_bytes
    from klas_runtime.session import open_session

    baseline = _max_rss_mb()
    data = read_regular(spec["model"])
    if spec.get("sha256") and sha256_bytes(data) != spec["sha256"]:
        raise ZooError(f"{spec['model']}: sha256 does not match the manifest")
    decoder = Decoder(open_session(data, spec["provider"], spec["threads"]), spec["entry"],
                      {**spec["generation"], "eos_token_id": []})
    rng = np.random.default_rng(spec["seed"])
    prompts = rng.integers(0, decoder.vocab, size=(spec["batch"], spec["prompt_tokens"])).tolist()
    decoder.generate(prompts, spec["new_tokens"], stop_ids=())
    print(json.dumps(dict(baseline_mb=baseline, peak_mb=_max_rss_mb())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
