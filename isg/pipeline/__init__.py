"""Inference pipelines (wiring only): preprocess, extract, predict."""
