"""The training data: photos found and decoded with one-line errors, captions, aspect-ratio buckets, subjects,
cached latents and samplers whose order is a pure function of (seed, step). Knows nothing of models or training."""
