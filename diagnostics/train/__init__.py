"""Training, evaluation, calibration, tracking and export. The only package that imports mlflow;
the clinic side (`diagnostics.serve`) never imports it."""
