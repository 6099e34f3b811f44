import torch

# the machine is small and shared with a background training job: keep every test single-threaded
torch.set_num_threads(1)

import pytest  # noqa: E402

from asynclane.testing import random_backbone  # noqa: E402


@pytest.fixture(scope="module", params=["llada", "dream"])
def backbone(request):
    """A tiny random backbone of each family (tests run once per family)."""
    return random_backbone(request.param)


@pytest.fixture(scope="module")
def llada():
    return random_backbone("llada")


@pytest.fixture(scope="module")
def dream():
    return random_backbone("dream")
