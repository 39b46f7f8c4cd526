"""Adapters from the `echo` library to Ray Tune, Optuna and MLflow, configured by params.yaml.

Two halves on shared modules: `pipeline.sweep` (the sweep on Ray Tune, Optuna and MLflow) and
`pipeline.results` (the evaluate and frontier stages' numbers, figures and MLflow view); neither
imports the other. Shared: `config` (params.yaml's schema), `records` (statuses, columns, file
names, MLflow tags), `mlflow_store` (the tracking store's URI, retry policy and outage check),
`stage_files`, `cli`, `colors`, `data_errors`, `method_params`.
"""