"""`python scripts/report.py DIR [--ewa-b B]`: PNGs and report.md for a run, a CV run or a sweep folder."""

import argparse
from pathlib import Path

from descent.report import report

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("folder", type=Path, help="a run folder, a CV run folder or a sweep folder")
parser.add_argument("--ewa-b", type=float, default=0.9, help="b of the smoothed per-step loss, in [0, 1) (0.9)")
args = parser.parse_args()
if not 0 <= args.ewa_b < 1:
    parser.error(f"--ewa-b={args.ewa_b} is not allowed: expected b in [0, 1)")
if not args.folder.is_dir():
    parser.error(f"{args.folder} is not a folder")
try:
    path = report(args.folder, b=args.ewa_b)
except FileNotFoundError as error:
    parser.error(str(error))
print(f"report: {path}")
for png in sorted(args.folder.glob("*.png")):
    print(f"  {png}")
