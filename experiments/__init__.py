"""Experiment configs: one `get_config(arg)` file per experiment or figure.

Run every command from the repository root, which makes this directory
importable as the package `experiments` (configs share `experiments.common`).
"""
