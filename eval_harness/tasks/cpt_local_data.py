"""Loader of the bundled task data, used by the task YAMLs as ``custom_dataset: !function cpt_local_data.load``.

lm-eval calls it with the task's ``metadata`` and ``dataset_kwargs`` as keyword arguments; the file
is resolved against this folder, never against the current directory.
"""

from __future__ import annotations

from pathlib import Path

import datasets

DATA_DIR = Path(__file__).resolve().parent / "data"


def load(data_file: str, split: str = "test", **_ignored) -> datasets.DatasetDict:
    path = DATA_DIR / data_file
    if not path.is_file():
        raise FileNotFoundError(f"bundled task data not found: {path}")
    ds = datasets.Dataset.from_json(str(path))
    return datasets.DatasetDict({split: ds})
