"""train.py and evaluate.py's command line, seen from outside: which split chooses the best epoch
and which one is reported, what best.pt holds when val results tie or a run is resumed, when val
is evaluated, which parameters count as biases, and the flags that must stay accepted.

A run with the same val R1 at every epoch cannot tell "the first best epoch" from "the last one",
and a resumed run compared with an uninterrupted one cannot see a mistake both share: these tests
script the val R1 (the weights still train) and check the checkpoints against it."""

import inspect
import json
import math
import os

import pytest
import torch
from conftest import TINY  # the CLIP of the `setup` fixture
from test_train import arguments, journal

import clip_min
import data
import evaluate
import train


def split_name(split):
    """The folder the fixture keeps a split's images in: 'train', 'val' or 'test'."""
    folders = {os.path.basename(os.path.dirname(path)) for path in split.image_paths}
    assert len(folders) == 1, folders
    return folders.pop()


EVALUATE_LOADERS = evaluate.evaluate_loaders  # the real one, before any test replaces it


def script_val_r1(monkeypatch, r1_values):
    """evaluate_loaders reports these R1 values, in turn, on val. Returns the list of its calls:
    (split evaluated, the model's trained weights at that moment)."""
    evaluated, values = [], iter(r1_values)

    def scripted(model, loaders, split, *args, **kwargs):
        evaluated.append((split_name(split), train.trained_state(model)))
        metrics = EVALUATE_LOADERS(model, loaders, split, *args, **kwargs)
        return {**metrics, "R1": next(values)} if evaluated[-1][0] == "val" else metrics

    monkeypatch.setattr(evaluate, "evaluate_loaders", scripted)
    return evaluated


def test_best_pt_is_the_first_best_val_epoch_and_the_test_split_is_scored_with_it(setup, tmp_path, monkeypatch):
    # A collapsed model scores R1 0 at every evaluation: the first evaluated epoch stays the best
    # (a later epoch must do better, not as well), and best.pt must exist even then.
    evaluated = script_val_r1(monkeypatch, [0.0, 0.0])
    real_sdm, temperatures = clip_min.sdm_loss, set()

    def recording_sdm(*args, **kwargs):
        bound = inspect.signature(real_sdm).bind(*args, **kwargs)
        bound.apply_defaults()
        temperatures.add(bound.arguments["temperature"])
        return real_sdm(*args, **kwargs)

    monkeypatch.setattr(clip_min, "sdm_loss", recording_sdm)
    pairs = len(data.load_dataset("CUHK-PEDES", str(setup[0])).train.captions)
    out = tmp_path / "run"
    # --batch-size = every training pair: a dataset of exactly one batch trains (1 step per epoch).
    argv = arguments(setup, out, "--epochs", "3", "--eval-every", "2", "--batch-size", str(pairs), "--temperature", "0.05")
    assert train.main(argv) == 0
    assert temperatures == {0.05}  # SDM at the temperature asked for

    # Val every 2nd epoch and always after the last one (epochs 2 and 3), then the test split once.
    assert [name for name, _ in evaluated] == ["val", "val", "test"]
    assert [e["epoch"] for e in journal(out) if e.get("split") == "val"] == [2, 3]
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["epoch"] == 1  # 0-based: epoch 2, the first with the best R1
    # The test split is scored with best.pt's weights, not the last epoch's.
    scored, last = evaluated[-1][1], torch.load(out / "last.pt", weights_only=True)["trainable"]
    assert scored.keys() == best["trainable"].keys()
    assert all(torch.equal(scored[k], best["trainable"][k]) for k in scored)
    assert not all(torch.equal(scored[k], last[k]) for k in scored)  # the two epochs differ
    # test_metrics.json is best.pt scored on the test split's own images and captions.
    reported = json.loads((out / "test_metrics.json").read_text())
    model, _ = evaluate.load_checkpoint(str(out / "best.pt"))
    test = data.load_dataset("CUHK-PEDES", str(setup[0])).test
    expected = EVALUATE_LOADERS(model, data.eval_loaders(test, (32, 16)), test, "cpu")
    assert reported.pop("published_set") is False and "NOT the published set" in reported.pop("dataset_check")
    assert reported == {"epoch": 2, "selected_on": "val R1 0.00 at epoch 2 of 3",
                        **{k: pytest.approx(v, abs=1e-9) for k, v in expected.items()}}


