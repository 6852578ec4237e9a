import os
from pathlib import Path

import pytest

for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_k] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def shared_data():
    """The reference data beside the repository: skipped visibly when absent, a failure under CI=true."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"shared reference data missing at {SHARED_DATA} (required under CI)")
        pytest.skip(f"shared reference data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_path():
    from sgpo.models.loading import tiny_random_path

    return str(tiny_random_path())


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_path):
    from sgpo.models.loading import load_tokenizer

    return load_tokenizer(tiny_path)


@pytest.fixture
def tiny_model(tiny_path):
    from sgpo.models.loading import load_model

    return load_model(tiny_path, device="cpu", dtype="float32")
