"""A generated world of coloured shapes: scenes, their images and captions, all from a seed (our own data)."""
