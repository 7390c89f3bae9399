"""Several processes train like one: 2 gloo processes on the CPU, each with half of a batch under
DDP, give the loss and every gradient of 1 process on the whole batch, for all three methods, with
a fixed number of collectives per step; what a run needs on disk (a CLIP download) is made once
while the others wait; and a failure in any process ends the whole torchrun job at once, with
its one line."""

import collections
import glob
import hashlib
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import randomize_  # noqa: E402
from test_clip_min import FakeResponse  # noqa: E402
from test_train import REPO, arguments  # noqa: E402

import clip_min  # noqa: E402
import evaluate  # noqa: E402
import train  # noqa: E402

TINY = clip_min.CLIPConfig(embed_dim=32, image_size=(32, 16), patch_size=8, stride=8, vision_width=64,
                           vision_layers=2, text_width=64, text_layers=2)
METHODS = {"cskt": {"depth": 2}, "dm_adapter": {}, "finetune": {}}
BATCH = 8  # the global batch: 4 pairs per process
# In float64, where the order of the sums (which depends on the thread count) no longer shows: the
# largest difference measured was 2.1e-14 with 1, 2 and 4 threads (in fp32 it was 1.7e-6).
TOLERANCE = dict(rtol=1e-10, atol=1e-12)
# The collectives of one training step, whatever the number of blocks (DDP's own gradient
# all-reduce aside): the features and identities gathered for SDM, and for DM-Adapter every
# block's routing statistics at once. Before: CSKT 5, DM-Adapter 5 + 2 per block.
COLLECTIVES_PER_STEP = {"cskt": 3, "dm_adapter": 4, "finetune": 3}


def build(method: str) -> torch.nn.Module:
    """The same model in every process: random weights everywhere (no zero-initialised layer hides
    a gradient), float64, and the training mode, as train.py runs it."""
    torch.manual_seed(0)
    model = randomize_(evaluate.build_method(method, clip_min.CLIP(TINY), METHODS[method]), seed=1)
    return model.double().train()


def the_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """images [8, 3, 32, 16], caption ids [8, 77], identities [8] with positives across the halves."""
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(BATCH, 3, *TINY.image_size, generator=generator, dtype=torch.float64)
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


def count_collectives() -> collections.Counter:
    """Counts every call of torch.distributed's collectives from now on (DDP's own gradient
    all-reduce runs in C++ and is not counted)."""
    counts = collections.Counter()
    for name in ("all_gather", "all_gather_into_tensor", "all_reduce", "broadcast", "barrier",
                 "all_gather_object", "reduce_scatter_tensor", "all_to_all_single"):
        def counted(*args, real=getattr(dist, name), **kwargs):
            counts["calls"] += 1
            return real(*args, **kwargs)
        setattr(dist, name, counted)
    return counts


def one_of_two_processes(rank: int, folder: str):
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    share = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
    results = {}
    counts = count_collectives()
    for method in METHODS:
        model = build(method)
        step_model = DistributedDataParallel(model)
        counts.clear()
        results[method] = loss_and_gradients(model, step_model, share)
        results[method]["collectives"] = counts["calls"]
    torch.save(results, os.path.join(folder, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("ddp"))
    mp.spawn(one_of_two_processes, args=(folder,), nprocs=2)
    return [torch.load(os.path.join(folder, f"rank{rank}.pt")) for rank in range(2)]


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_give_the_loss_and_gradients_of_one(two_processes, method):
    """In float64, so that it holds for any thread count (OMP_NUM_THREADS 1, 2 and 4 checked)."""
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
        assert result[method]["collectives"] == COLLECTIVES_PER_STEP[method]


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


# ------------------------------------------------------------------------------------------------
# What is made once: rank 0 first, then each machine's first process, then the rest

def make_once_in_one_of_four(rank: int, folder: str, payload: bytes, shared: bool):
    """2 machines of 2 processes (LOCAL_RANK = rank % 2), with one cache folder on a shared file
    system, or one per machine."""
    os.environ["LOCAL_RANK"] = str(rank % 2)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=4)
    clip_min.RELEASES["tiny"] = (hashlib.sha256(payload).hexdigest(), "tiny.pt")

    def download(url, timeout):
        with open(os.path.join(folder, "downloads"), "a") as file:
            file.write(f"{rank}\n")
        return FakeResponse(payload)

    clip_min.urllib.request.urlopen = download
    cache = os.path.join(folder, "cache" if shared else f"cache-of-machine-{rank // 2}")
    train.once_per_machine(lambda: clip_min.download("tiny", cache))
    dist.destroy_process_group()


