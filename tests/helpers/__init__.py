"""Helpers shared by the test modules (importable as ``helpers``: pyproject's pytest ``pythonpath`` holds tests/).

- ``helpers.paths``: the repository root and the virtual environment's ``bin``.
- ``helpers.models``: the tiny random encoders (``TINY_BERT``, ``TINY_ALBERT``, ``RANDOM_ALBERT``, ...).
- ``helpers.configs``: the tiny training configs, built from ``config/smoke.yaml`` (``smoke_config``,
  ``tiny_config``).
- ``helpers.snakemake``: one runner for the Snakemake command line, the dry-run parsers and ``copy_workflow``.
"""
