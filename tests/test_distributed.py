"""Several processes train like one: 2 gloo processes on the CPU, each with half of a batch under
DDP, give the loss and every gradient of 1 process on the whole batch, for all three methods; and
what a run needs on disk (a CLIP download) is made by one process while the other waits."""

import hashlib
import os
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import randomize_  # noqa: E402

import clip_min  # noqa: E402
import evaluate  # noqa: E402
import train  # noqa: E402
from test_clip_min import FakeResponse  # noqa: E402

TINY = clip_min.CLIPConfig(embed_dim=32, image_size=(32, 16), patch_size=8, stride=8, vision_width=64,
                           vision_layers=2, text_width=64, text_layers=2)
METHODS = {"cskt": {"depth": 2}, "dm_adapter": {}, "finetune": {}}
BATCH = 8  # the global batch: 4 pairs per process
TOLERANCE = dict(rtol=1e-5, atol=1e-6)  # fp32 sums in another order: measured at most 2e-6 apart


def build(method: str) -> torch.nn.Module:
    """The same model in every process: random weights everywhere (no zero-initialised layer hides
    a gradient), and the training mode, as train.py runs it."""
    torch.manual_seed(0)
    model = randomize_(evaluate.build_method(method, clip_min.CLIP(TINY), METHODS[method]), seed=1)
    return model.train()


def the_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """images [8, 3, 32, 16], caption ids [8, 77], identities [8] with positives across the halves."""
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(BATCH, 3, *TINY.image_size, generator=generator)
    words = ["red coat", "blue jeans", "a black bag", "white shoes", "a grey hat"]
    ids = clip_min.tokenize([f"a person with {words[i % 5]} and {words[(3 * i + 1) % 5]}" for i in range(BATCH)])
    pids = torch.tensor([0, 1, 2, 3, 1, 0, 4, 2])  # identities 0, 1 and 2 on both processes
    return images, ids, pids


def loss_and_gradients(model: torch.nn.Module, step_model: torch.nn.Module, rows: slice) -> dict:
    images, ids, pids = the_batch()
    losses = step_model(images[rows], ids[rows], pids[rows], temperature=0.05)
    losses["loss"].backward()
    return {"losses": {k: v.detach() for k, v in losses.items()},
            "gradients": {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}}


def one_of_two_processes(rank: int, folder: str):
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    torch.set_num_threads(1)
    share = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
    results = {}
    for method in METHODS:
        model = build(method)
        results[method] = loss_and_gradients(model, DistributedDataParallel(model), share)
    torch.save(results, os.path.join(folder, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("ddp"))
    mp.spawn(one_of_two_processes, args=(folder,), nprocs=2)
    return [torch.load(os.path.join(folder, f"rank{rank}.pt")) for rank in range(2)]


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_give_the_loss_and_gradients_of_one(two_processes, method):
    model = build(method)
    one = loss_and_gradients(model, model, slice(None))
    # Most gradients are non-zero (in DM-Adapter's last blocks only the experts that the class or
    # EOT tokens chose reach the loss).
    assert sum(bool(g.abs().sum() > 0) for g in one["gradients"].values()) > len(one["gradients"]) / 2
    for rank, result in enumerate(two_processes):
        for name, value in one["losses"].items():  # SDM over all 8 pairs (and the balance over all tokens)
            torch.testing.assert_close(result[method]["losses"][name], value, **TOLERANCE,
                                       msg=lambda m: f"rank {rank}, {name}: {m}")
        for name, gradient in one["gradients"].items():
            torch.testing.assert_close(result[method]["gradients"][name], gradient, **TOLERANCE,
                                       msg=lambda m: f"rank {rank}, {name}: {m}")


def test_one_share_alone_gives_other_gradients():
    """What the gathering repairs: SDM over a share's 4 pairs is another loss than over the 8."""
    whole, share = build("cskt"), build("cskt")
    whole = loss_and_gradients(whole, whole, slice(None))["gradients"]
    share = loss_and_gradients(share, share, slice(0, BATCH // 2))["gradients"]
    assert max(float((share[name] - g).norm() / g.norm()) for name, g in whole.items()) > 0.5


def download_in_one_of_two(rank: int, folder: str, payload: bytes):
    os.environ["LOCAL_RANK"] = str(rank)  # both on one machine, as torchrun --nproc_per_node=2
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    clip_min.RELEASES["tiny"] = (hashlib.sha256(payload).hexdigest(), "tiny.pt")

    def slow_download(url, timeout):  # slow enough that an unguarded second process would start one
        with open(os.path.join(folder, "downloads"), "a") as file:
            file.write(f"rank {rank}\n")
        time.sleep(0.5)
        return FakeResponse(payload)

    clip_min.urllib.request.urlopen = slow_download
    path = train.once_per_machine(lambda: clip_min.download("tiny", os.path.join(folder, "cache")))
    with open(os.path.join(folder, f"path{rank}"), "w") as file:
        file.write(path)
    dist.destroy_process_group()


def test_one_process_downloads_while_the_other_waits(tmp_path):
    payload = os.urandom(3 << 20)  # three blocks of the download loop
    mp.spawn(download_in_one_of_two, args=(str(tmp_path), payload), nprocs=2)
    assert (tmp_path / "downloads").read_text() == "rank 0\n"
    cached = tmp_path / "cache" / "tiny.pt"
    assert os.listdir(tmp_path / "cache") == ["tiny.pt"] and cached.read_bytes() == payload
    assert (tmp_path / "path0").read_text() == (tmp_path / "path1").read_text() == str(cached)
