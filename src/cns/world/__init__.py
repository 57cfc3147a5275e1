"""The tiny world: a procedural image world with captions, a small text-to-image model
pretrained on it, and a CLIP-style evaluator for it."""