def test_a_resumed_run_keeps_its_schedule_and_best_epoch_and_stop_after_counts_from_the_resume(
        setup, tmp_path, monkeypatch):
    out, last = tmp_path / "run", str(tmp_path / "run" / "last.pt")
    script_val_r1(monkeypatch, [60.0])
    assert train.main(arguments(setup, out, "--epochs", "4", "--stop-after", "1")) == 0
    script_val_r1(monkeypatch, [30.0])  # epoch 2 is worse than epoch 1
    assert train.main(["--resume", last, "--stop-after", "1"]) == 0
    assert torch.load(last, weights_only=True)["epoch"] == 1  # one more epoch, not none
    best = torch.load(out / "best.pt", weights_only=True)
    assert (best["epoch"], best["best"]["R1"]) == (0, 60.0)
    script_val_r1(monkeypatch, [20.0, 10.0])
    assert train.main(["--resume", last, "--stop-after", "2"]) == 0  # a later --resume keeps the last one's
    assert json.loads((out / "test_metrics.json").read_text())["epoch"] == 1
    # lr 1e-3 over 4 epochs, 1 of warm-up from 0.1x, then cosine: 1-based epoch e > 1 has
    # 0.5 (1 + cos(pi (e - 2) / 3)), whichever invocation ran it.
    factors = [0.1, 1.0, 0.5 * (1 + math.cos(math.pi / 3)), 0.5 * (1 + math.cos(2 * math.pi / 3))]
    lrs = {e["epoch"]: e["lr"] for e in journal(out) if "lr" in e}
    assert lrs == {e: pytest.approx(1e-3 * f) for e, f in enumerate(factors, start=1)}


def test_every_bias_trains_at_the_bias_lr_without_weight_decay():
    # Fine-tuning trains every CLIP weight; the attention's fused in_proj_bias is a bias too.
    model = clip_min.CLIP(TINY)
    optimizer = train.build_optimizer(model, 3e-4, 2.0, 4e-5, (0.9, 0.999), 1e-3, torch.device("cpu"))
    weights, biases = optimizer.param_groups
    names = {id(p): name for name, p in model.named_parameters()}
    bias_names = {names[id(p)] for p in biases["params"]}
    assert bias_names == {name for name in names.values() if name.endswith("bias")}
    assert "visual.transformer.resblocks.0.attn.in_proj_bias" in bias_names
    assert len(weights["params"]) + len(biases["params"]) == len(names)
    assert (biases["lr"], biases["weight_decay"], weights["weight_decay"]) == (6e-4, 0.0, 4e-5)


def test_the_demo_has_its_own_recipe_and_a_flag_given_still_wins(tmp_path):
    # The README: 64x32 images, 12 epochs of batch 64, lr 6e-3, SDM temperature 0.04, no augmentation.
    args = train.parse_args(["--out", str(tmp_path / "run")])
    assert args.data == "demo"
    assert (args.image_size, args.epochs, args.batch_size, args.lr) == ((64, 32), 12, 64, 6e-3)
    assert (args.temperature, args.augment) == (0.04, False)
    args = train.parse_args(["--out", str(tmp_path / "run"), "--epochs", "3", "--temperature", "0.02", "--augment"])
    assert (args.epochs, args.temperature, args.augment, args.batch_size) == (3, 0.02, True, 64)


def test_dm_adapter_may_route_to_every_expert(tmp_path):
    args = train.parse_args(["--data", "CUHK-PEDES", "--method", "dm_adapter", "--top-k", "2", "--num-experts", "2",
                             "--out", str(tmp_path / "run")])
    assert (args.top_k, args.num_experts) == (2, 2)


def test_evaluate_py_scores_the_split_asked_for(setup, monkeypatch):
    root, clip_path = setup
    real, loaded = data.eval_loaders, []
    monkeypatch.setattr(data, "eval_loaders", lambda split, *a, **k: loaded.append(split_name(split)) or real(split, *a, **k))
    common = ["--method", "clip", "--clip", clip_path, "--image-size", "32", "16", "--stride", "8",
              "--root", str(root), "--workers", "0", "--data", "CUHK-PEDES"]
    assert evaluate.main(common) == 0
    assert evaluate.main([*common, "--split", "val"]) == 0
    assert loaded == ["test", "val"]  # the default is the test split


