"""Inference: the Python `Predictor`, the dynamic batcher and the HTTP server (application layer).

This package composes the library with `tasks` (prompts and parsing), so serving and evaluation
share one path (DESIGN.md §2). Heavy modules are imported by their users, not here.
"""
