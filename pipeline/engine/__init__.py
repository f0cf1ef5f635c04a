"""The CoOp training engine: frozen open_clip backbone, prompt learner, fast text path, training loop."""
