"""Where things are: the repository, the virtual environment's executables, the shared assets."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the virtual environment's bin: snakemake, dvc, carlrar
SHARED = Path(os.environ.get("CARLRAR_SHARED", ROOT.parent / "shared"))  # albert/ (config and tokenizer)
FIXTURE_RAW = ROOT / "tests" / "fixtures" / "raw"  # invented rows in the datasets' official formats (committed)
