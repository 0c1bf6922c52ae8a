"""Small datasets shipped inside the package, so demos and tests need no download."""

from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
CIFAKE_SAMPLE = DATA / "cifake-sample.tar.gz"
