"""Shared test helpers: the repository on sys.path, OpenAI's reference code, random weights, what a
method trains, and a tiny dataset with a tiny CLIP for train.py and evaluate.py."""

import importlib.util
import json
import os
import sys

# One thread per process, also for the subprocesses some tests start. The tests run tiny models,
# where each operation is a few microseconds of work; on a 2-core machine a second thread adds
# more synchronisation than it saves, and with other load it made small steps 30x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import clip_min  # noqa: E402


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


def trained_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters a method trains (evaluate.is_trained, what its checkpoints save), checked to be
    exactly those it leaves with requires_grad."""
    import evaluate  # after the repository is on sys.path

    trained = {name: p for name, p in model.named_parameters() if evaluate.is_trained(name)}
    assert set(trained) == {name for name, p in model.named_parameters() if p.requires_grad}
    return trained


TINY = clip_min.CLIPConfig(embed_dim=32, image_size=(32, 16), patch_size=8, stride=8, vision_width=64,
                           vision_layers=2, text_width=64, text_layers=2)
COLOURS = ["red", "blue", "green", "black", "white", "yellow", "grey", "pink", "brown", "purple"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(root with a tiny CUHK-PEDES, path of a tiny CLIP state dict): what train.py's and
    evaluate.py's tests run on."""
    root = tmp_path_factory.mktemp("data")
    entries, generator = [], torch.Generator().manual_seed(0)
    for pid, split in enumerate(["train"] * 8 + ["val"] * 3 + ["test"] * 3, start=1):
        colour = COLOURS[pid % len(COLOURS)]
        for k in range(2):
            path = f"{split}/{pid:03d}_{k}.png"
            (root / "CUHK-PEDES" / "imgs" / split).mkdir(parents=True, exist_ok=True)
            pixels = torch.randint(0, 256, (24, 12, 3), generator=generator, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / "CUHK-PEDES" / "imgs" / path)
            entries.append({"split": split, "id": pid, "file_path": path, "processed_tokens": [],
                            "captions": [f"a person in {colour} clothes, picture {k}", f"someone wearing {colour}"]})
    (root / "CUHK-PEDES" / "reid_raw.json").write_text(json.dumps(entries))
    torch.manual_seed(0)
    clip_path = root / "tiny-clip.pt"
    torch.save(clip_min.CLIP(TINY).state_dict(), clip_path)
    return root, str(clip_path)
