"""descent: study how neural networks are optimized, on images (PyTorch Lightning + Hydra).

Importing it drops the environment variables that are set but empty (`unset_empty_variables`): it must happen
before torch and Lightning are imported, which read some of them at import.
"""

import os
from pathlib import Path

__version__ = "0.1.0"

CONF_DIR = Path(__file__).parent / "conf"  # the Hydra configs, shipped in the package (wheel included)
# variables whose empty value means "not set" (as shells, CI files and containers pass unset ones)
EMPTY_IS_UNSET_PREFIXES = ("WANDB_", "PL_", "SLURM_")
EMPTY_IS_UNSET = frozenset(
    [
        "HYDRA_FULL_ERROR",
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "NUMEXPR_NUM_THREADS",
        "CUBLAS_WORKSPACE_CONFIG",
        "RANK",
        "LOCAL_RANK",
        "NODE_RANK",
        "GROUP_RANK",
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
    ]
)


def unset_empty_variables() -> None:
    """Drop the variables named in EMPTY_IS_UNSET (or starting with one of EMPTY_IS_UNSET_PREFIXES) that are set but
    empty: wandb refuses an empty WANDB_MODE with a traceback, libgomp complains of an empty OMP_NUM_THREADS when
    torch is imported, Lightning reads an empty RANK, LOCAL_RANK or SLURM_NTASKS as a number (a traceback). An empty
    CUDA_VISIBLE_DEVICES is kept: it means no GPU."""
    for name, value in list(os.environ.items()):
        if value == "" and (name in EMPTY_IS_UNSET or name.startswith(EMPTY_IS_UNSET_PREFIXES)):
            del os.environ[name]


unset_empty_variables()
