import torch

# the machine is small and shared with a background training job: keep every test single-threaded
# (a fixture that needs more threads sets them and restores them: the torch_threads fixture below)
torch.set_num_threads(1)

import pytest  # noqa: E402

from asynclane.testing import random_backbone  # noqa: E402
# autouse: a test, module or session that changes process-global state (threads, default dtype,
# global seeds, os.environ, cwd, logging, ...) fails at teardown, and the state is restored
from state_guard import global_state_guard, global_state_guard_module, global_state_guard_session  # noqa: E402,F401

pytest_plugins = ["pytester"]  # tests/test_state_guard.py runs the guard on purpose-built leaky tests


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


@pytest.fixture
def torch_threads(request):
    """Run the test with ``request.param`` torch threads (``indirect`` parametrization); restores the count."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    try:
        yield request.param
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny():
    """The embedded tiny model (loaded once per session; samplers never modify a backbone)."""
    from asynclane.loading import load_backbone

    return load_backbone()


@pytest.fixture(scope="session")
def tiny_prompts(tiny):
    """``tiny_prompts(task, idx)``: the embedded model's chat prompt ids of held-out synthetic problems."""
    from asynclane.tiny_tokenizer import chat_prompt_ids
    from eval.tasks import synthetic

    def build(task: str, idx) -> list[list[int]]:
        probs = synthetic.test_problems(task)
        return [chat_prompt_ids(tiny.tokenizer, probs[i].prompt) for i in idx]

    return build
