"""CoOp sweep pipeline: data -> frozen features -> prompt-learning engine -> Ray Tune sweep -> MLflow -> report."""
