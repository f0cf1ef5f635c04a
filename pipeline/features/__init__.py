"""The feature cache of frozen CLIP image features: its format, how the stage builds it, and reading it back."""
