"""The search over a sweep's grid: `GridOptunaSearch` (every grid point, one Optuna study per
point for its lr / clip factor) and `GridPointASHA` (early stopping within a grid point).

Ray Tune cannot combine `grid_search` with a searcher, so `GridOptunaSearch` owns the grid: it
hands out every grid point `search.num_samples` times and asks a separate Optuna study
(`OptunaSearch`, TPE) per grid point for lr and the methods' tunable options. The full grid is always covered, and
each study learns from the trials of its own (method, beta, ...) only (docs/sweep.md).

Tune pickles both with the experiment (`Tuner.restore` unpickles them): pipeline.sweep
re-exports them under their old module so that experiments saved before this module existed
still resume.
"""
from __future__ import annotations

import math
import pickle

from ray import tune
from ray.tune.schedulers import FIFOScheduler
from ray.tune.search import Searcher

from pipeline.config import Params
from pipeline.records import TrialStatus
from pipeline.sweep.trials import method_trial_options, trial_name


def search_space(params: Params, method: str) -> dict:
    """Optuna's space at one grid point: lr log-uniform (every method), and uniform the
    method's tunable options that sweep.search.method_options gives a range."""
    search = params.sweep.search
    space = {}
    if search.lr is not None:
        space["lr"] = tune.loguniform(search.lr.low, search.lr.high)
    for option, bounds in search.method_options.get(method, {}).items():
        space[option] = tune.uniform(bounds.low, bounds.high)
    return space


class PickledState:
    """Tune saves searchers and schedulers with the experiment; these keep all their state in
    plain attributes, so the whole instance dict is what a resumed sweep needs back."""

    def save(self, checkpoint_path: str):
        with open(checkpoint_path, "wb") as fh:
            pickle.dump(self.__dict__, fh)

    def restore(self, checkpoint_path: str):
        with open(checkpoint_path, "rb") as fh:
            self.__dict__.update(pickle.load(fh))


class GridOptunaSearch(PickledState, Searcher):
    """Every grid point `num_samples` times, sample-major (all points' sample 0 first, so each
    study has feedback before its next ask); lr / tunable options from one Optuna study per point
    where a search range is given, else the defaults in `base`."""

    def __init__(self, points: list[dict], spaces: list[dict], base: dict, num_samples: int,
                 metric: str, mode: str = "min", seed: int = 0):
        from ray.tune.search.optuna import OptunaSearch
        super().__init__(metric=metric, mode=mode)
        self.points, self.base, self.num_samples = points, base, num_samples
        self.studies = [OptunaSearch(space=space, metric=metric, mode=mode, seed=seed + i)
                        if space else None for i, space in enumerate(spaces)]
        self.assigned: dict[str, int] = {}       # Ray trial id -> grid point index
        self.next_index = 0

    @property
    def total(self) -> int:
        return len(self.points) * self.num_samples

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True                              # metric, mode and space are fixed here

    def suggest(self, trial_id: str):
        if self.next_index >= self.total:
            return Searcher.FINISHED
        sample, index = divmod(self.next_index, len(self.points))
        self.next_index += 1
        point = self.points[index]
        study = self.studies[index]
        searched = study.suggest(trial_id) if study is not None else {}
        self.assigned[trial_id] = index
        config = {**self.base, **point, **searched, "sample": sample,
                  "trial_id": trial_name(point, sample, self.num_samples),
                  **method_trial_options(self.base, point["method"], searched)}
        if "betas" in point:        # packed: the ids of its per-beta trials (`trial_members`)
            config["member_ids"] = [trial_name({**point, "beta": b}, sample, self.num_samples)
                                    for b in point["betas"]]
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        index = self.assigned.get(trial_id)
        study = self.studies[index] if index is not None else None
        if study is None:
            return
        value = (result or {}).get(self.metric)
        if value is None or not math.isfinite(value) or (result or {}).get("status") != TrialStatus.RUNNING:
            study.on_trial_complete(trial_id, None, error=True)   # crashed or diverged
        else:
            study.on_trial_complete(trial_id, result)


class GridPointASHA(PickledState, FIFOScheduler):
    """ASHA early stopping among the samples of one grid point only: one `ASHAScheduler` per
    (method, beta, arch, latent_dim). A single ASHA over the sweep would compare an Echo trial
    at beta 3 with a VAE at beta 0.1 and stop whole grid points, leaving holes in the R-D curve;
    here it only stops the worse learning rates / clipping factors of a point."""

    def __init__(self, metric: str, mode: str, max_t: int, grace_period: int):
        super().__init__()
        self._metric, self._mode = metric, mode
        self.options = {"metric": metric, "mode": mode, "time_attr": "training_iteration",
                        "max_t": max_t, "grace_period": grace_period}
        self.schedulers: dict[tuple, object] = {}

    def _of(self, trial):
        from ray.tune.schedulers import ASHAScheduler
        c = trial.config
        key = (c["method"], c["beta"], c["arch"], c["latent_dim"], c.get("seed"))
        if key not in self.schedulers:
            self.schedulers[key] = ASHAScheduler(**self.options)
        return self.schedulers[key]

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True                              # fixed at construction

    def on_trial_add(self, tune_controller, trial):
        self._of(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        return self._of(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result):
        self._of(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial):
        self._of(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return f"ASHA per grid point ({len(self.schedulers)} points)"
