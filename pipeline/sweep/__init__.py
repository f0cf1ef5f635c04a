"""Hyperparameter sweeps of CoOp on Ray Tune: search space, trials, MLflow tracking, result tables."""
