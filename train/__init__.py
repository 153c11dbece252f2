"""Training: datasets, episode samplers, the training loop, evaluation and `dmf-train`."""
