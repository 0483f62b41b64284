"""Run the fuzz targets (fuzz/targets.py); ``make fuzz`` calls this.

Each target runs in its own process under atheris (coverage-guided libFuzzer, with the
shadowvmm modules instrumented) for ``--runs`` inputs, with a per-input timeout and an RSS
limit; its corpus is kept in ``fuzz/corpus/TARGET`` and a crashing input is written to
``fuzz/crashes/``. Without atheris a seeded random-bytes loop stands in. Prints one JSON
document: inputs, seconds and crashes per target, and the fds the process held at start
and at the end (a leak shows there).

    python fuzz/run.py                       # every target, --runs each
    python fuzz/run.py --target chains --runs 100000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

#: Inputs per target for a full run (about 1.1 M in all): the cheap pure targets get the most.
DEFAULT_RUNS = {
    "config_doc": 200_000, "config_toml": 150_000, "config_file": 50_000, "stream_bytes": 200_000,
    "device_state": 100_000, "registers": 200_000, "chains": 150_000, "vhost_user_replies": 20_000,
    "backend_channel": 50_000,
}


def child(target: str, runs: int, timeout: int) -> None:
    """Inside the per-target process: atheris over the target, or the fallback loop."""
    try:
        import atheris
    except ImportError:
        atheris = None
    if atheris is not None:
        with atheris.instrument_imports(include=["shadowvmm"]):
            from fuzz import targets
    else:
        from fuzz import targets
    function = targets.TARGETS[target]
    fds_start = len(os.listdir("/proc/self/fd"))
    if atheris is None:
        rnd = random.Random(target)
        for _ in range(runs):
            function(bytes(rnd.getrandbits(8) for _ in range(rnd.randrange(512))))
        print(json.dumps({"inputs": runs, "fds_start": fds_start, "fds_end": len(os.listdir("/proc/self/fd"))}))
        return
    corpus = HERE / "corpus" / target
    corpus.mkdir(parents=True, exist_ok=True)
    crashes = HERE / "crashes"
    crashes.mkdir(exist_ok=True)
    import atexit
    atexit.register(lambda: print(json.dumps({"fds_start": fds_start,
                                              "fds_end": len(os.listdir("/proc/self/fd"))}), flush=True))
    atheris.Setup([sys.argv[0], f"-runs={runs}", f"-timeout={timeout}", "-rss_limit_mb=4096", "-max_len=4096",
                   f"-artifact_prefix={crashes}/{target}-", "-print_final_stats=1", str(corpus)],
                  function)
    atheris.Fuzz()


def parent(targets: list[str], runs: int | None, timeout: int) -> int:
    results = []
    failed = False
    for target in targets:
        count = runs if runs is not None else DEFAULT_RUNS[target]
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, __file__, "--child", target, "--runs", str(count),
                               "--timeout", str(timeout)], capture_output=True, text=True, cwd=ROOT)
        seconds = time.monotonic() - t0
        out = proc.stdout + proc.stderr
        executed = re.search(r"stat::number_of_executed_units:\s*(\d+)", out)
        fds = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        inputs = int(executed.group(1)) if executed else (fds[-1].get("inputs", 0) if fds else 0)
        crashed = proc.returncode != 0
        fd_leak = bool(fds) and fds[-1]["fds_end"] > fds[-1]["fds_start"] + 4
        failed |= crashed or fd_leak
        results.append({"target": target, "inputs": inputs, "seconds": round(seconds, 1),
                        "crashes": int(crashed), "fd_leak": fd_leak,
                        "detail": out[-3000:] if crashed else ""})
        print(f"{target}: {inputs} inputs in {seconds:.0f} s, {'CRASH' if crashed else 'ok'}"
              f"{', fd leak' if fd_leak else ''}", file=sys.stderr, flush=True)
    print(json.dumps({"fuzz": results, "total_inputs": sum(r["inputs"] for r in results),
                      "crashes": sum(r["crashes"] for r in results)}, indent=2))
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", action="append", help="target(s) to run (default: all)")
    parser.add_argument("--runs", type=int, help="inputs per target (default: DEFAULT_RUNS)")
    parser.add_argument("--timeout", type=int, default=10, help="seconds one input may take")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.runs, args.timeout)
        return 0
    from fuzz.targets import TARGETS
    return parent(args.target or list(TARGETS), args.runs, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
