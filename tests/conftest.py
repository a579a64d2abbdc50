"""Shared test setup: no test touches the network.

The variables are set when this file is imported (before test modules import huggingface_hub,
which reads HF_HUB_OFFLINE at import time) and again by an autouse session fixture.
"""

import os

import pytest

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "TOKENIZERS_PARALLELISM": "false",
}
os.environ.update(OFFLINE_ENV)


@pytest.fixture(autouse=True, scope="session")
def _offline_env():
    os.environ.update(OFFLINE_ENV)
    yield
