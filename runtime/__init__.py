"""Torch-free inference: backends, Recognizer, Gallery, frame sources and `dmf-run`."""
