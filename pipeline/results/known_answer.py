"""The known-answer check in the evaluate stage: where the data set declares its rate-distortion
function (echo.known_answer; the sources binary_source and gaussian_source), every evaluated
trial gets the true curve's distortion at its test rate, its excess over the curve (nats), the
excess's standard error over the test examples and `below_curve`, True when the point lies
below the curve by more than echo.known_answer.FLAG_Z standard errors. Such a point cannot be
achieved: its rate is wrong or its estimate biased, and it is printed loudly on stderr. Other
data sets get empty columns. `true_curve` is the curve a figure draws beside the methods'.
"""
from __future__ import annotations

import sys

from echo.checkpoint import run_likelihood
from echo.known_answer import (FLAG_Z, RDCurve, check_points, dataset_curve, per_example,
                               point_error)
from echo.settings import TrainConfig

KNOWN_ANSWER_COLUMNS = ("curve_distortion", "excess", "excess_se", "below_curve")


def known_answer_columns(model, config, x, batch_size: int, row: dict) -> dict:
    """The columns of one evaluated trial (`row`: its test rate and distortion), from one more
    pass over the test set for the per-example spread; {} where no curve is known."""
    curve = dataset_curve(config.dataset, model.likelihood)
    if curve is None:
        return {}
    rates, distortions = per_example(model, x, batch_size, config.beta)
    error = point_error(curve, rates, distortions)
    checked = check_points(curve, row["rate"], row["distortion"], error)
    columns = {"curve_distortion": float(checked["curve_distortion"]),
               "excess": float(checked["excess"]), "excess_se": error,
               "below_curve": bool(checked["below"])}
    if columns["below_curve"]:
        print(f"KNOWN-ANSWER CHECK FAILED: {config.method} (beta={config.beta:g}, seed="
              f"{config.seed}, rate {model.rate_kind}) lies {-columns['excess']:.3f} nats below "
              f"the true rate-distortion curve of {config.dataset} at rate {row['rate']:.3f} "
              f"(more than {FLAG_Z:g} x its standard error {error:.3f}): a wrong rate or a "
              f"biased estimate", file=sys.stderr)
    return columns



def true_curve(params) -> RDCurve | None:
    """The known R-D curve of params.yaml's data set under the decoder its trials use
    (train.likelihood / gaussian_tau, else the data set's own), or None: for the frontier
    figure, `ax.plot(r, curve.distortion_at(r))`."""
    config = TrainConfig(dataset=params.data.dataset, likelihood=params.train.likelihood,
                         gaussian_tau=params.train.gaussian_tau)
    return dataset_curve(config.dataset, run_likelihood(config))
