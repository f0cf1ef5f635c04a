"""Evaluation: zero-shot CLIP, linear probes, and the libraries of the baselines and domain-shift stages."""
