"""DVC stage entry points, each run as `python -m stages.<name> [--params params.yaml]`."""
