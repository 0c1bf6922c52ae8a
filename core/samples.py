"""Small datasets shipped inside the package, so demos and tests need no download."""

from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
CIFAKE_SAMPLE = DATA / "cifake-sample.tar.gz"
# Two single images from CIFAKE_SAMPLE (class automobile), bytes unchanged: something to give
# `fakecifar detect` straight away, and what the installed-wheel test detects.
SAMPLE_REAL = DATA / "sample-real.jpg"  # REAL/1000 (2).jpg
SAMPLE_FAKE = DATA / "sample-fake.jpg"  # FAKE/1000 (2).jpg
