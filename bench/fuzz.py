"""The long profile of the pipeline fuzz (tests/fuzz/test_pipeline_fuzz.py).

The normal suite runs 25 derandomized examples; this runs thousands with a fresh seed
(printed, so a run can be repeated), shrinks whatever fails to a minimal example, and
prints how long the examples took. Keep each minimal failure it prints as a test in
tests/fuzz/test_fuzz_regressions.py.

    python bench/fuzz.py [--examples 2000] [--seed N] [--huge 65537,300000,4000000]
                         [--no-envelopes]

``--no-envelopes`` keeps every batch's envelope well-formed, to hunt what hides behind
envelope failures (junk inside events and rooms). Runs from the repository root.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--huge",
        default="65537,300000,1000000,4000000",
        help="sizes of the huge strings, in characters",
    )
    parser.add_argument("--no-envelopes", action="store_true")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    env = {
        **os.environ,
        "SURFACES_FUZZ_EXAMPLES": str(args.examples),
        "SURFACES_FUZZ_RANDOM": "1",
        "SURFACES_FUZZ_SHRINK": "1",
        "SURFACES_FUZZ_HUGE": args.huge,
        "SURFACES_FUZZ_ENVELOPES": "0" if args.no_envelopes else "1",
    }
    print(f"fuzz: {args.examples} examples, seed {seed} (repeat with --seed {seed})", flush=True)
    started = time.perf_counter()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--hypothesis-seed={seed}",
            "--hypothesis-show-statistics",
            "tests/fuzz/test_pipeline_fuzz.py",
        ],
        cwd=ROOT,
        env=env,
        check=False,
    )
    elapsed = time.perf_counter() - started
    print(
        f"fuzz: {'passed' if result.returncode == 0 else 'FAILED'} in {elapsed:.0f} s "
        f"({elapsed / args.examples * 1000:.0f} ms per example, generation included)"
    )
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
