"""Shared test helpers: the repository on sys.path, OpenAI's reference code, random weights."""

import importlib.util
import os
import sys

# One thread per process, also for the subprocesses some tests start. The tests run tiny models,
# where each operation is a few microseconds of work; on a 2-core machine a second thread adds
# more synchronisation than it saves, and with other load it made small steps 30x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def load_openai_module(name: str):
    """clip/<name>.py from the clip-anytorch package (OpenAI's code, unchanged), loaded by path:
    the package's __init__ imports setuptools' pkg_resources, which new setuptools no longer has."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the parity oracle is missing: pip install -r tests/requirements.txt")
    path = os.path.join(spec.submodule_search_locations[0], f"{name}.py")
    module_spec = importlib.util.spec_from_file_location(f"openai_clip_{name}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def openai_model():
    return load_openai_module("model")


@pytest.fixture(scope="session")
def openai_tokenizer():
    return load_openai_module("simple_tokenizer").SimpleTokenizer()


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every tensor random (LayerNorm gains near 1), so that no zero-initialised bias hides a bug."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            noise = torch.randn(tensor.shape, generator=generator)
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight", "ln_final.weight")):
                tensor.copy_(1 + 0.1 * noise)
            else:
                tensor.copy_(0.02 * noise)
    return module
