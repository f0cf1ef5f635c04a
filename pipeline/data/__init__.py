"""Datasets and few-shot splits: read CoOp's datasets, draw official few-shot splits, store them as JSON."""