@pytest.mark.parametrize("shared", [True, False])
def test_rank_0_makes_first_and_each_machine_finds_or_makes_its_own(tmp_path, shared):
    mp.spawn(make_once_in_one_of_four, args=(str(tmp_path), os.urandom(1 << 20), shared), nprocs=4)
    downloads = sorted((tmp_path / "downloads").read_text().split())
    assert downloads == (["0"] if shared else ["0", "2"])
    for cache in glob.glob(str(tmp_path / "cache*")):
        assert os.listdir(cache) == ["tiny.pt"]


# ------------------------------------------------------------------------------------------------
# A failure in any process ends the whole job at once, with its one line

FAILING = """
    import errno, os, sys, urllib.error, urllib.request
    sys.path.insert(0, {repo!r})
    import data, torch, train
    rank, case = int(os.environ["RANK"]), {case!r}
    if case == "rank 1, mid-epoch" and rank == 1:
        decode, calls = data.decode_image, []
        def decode_image(path):  # the 10th image: step 3 of the first epoch's 4
            calls.append(path)
            if len(calls) == 10:
                raise data.DataError(f"{{path}}: unreadable image: broken on purpose")
            return decode(path)
        data.decode_image = decode_image
    if case == "rank 0, saving" and rank == 0:
        def full_disk(*args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        torch.save = full_disk
    if case == "first process, once per machine" and rank == 0:
        def offline(url, timeout):
            raise urllib.error.URLError("no network on purpose")
        urllib.request.urlopen = offline
    sys.exit(train.main(sys.argv[1:]))
"""
FAILURES = {  # case: (the process that fails, the start of its one line)
    "rank 1, mid-epoch": (1, "error: process 1: {root}/CUHK-PEDES/imgs/"),
    "rank 0, saving": (0, "error: process 0: could not save {out}/best.pt: No space left on device"),
    "first process, once per machine": (0, "error: process 0: could not download ViT-B/16"),
}


@pytest.mark.parametrize("case", FAILURES)
def test_a_failure_in_one_process_ends_the_job_at_once_with_its_one_line(setup, tmp_path, case):
    """gloo shows no hang on a graceful shutdown (NCCL's does), so the exit path itself is tested
    below as well; here: the job's end, its time, and what each process prints."""
    script = tmp_path / "failing.py"
    script.write_text(textwrap.dedent(FAILING.format(repo=REPO, case=case)))
    argv = arguments(setup, tmp_path / "run", "--log-every", "1")
    if case == "first process, once per machine":
        argv = argv[:argv.index("--clip") + 1] + ["ViT-B/16"] + argv[argv.index("--clip") + 2:]
    logs = tmp_path / "logs"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               f"--log-dir={logs}", "--redirects=3", str(script), *argv]
    started = time.time()
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120,
                            env={**os.environ, "HOME": str(tmp_path)})  # no cached CLIP release
    assert time.time() - started < 60 and result.returncode != 0
    errors = {int(path.split(os.sep)[-2]): open(path).read().strip().splitlines()
              for path in glob.glob(str(logs / "*" / "attempt_0" / "*" / "stderr.log"))}
    failing, line = FAILURES[case]
    assert len(errors[failing]) == 1, errors[failing]  # its one line, printed once
    assert errors[failing][0].startswith(line.format(root=setup[0], out=tmp_path / "run")), errors[failing]
    other = errors[1 - failing]  # ended by torchrun, or stopped by the broken collective: one line
    assert other == [] or other == [f"process {1 - failing}: stopped, as a collective failed (RuntimeError): "
                                    "another process has most likely failed, see its error"], other


def test_an_error_under_torchrun_exits_at_once_without_shutting_the_group_down(monkeypatch, capsys):
    calls = []

    def exit_now(code):
        calls.append(f"exit {code}")
        raise SystemExit(code)

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroy"))
    monkeypatch.setattr(os, "_exit", exit_now)
    monkeypatch.setattr(train, "parse_args", lambda argv: train.build_parser().parse_args(["--device", "cpu"]))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")

    def failing_run(args):
        raise train.TrainingError("the loss became NaN")

    monkeypatch.setattr(train, "run", failing_run)
    with pytest.raises(SystemExit):
        train.main([])
    assert calls == ["exit 1"]  # no graceful shutdown, which with NCCL waits for the others
    assert capsys.readouterr().err == "error: process 1: the loss became NaN\n"
    monkeypatch.setattr(train, "run", lambda args: None)
    assert train.main([]) == 0 and calls == ["exit 1", "destroy"]  # a success shuts down gracefully
