"""`hparams_search=optuna`'s sweeper: hydra-optuna-sweeper's, ending cleanly when no trial of the study finished."""

from __future__ import annotations

import logging
from typing import Any

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper as HydraOptunaSweeper

log = logging.getLogger("descent")

# optuna 2.10's error for a study without a completed trial: in memory, and in a database (sqlite)
NO_COMPLETED_TRIAL = ("No trials are completed yet", "Record does not exist")


class OptunaSweeper(HydraOptunaSweeper):
    """Hydra's Optuna sweeper. When every trial failed, its last step (reading the study's best trial) raises
    optuna's NO_COMPLETED_TRIAL error and Hydra prints a traceback instead of the sweep's summary; here that
    ends the search with one error line, and the sweep's summary (descent.sweep.SweepSummary) still lists each
    failed job and makes the exit code 1."""

    def sweep(self, arguments: list[str]) -> Any:
        try:
            return super().sweep(arguments)
        except ValueError as error:
            if not str(error).startswith(NO_COMPLETED_TRIAL):
                raise
            log.error("hparams_search: no trial finished (all failed), so there are no best parameters")
            return None
