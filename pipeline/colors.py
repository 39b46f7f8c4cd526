"""One colour per method, everywhere the results are drawn: results/rd_curves.png
(pipeline.results.plots) and every MLflow run of the method (its `mlflow.runColor` tag,
pipeline.sweep.tracking), so that a method looks the same in the figure and in MLflow's charts.

The paper's methods have fixed colours (matplotlib's tab10, in the order the default pipeline
lists its methods), so a method keeps its colour whatever else a sweep runs; a method added
later gets one of the rest from its name (stable across runs and machines).
"""
from __future__ import annotations

import hashlib

# matplotlib's "tab10" palette
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")
METHOD_COLORS = {"echo": PALETTE[0], "vae": PALETTE[1], "infovae": PALETTE[2],
                 "iaf-prior": PALETTE[3], "vae-vamp": PALETTE[4], "vae-maf": PALETTE[5],
                 "iaf-mmd": PALETTE[6], "iaf-vamp": PALETTE[7], "iaf-maf": PALETTE[8]}
_SPARE = tuple(c for c in PALETTE if c not in METHOD_COLORS.values())


def method_color(method: str) -> str:
    """The method's colour as "#rrggbb"."""
    method = str(method)
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    digest = int(hashlib.sha256(method.encode()).hexdigest(), 16)
    return (_SPARE or PALETTE)[digest % len(_SPARE or PALETTE)]
