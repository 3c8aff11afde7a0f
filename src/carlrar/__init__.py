"""carlrar: CARL and RAR (Qiu et al., Findings of ACL 2021), FreeLB, and k-PGD attacks for text classifiers.

The library is usable on its own in any PyTorch training loop; the ``carlrar`` command and the Snakemake
workflow are built on it.
"""

__version__ = "0.1.0"
