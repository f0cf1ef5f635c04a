"""Command-line tools beside the DVC stages: predict, import a context, the cost model."""
