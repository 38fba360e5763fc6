"""The child process of ``klas_runtime.decoder_profile.measure_peak_memory``: one decoder, one generation, its peak memory.

Reads a JSON spec on stdin (model path and sha256, manifest entry, generation block, provider, threads, batch,
prompt length, new tokens, seed), prints one JSON line ``{"baseline_mb": ..., "peak_mb": ..., "method": ...}``.

On Linux the resident set's high-water mark is reset after the imports (``/proc/self/clear_refs``, "5"), so
``baseline_mb`` is the resident set then (``VmRSS``) and ``peak_mb`` the high-water mark (``VmHWM``) after loading
the model and generating: the imports' own transient peak does not hide a small model. Elsewhere (or where the
reset is refused) both are ``ru_maxrss``, which can only see what rises above the imports' peak. Run by
``sys.executable -m klas_runtime._memprobe``; nothing else should call it.
"""
from __future__ import annotations

import json
import resource
import sys


def _max_rss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024  # bytes on macOS, KiB on Linux


def _status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset the high-water mark of the resident set (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_mb("VmHWM") is not None and _status_mb("VmRSS") is not None


def main() -> int:
    spec = json.loads(sys.stdin.read())
    import numpy as np
    import onnxruntime  # noqa: F401  (its import is part of the baseline, not of the model)

    from klas_runtime.errors import ZooError
    from klas_runtime.generate import Decoder
    from klas_runtime.manifest import read_regular, sha256_bytes
    from klas_runtime.session import open_session

    import gc

    gc.collect()
    reset = _reset_peak()
    baseline = _status_mb("VmRSS") if reset else _max_rss_mb()
    data = read_regular(spec["model"])
    if spec.get("sha256") and sha256_bytes(data) != spec["sha256"]:
        raise ZooError(f"{spec['model']}: sha256 does not match the manifest")
    decoder = Decoder(open_session(data, spec["provider"], spec["threads"]), spec["entry"],
                      {**spec["generation"], "eos_token_id": []})
    rng = np.random.default_rng(spec["seed"])
    prompts = rng.integers(0, decoder.vocab, size=(spec["batch"], spec["prompt_tokens"])).tolist()
    decoder.generate(prompts, spec["new_tokens"], stop_ids=())
    peak = _status_mb("VmHWM") if reset else _max_rss_mb()
    print(json.dumps(dict(baseline_mb=baseline, peak_mb=peak, method="VmHWM after reset - VmRSS" if reset
                          else "ru_maxrss difference")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
