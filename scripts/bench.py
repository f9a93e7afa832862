"""`python scripts/bench.py [--scale | --sweep]`: speed and memory side by side with a plain PyTorch loop.

Default: s/epoch, samples/s and ratio for batch sizes 1, 32, 256 and full; the last line is
`overhead ratio at batch size 32: X.XX`. `--scale`: out-of-core throughput and memory. `--sweep`: launcher speed-up.
`--workflow`: the course's optimizer comparison, one job per training and replicates at once, against a hand loop.
"""

import argparse
import importlib

if __name__ == "__main__":
    # -h goes on to the chosen benchmark, whose own options it lists
    parser = argparse.ArgumentParser(add_help=False)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--scale", action="store_true", help="out-of-core throughput and memory (data=synthetic)")
    mode.add_argument("--sweep", action="store_true", help="joblib vs basic launcher on a 4-job sweep")
    mode.add_argument("--workflow", action="store_true", help="the optimizer comparison against a hand loop")
    args, rest = parser.parse_known_args()
    name = "scale" if args.scale else "sweep" if args.sweep else "workflow" if args.workflow else "loop"
    importlib.import_module(f"descent.benchmarks.{name}").main(rest)
