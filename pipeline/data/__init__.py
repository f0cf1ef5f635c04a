"""Data: dataset readers, few-shot splits, images and their transforms, the demo, the paper's published numbers."""
