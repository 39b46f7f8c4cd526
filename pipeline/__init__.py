"""Adapters from the `echo` library to Ray Tune, Optuna and MLflow, configured by params.yaml."""