def table_row(printed, title, name):
    """The cells of row `name` in the table printed under the line starting with `title`."""
    lines = printed[printed.index(title):].splitlines()
    return next([cell.strip() for cell in line.split("|")[2:-1]] for line in lines if line.startswith(f"| {name} "))


def test_evaluate_py_reports_several_runs_as_mean_and_std_in_both_directions(setup, tmp_path, capsys):
    # Two seeds of one recipe, then the table a paper's reader would want: each run, their mean and
    # sample std, both retrieval directions, and what each checkpoint was selected on.
    paths = []
    for seed in (1, 2):
        assert train.main(arguments(setup, tmp_path / f"seed{seed}", "--epochs", "1", "--warmup-epochs", "0",
                                    "--seed", str(seed))) == 0
        paths.append(str(tmp_path / f"seed{seed}" / "best.pt"))
    reported = [json.loads((tmp_path / f"seed{seed}" / "test_metrics.json").read_text()) for seed in (1, 2)]
    val_r1 = [e["R1"] for seed in (1, 2) for e in journal(tmp_path / f"seed{seed}") if e.get("split") == "val"]
    assert [r["selected_on"] for r in reported] == [f"val R1 {r1:.2f} at epoch 1 of 1" for r1 in val_r1]
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", *paths, "--root", str(setup[0]), "--workers", "0", "--direction", "both"]) == 0
    printed = capsys.readouterr().out

    test = data.load_dataset("CUHK-PEDES", str(setup[0])).test
    i2t = []
    for path in paths:
        model, _ = evaluate.load_checkpoint(path)
        image_features, caption_features = evaluate.extract_features(model, *data.eval_loaders(test, (32, 16)), "cpu")
        similarity = caption_features @ image_features.T
        i2t.append(evaluate.directional_metrics(similarity, test.caption_pids, test.image_pids, "i2t"))
    for direction, runs in [("t2i", reported), ("i2t", i2t)]:
        title = f"{evaluate.DIRECTIONS[direction]} ({direction})"
        for path, metrics in zip(paths, runs):  # each run's row: train.py's own numbers for t2i
            assert table_row(printed, title, path) == [f"{metrics[m]:.2f}" for m in evaluate.METRIC_NAMES]
        summary = evaluate.mean_and_std(runs)
        assert table_row(printed, title, "mean ± std of 2 runs") == [
            f"{summary[m][0]:.2f} ± {summary[m][1]:.2f}" for m in evaluate.METRIC_NAMES]
    assert "text-to-image (t2i): 12 captions rank the images" in printed
    assert "image-to-text (i2t): 6 images rank the captions" in printed
    assert "sample standard deviation (n - 1) over the n = 2 runs" in printed
    for path, r in zip(paths, reported):
        assert (f"{path}: cskt trained on CUHK-PEDES, selected on {r['selected_on']}; "
                    "dataset check: CUHK-PEDES: NOT the published set") in printed

    # A run that recorded whether its dataset matched the published set says so under the table.
    checked = torch.load(paths[0], weights_only=True)
    checked["dataset_check"] = "matches the published set"
    torch.save(checked, tmp_path / "checked.pt")
    assert evaluate.main(["--checkpoint", str(tmp_path / "checked.pt"), "--root", str(setup[0]), "--workers", "0"]) == 0
    assert (f"checked.pt: cskt trained on CUHK-PEDES, selected on {reported[0]['selected_on']}; "
            "dataset check: matches the published set\n") in capsys.readouterr().out

    # A run of another dataset among them is refused, naming it, before any model is built.
    odd = torch.load(paths[1], weights_only=True)
    odd["data"] = "RSTPReid"
    torch.save(odd, tmp_path / "odd.pt")
    assert evaluate.main(["--checkpoint", *paths, str(tmp_path / "odd.pt"), "--root", str(setup[0])]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'odd.pt'}: dataset RSTPReid, but {paths[0]} and 1 other have CUHK-PEDES")
    assert len(err.strip().splitlines()) == 1
    # A run given twice would count twice in the mean.
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", *paths, paths[0]])
    assert f"argument --checkpoint: {paths[0]} is given twice" in capsys.readouterr().err
    # Pictures are of one model.
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", *paths, "--save-examples", "2"])
    assert "--save-examples, --gallery and --routing work on one checkpoint" in capsys.readouterr().err
