"""`python scripts/trajectories.py [--out PNG]`: the course's pictures, drawn with the optimizers the runs use."""

import argparse
from pathlib import Path

from descent.trajectories import draw

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--out", type=Path, default=Path("logs/trajectories.png"), help="the PNG to write")
args = parser.parse_args()
args.out.parent.mkdir(parents=True, exist_ok=True)
print(f"trajectories: {draw(args.out)}")
