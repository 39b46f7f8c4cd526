"""The later stages' half of pipeline/: evaluate and frontier read results/sweep.csv (its
columns are pipeline.records) and write the tables, figures and their MLflow view (`tracking`).
No Ray: it never imports pipeline.sweep."""
