import pytest
import torch


@pytest.fixture(scope="session")
def debug_ckpt(tmp_path_factory):
    """A tiny random checkpoint in the official folder layout, written once per test session."""
    from glmimage.random_checkpoint import make_random_checkpoint
    return make_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "debug", preset="debug", seed=0)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
    yield
