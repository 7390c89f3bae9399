"""Tests for evaluate.py: the retrieval metrics against an independent brute-force reference and
hand-computed cases, feature extraction, and the retrieval picture."""

import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import clip_min
import evaluate
import train

# -----------------------------------------------------------------------------
# Metrics


def brute_force_metrics(similarity, query_pids, gallery_pids):
    """The metric definitions followed literally: sort each row, walk down the ranks. Ties are
    ranked by the stated rule: among equal scores the irrelevant items come first."""
    found_within = {1: [], 5: [], 10: []}
    average_precisions, inverse_negative_penalties = [], []
    for query in range(similarity.shape[0]):
        scores = similarity[query].tolist()
        is_relevant = [gallery_pids[g].item() == query_pids[query].item() for g in range(len(scores))]
        ranked_gallery = sorted(range(len(scores)), key=lambda g: (-scores[g], is_relevant[g]))
        matches = [is_relevant[g] for g in ranked_gallery]
        if not any(matches):
            continue
        for k in found_within:
            found_within[k].append(any(matches[:k]))
        matches_so_far, precisions = 0, []
        for rank, is_match in enumerate(matches):
            if is_match:
                matches_so_far += 1
                precisions.append(matches_so_far / (rank + 1))
                last_match_rank = rank
        average_precisions.append(sum(precisions) / len(precisions))
        inverse_negative_penalties.append(matches_so_far / (last_match_rank + 1))

    def percent(values):
        return 100 * sum(values) / len(values)

    return {"R1": percent(found_within[1]), "R5": percent(found_within[5]),
            "R10": percent(found_within[10]), "mAP": percent(average_precisions),
            "mINP": percent(inverse_negative_penalties), "num_queries": len(average_precisions),
            "num_skipped": similarity.shape[0] - len(average_precisions)}


def assert_metrics_equal(actual, expected):
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, abs=1e-9), key


def random_problem(num_queries, num_gallery, num_identities, seed):
    """Distinct scores in every row (a permutation of integers, exact in fp32): no ties."""
    generator = torch.Generator().manual_seed(seed)
    similarity = torch.randperm(num_queries * num_gallery, generator=generator).float()
    query_pids = torch.randint(num_identities, (num_queries,), generator=generator)
    gallery_pids = torch.randint(num_identities, (num_gallery,), generator=generator)
    return similarity.view(num_queries, num_gallery), query_pids, gallery_pids


@pytest.mark.parametrize("num_queries, num_gallery, num_identities, chunk_size", [
    (7, 5, 3, 2),
    (50, 40, 10, 16),
    (200, 300, 30, 64),
    (64, 120, 100, 7),      # many queries have no relevant gallery item
    (31, 500, 4, 1),        # ~125 relevant items per query, one query per chunk
])
def test_metrics_match_brute_force(num_queries, num_gallery, num_identities, chunk_size):
    problem = random_problem(num_queries, num_gallery, num_identities, seed=num_queries)
    expected = brute_force_metrics(*problem)
    assert_metrics_equal(evaluate.retrieval_metrics(*problem, chunk_size=chunk_size), expected)
    assert_metrics_equal(evaluate.retrieval_metrics(*problem, chunk_size=num_queries), expected)


def test_image_to_text_is_the_transpose():
    similarity, caption_pids, image_pids = random_problem(60, 25, 8, seed=1)
    expected = brute_force_metrics(similarity.T.contiguous(), image_pids, caption_pids)
    # A transposed view has strided rows: the metric must read them correctly.
    assert_metrics_equal(evaluate.retrieval_metrics(similarity.T, image_pids, caption_pids, chunk_size=4),
                         expected)


def tied_problem(num_captions, num_images, num_identities, seed):
    """Scores from 4 values (many ties in every row) and identities drawn separately for captions
    and images, so that some captions have no image of their identity and some images no caption."""
    generator = torch.Generator().manual_seed(seed)
    similarity = torch.randint(4, (num_captions, num_images), generator=generator).float() / 4
    caption_pids = torch.randint(num_identities, (num_captions,), generator=generator)
    image_pids = torch.randint(num_identities, (num_images,), generator=generator)
    return similarity, caption_pids, image_pids


@pytest.mark.parametrize("num_captions, num_images, num_identities, chunk_size", [
    (9, 6, 4, 2),
    (60, 25, 12, 4),
    (40, 90, 30, 16),
    (120, 50, 8, 7),
])
def test_both_directions_match_brute_force_with_ties_and_unmatched_queries(num_captions, num_images,
                                                                          num_identities, chunk_size):
    similarity, caption_pids, image_pids = tied_problem(num_captions, num_images, num_identities, seed=num_captions)
    expected = {"t2i": brute_force_metrics(similarity, caption_pids, image_pids),
                "i2t": brute_force_metrics(similarity.T, image_pids, caption_pids)}
    for direction, metrics in expected.items():
        assert_metrics_equal(evaluate.directional_metrics(similarity, caption_pids, image_pids, direction,
                                                          chunk_size=chunk_size), metrics)
    # i2t ranks every caption for each image: the image's own identity's captions are relevant.
    assert expected["i2t"]["num_queries"] + expected["i2t"]["num_skipped"] == num_images


def test_i2t_excludes_and_counts_images_whose_identity_has_no_caption():
    # Image 1 (identity 7) has no caption; image 0 (identity 1) finds its caption at rank 1, after
    # the caption of identity 2 it ties with: R1 = 0, AP = INP = 1/2.
    similarity = torch.tensor([[0.5, 0.9],     # caption of identity 1
                               [0.5, 0.1]])    # caption of identity 2
    metrics = evaluate.directional_metrics(similarity, torch.tensor([1, 2]), torch.tensor([1, 7]), "i2t")
    assert_metrics_equal(metrics, {"R1": 0.0, "R5": 100.0, "R10": 100.0, "mAP": 50.0, "mINP": 50.0,
                                   "num_queries": 1, "num_skipped": 1})
    with pytest.raises(ValueError, match="unknown direction"):
        evaluate.directional_metrics(similarity, torch.tensor([1, 2]), torch.tensor([1, 7]), "t2t")


def test_half_precision_scores_give_the_same_metrics():
    similarity, query_pids, gallery_pids = random_problem(20, 30, 5, seed=2)
    similarity = similarity / similarity.max()
    bf16 = similarity.bfloat16()
    assert_metrics_equal(evaluate.retrieval_metrics(bf16, query_pids, gallery_pids),
                         evaluate.retrieval_metrics(bf16.float(), query_pids, gallery_pids))


# Gallery of 12 items ranked by index (item 0 scores highest) for every query.
HAND_GALLERY_PIDS = torch.tensor([2, 9, 9, 9, 9, 9, 1, 9, 9, 9, 9, 1])
HAND_SIMILARITY_ROW = torch.linspace(1.0, 0.0, 12)


def test_one_query_by_hand():
    # Identity 1 is at ranks 6 and 11 (0-based):
    # R1 = R5 = 0 (first match at rank 6), R10 = 100,
    # AP = (1/7 + 2/12) / 2 (precision at rank 6 is 1 match of 7, at rank 11 2 of 12),
    # INP = 2 / 12 (2 matches, the last one at rank 11).
    metrics = evaluate.retrieval_metrics(HAND_SIMILARITY_ROW[None], torch.tensor([1]), HAND_GALLERY_PIDS)
    assert_metrics_equal(metrics, {"R1": 0.0, "R5": 0.0, "R10": 100.0,
                                   "mAP": 100 * (1 / 7 + 2 / 12) / 2, "mINP": 100 * 2 / 12,
                                   "num_queries": 1, "num_skipped": 0})


def test_relevant_at_ranks_zero_and_two_by_hand():
    # Relevant at ranks 0 and 2: AP = (1/1 + 2/3) / 2 = 5/6, INP = 2/3.
    similarity = torch.tensor([[0.9, 0.8, 0.7, 0.1]])
    metrics = evaluate.retrieval_metrics(similarity, torch.tensor([1]), torch.tensor([1, 2, 1, 3]))
    assert_metrics_equal(metrics, {"R1": 100.0, "R5": 100.0, "R10": 100.0, "mAP": 100 * 5 / 6,
                                   "mINP": 100 * 2 / 3, "num_queries": 1, "num_skipped": 0})


def test_queries_without_relevant_items_are_excluded_and_counted():
    # Query identities 1 and 2 as in the hand cases above; identities 5 and 7 have no gallery
    # item. Identity 2 is at rank 0 only: AP = INP = 1. The means run over the two measured
    # queries: R1 = R5 = (0 + 1)/2, R10 = 1, mAP = ((1/7 + 2/12)/2 + 1)/2, mINP = (2/12 + 1)/2.
    similarity = HAND_SIMILARITY_ROW.repeat(4, 1)
    metrics = evaluate.retrieval_metrics(similarity, torch.tensor([5, 1, 7, 2]), HAND_GALLERY_PIDS,
                                         chunk_size=3)
    assert_metrics_equal(metrics, {"R1": 50.0, "R5": 50.0, "R10": 100.0,
                                   "mAP": 100 * ((1 / 7 + 2 / 12) / 2 + 1) / 2,
                                   "mINP": 100 * (2 / 12 + 1) / 2, "num_queries": 2, "num_skipped": 2})


def test_no_measurable_query_gives_nan_not_a_crash():
    metrics = evaluate.retrieval_metrics(torch.rand(3, 4), torch.tensor([7, 8, 9]), torch.tensor([1, 1, 2, 2]))
    assert metrics["num_queries"] == 0 and metrics["num_skipped"] == 3
    assert all(math.isnan(metrics[key]) for key in ("R1", "R5", "R10", "mAP", "mINP"))


def test_a_relevant_item_tied_with_irrelevant_ones_ranks_after_them():
    # Items 0 and 2 (relevant) tie with item 1 (irrelevant): the irrelevant one goes first, so
    # the relevant items take ranks 1 and 2: R1 = 0, AP = (1/2 + 2/3) / 2, INP = 2/3.
    expected = {"R1": 0.0, "R5": 100.0, "R10": 100.0, "mAP": 100 * (1 / 2 + 2 / 3) / 2,
                "mINP": 100 * 2 / 3, "num_queries": 1, "num_skipped": 0}
    similarity = torch.tensor([[0.5, 0.5, 0.5, 0.1]])
    gallery_pids = torch.tensor([1, 2, 1, 3])
    assert_metrics_equal(evaluate.retrieval_metrics(similarity, torch.tensor([1]), gallery_pids), expected)
    # The rule does not depend on the gallery order.
    for order in ([1, 0, 2, 3], [2, 1, 0, 3], [3, 1, 2, 0]):
        assert_metrics_equal(evaluate.retrieval_metrics(similarity[:, order], torch.tensor([1]),
                                                        gallery_pids[order]), expected)


def test_relevant_items_tied_with_each_other_take_consecutive_ranks():
    # Ranks 0 and 1: AP = (1/1 + 2/2) / 2 = 1, INP = 2/2 = 1.
    metrics = evaluate.retrieval_metrics(torch.tensor([[0.9, 0.9, 0.1]]), torch.tensor([1]),
                                         torch.tensor([1, 1, 2]))
    assert metrics["R1"] == 100.0 and metrics["mAP"] == 100.0 and metrics["mINP"] == 100.0


def test_constant_scores_rank_every_relevant_item_last():
    # A collapsed model: all 10 scores equal, 3 relevant items at ranks 7, 8, 9.
    # AP = (1/8 + 2/9 + 3/10) / 3, INP = 3/10, R1 = R5 = 0, R10 = 100.
    metrics = evaluate.retrieval_metrics(torch.zeros(1, 10), torch.tensor([1]),
                                         torch.tensor([0, 1, 0, 0, 1, 0, 0, 1, 0, 0]))
    assert_metrics_equal(metrics, {"R1": 0.0, "R5": 0.0, "R10": 100.0,
                                   "mAP": 100 * (1 / 8 + 2 / 9 + 3 / 10) / 3, "mINP": 100 * 3 / 10,
                                   "num_queries": 1, "num_skipped": 0})


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="does not match"):
        evaluate.retrieval_metrics(torch.rand(3, 4), torch.tensor([1, 2]), torch.tensor([1, 2, 3, 4]))
    with pytest.raises(ValueError, match="NaN"):
        evaluate.retrieval_metrics(torch.tensor([[0.1, float("nan")]]), torch.tensor([1]), torch.tensor([1, 2]))


# -----------------------------------------------------------------------------
# Several runs: mean and sample standard deviation, what each was selected on


def run_metrics(r1, map_):
    return {"R1": r1, "R5": r1 + 10, "R10": r1 + 20, "mAP": map_, "mINP": map_ / 2, "num_queries": 6, "num_skipped": 0}


def test_mean_and_sample_std_of_runs():
    # R1 60, 62, 67: mean 63, deviations -3, -1, 4, sample variance (9 + 1 + 16) / 2 = 13.
    summary = evaluate.mean_and_std([run_metrics(60.0, 50.0), run_metrics(62.0, 50.0), run_metrics(67.0, 53.0)])
    assert summary["num_runs"] == 3
    assert summary["R1"] == pytest.approx((63.0, math.sqrt(13.0)))
    assert summary["R10"] == pytest.approx((83.0, math.sqrt(13.0)))
    assert summary["mAP"] == pytest.approx((51.0, math.sqrt(3.0)))   # (1 + 1 + 4) / 2
    with pytest.raises(ValueError, match="at least 2 runs"):
        evaluate.mean_and_std([run_metrics(60.0, 50.0)])


def test_a_table_shows_a_mean_and_std_row_beside_plain_rows():
    table = evaluate.format_table({"a.pt": run_metrics(60.0, 50.0), "b.pt": run_metrics(62.0, 50.0),
                                   "mean ± std of 2 runs": evaluate.mean_and_std([run_metrics(60.0, 50.0),
                                                                                  run_metrics(62.0, 50.0)])})
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in table.splitlines()]
    assert rows[0] == ["", "R1", "R5", "R10", "mAP", "mINP"]
    assert rows[2] == ["a.pt", "60.00", "70.00", "80.00", "50.00", "25.00"]
    assert rows[4] == ["mean ± std of 2 runs", f"61.00 ± {math.sqrt(2):.2f}", f"71.00 ± {math.sqrt(2):.2f}",
                       f"81.00 ± {math.sqrt(2):.2f}", "50.00 ± 0.00", "25.00 ± 0.00"]
    assert len({len(line) for line in table.splitlines()}) == 1  # the columns line up


def fake_checkpoint(epoch, best_epoch, best_r1, epochs=10, data="CUHK-PEDES", method="cskt", image_size=(384, 128)):
    """The fields train.py writes that the table reads (0-based epochs, as saved)."""
    return {"epoch": epoch, "best": {"epoch": best_epoch, "R1": best_r1}, "args": {"epochs": epochs},
            "data": data, "method": method, "clip": {"image_size": list(image_size), "stride": 16}}


def test_what_a_checkpoint_was_selected_on():
    assert evaluate.selected_on(fake_checkpoint(6, 6, 48.2)) == "val R1 48.20 at epoch 7 of 10"
    assert (evaluate.selected_on(fake_checkpoint(9, 9, float("nan"), data="ICFG-PEDES"))
            == "the last epoch (epoch 10 of 10): ICFG-PEDES has no val split")
    # last.pt: the last epoch saved, which need not be the best one.
    assert (evaluate.selected_on(fake_checkpoint(9, 6, 48.2))
            == "nothing: epoch 10 of 10, the last saved (val's best was R1 48.20 at epoch 7)")
    assert (evaluate.selected_on(fake_checkpoint(0, -1, -1.0))
            == "nothing: epoch 1 of 10, saved before any val evaluation")
    assert evaluate.selected_on({"args": {}}) == "unknown: the checkpoint records no epoch"


def test_a_dataset_check_is_carried_only_when_the_run_recorded_one():
    assert evaluate.selection_record(fake_checkpoint(6, 6, 48.2)) == {"selected_on": "val R1 48.20 at epoch 7 of 10"}
    verdict = "matches the published set"
    record = evaluate.selection_record({**fake_checkpoint(6, 6, 48.2), "dataset_check": verdict})
    assert record == {"selected_on": "val R1 48.20 at epoch 7 of 10", "dataset_check": verdict}


def test_runs_of_another_method_dataset_or_image_size_are_refused_naming_the_odd_one():
    same = {f"runs/{name}/best.pt": fake_checkpoint(6, 6, 48.2) for name in "abc"}
    evaluate.check_runs_agree(same)
    for field, odd, message in [
            ("method", dict(method="dm_adapter"), "runs/b/best.pt: method dm_adapter, but runs/a/best.pt and 1 "
                                                  "other have cskt"),
            ("dataset", dict(data="RSTPReid"), "runs/b/best.pt: dataset RSTPReid, but runs/a/best.pt and 1 other "
                                               "have CUHK-PEDES"),
            ("image size", dict(image_size=(224, 224)), "runs/b/best.pt: image size 224x224 stride 16, but "
                                                        "runs/a/best.pt and 1 other have 384x128 stride 16")]:
        runs = {**same, "runs/b/best.pt": fake_checkpoint(6, 6, 48.2, **odd)}
        with pytest.raises(evaluate.CheckpointError) as error:
            evaluate.check_runs_agree(runs)
        assert str(error.value).startswith(message), field
        assert "\n" not in str(error.value)
    # The odd one out is the one that differs from most, even when it comes first.
    runs = {"x.pt": fake_checkpoint(6, 6, 48.2, method="finetune"), **same}
    with pytest.raises(evaluate.CheckpointError, match=r"^x\.pt: method finetune, but runs/a/best\.pt and 2 others"):
        evaluate.check_runs_agree(runs)


# -----------------------------------------------------------------------------
# Features


class TinyModel(nn.Module):
    """Linear image encoder with dropout (so eval mode matters), bag-of-embeddings text encoder."""

    def __init__(self, embed_dim=6):
        super().__init__()
        self.image_projection = nn.Linear(3 * 8 * 4, embed_dim)
        self.dropout = nn.Dropout(0.5)
        self.token_embedding = nn.Embedding(100, embed_dim)

    def encode_image(self, images):
        return self.image_projection(self.dropout(images.flatten(1)))

    def encode_text(self, ids):
        return self.token_embedding(ids).mean(1)


def test_extract_features_gives_normalised_features_of_the_model(capsys):
    torch.manual_seed(0)
    model = TinyModel()
    images = torch.randn(10, 3, 8, 4)
    captions = torch.randint(100, (7, clip_min.CONTEXT_LENGTH))
    # The loader contract of data.image_loader: batches of images and a message per image.
    image_loader = torch.utils.data.DataLoader(list(zip(images, [""] * len(images))), batch_size=3)
    caption_loader = torch.utils.data.DataLoader(captions, batch_size=4)
    image_features, caption_features = evaluate.extract_features(model, image_loader, caption_loader, "cpu")

    assert model.training, "the model's mode must be restored"
    assert capsys.readouterr().err == "", "small runs stay quiet"
    model.eval()
    with torch.no_grad():
        assert torch.allclose(image_features, F.normalize(model.encode_image(images), dim=-1), atol=1e-6)
        assert torch.allclose(caption_features, F.normalize(model.encode_text(captions), dim=-1), atol=1e-6)
    assert image_features.dtype == caption_features.dtype == torch.float32
    assert torch.allclose(image_features.norm(dim=-1), torch.ones(10))

    similarity = caption_features @ image_features.T
    assert similarity.shape == (7, 10)
    assert torch.allclose(similarity[2, 5], caption_features[2] @ image_features[5])


def test_extract_features_reports_progress_when_asked(capsys):
    loader = torch.utils.data.DataLoader([(image, "") for image in torch.randn(8, 3, 8, 4)], batch_size=2)
    captions = torch.utils.data.DataLoader(torch.randint(100, (2, clip_min.CONTEXT_LENGTH)), batch_size=2)
    evaluate.extract_features(TinyModel(), loader, captions, "cpu", log_every=2)
    assert capsys.readouterr().err.count("batches of images") == 2


# -----------------------------------------------------------------------------
# Pictures


def column_colours(picture, x):
    return {picture.getpixel((x, y)) for y in range(picture.height)}


def test_retrieval_grid_is_a_png_with_green_and_red_frames(tmp_path):
    gray_person = Image.new("RGB", (128, 384), (128, 128, 128))
    gray_person.save(tmp_path / "person.png")
    images = [tmp_path / "person.png", gray_person, torch.full((3, 384, 128), 0.5), gray_person, gray_person]
    correct = [True, False, True, False, False]
    path = tmp_path / "grid.png"
    evaluate.save_retrieval_grid(path, "a man in a blue jacket", images, [0.9, 0.8, 0.7, 0.6, 0.5], correct)

    picture = Image.open(path)
    assert picture.format == "PNG"
    cell_height, cell_width = 192, 64
    pitch = cell_width + evaluate.GRID_PADDING  # torchvision's make_grid: padding between and around
    assert picture.width == 5 * pitch + evaluate.GRID_PADDING
    assert picture.height > cell_height + 2 * evaluate.GRID_PADDING
    picture = picture.convert("RGB")
    for index, is_correct in enumerate(correct):
        image_left = index * pitch + evaluate.GRID_PADDING
        frame = column_colours(picture, image_left)  # the frame lies over the image's edge
        expected, other = ((evaluate.CORRECT_COLOUR, evaluate.WRONG_COLOUR) if is_correct
                           else (evaluate.WRONG_COLOUR, evaluate.CORRECT_COLOUR))
        assert expected in frame and other not in frame
        # Inside the frame: the gray person (the tensor one converts to 127, the others stay 128).
        assert column_colours(picture, image_left + cell_width // 2) & {(127, 127, 127), (128, 128, 128)}


def test_retrieval_grid_without_identities_has_no_frames_and_wraps_long_text(tmp_path):
    gray_person = Image.new("RGB", (128, 384), (128, 128, 128))
    short, long = tmp_path / "short.png", tmp_path / "long.png"
    evaluate.save_retrieval_grid(short, "a woman", [gray_person] * 3, [0.5, 0.4, 0.3])
    evaluate.save_retrieval_grid(long, "a woman with long black hair " * 8, [gray_person] * 3, [0.5, 0.4, 0.3])
    with Image.open(short) as short_picture, Image.open(long) as long_picture:
        colours = {colour for _, colour in short_picture.convert("RGB").getcolors(1 << 16)}
        assert evaluate.CORRECT_COLOUR not in colours and evaluate.WRONG_COLOUR not in colours
        assert short_picture.width == long_picture.width == evaluate.GRID_MIN_WIDTH
        assert long_picture.height > short_picture.height


def test_words_of_a_wrapped_query_stay_apart(tmp_path):
    # Pillow's built-in font draws a space 2 pixels wide, which ran the words of a line together
    # ("short sleevesand a logo"). Between two words there must be a clear gap of white columns.
    path = tmp_path / "grid.png"
    evaluate.save_retrieval_grid(path, "mmmm mmmm " * 12, [Image.new("RGB", (8, 8))], [0.5])
    with Image.open(path) as picture:
        text_rows = picture.convert("L").crop((0, 0, picture.width, 2 * evaluate.GRID_PADDING + 10))
        inked = [any(text_rows.getpixel((x, y)) < 128 for y in range(text_rows.height)) for x in range(text_rows.width)]
    gaps, run = [], 0
    for is_inked in inked[evaluate.GRID_PADDING:]:
        if is_inked:
            if run:
                gaps.append(run)
            run = 0
        else:
            run += 1
    word_gaps = [gap for gap in gaps if gap >= 5]  # within "mmmm" the strokes are 1 or 2 apart
    assert len(word_gaps) >= 3, gaps


# -----------------------------------------------------------------------------
# Device, precision and checkpoints (train.py's and evaluate.py's shared policy)


def test_a_gpu_is_this_process_s_and_must_exist(monkeypatch):
    # torchrun gives each process its GPU as LOCAL_RANK; "auto" and an index-less "cuda" use it.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert evaluate.pick_device("auto", 3) == torch.device("cuda", 3)
    assert evaluate.pick_device("cuda", 2) == torch.device("cuda", 2)
    assert evaluate.pick_device("cuda:3", 1) == torch.device("cuda", 3)
    with pytest.raises(ValueError, match="only 4 GPU"):
        evaluate.pick_device("cuda:4")


def test_under_torchrun_a_gpu_per_process_or_one_line_saying_why_not(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="only 2 GPU.* for 4 processes; start at most 2 per machine"):
        evaluate.pick_device("auto", 3, 4)  # the 4th of 4 processes on a machine with 2 GPUs
    with pytest.raises(ValueError, match="cuda:0: under torchrun each of the 2 processes .* --device cuda or auto"):
        evaluate.pick_device("cuda:0", 1, 2)
    assert evaluate.pick_device("cuda", 1, 2) == torch.device("cuda", 1)


def test_auto_precision_is_bf16_where_the_gpu_has_it_else_fp16_and_fp32_on_the_cpu(monkeypatch):
    # bf16 units from compute capability 8 on; is_bf16_supported() would say yes to all four
    # (emulation), and it asks about the current GPU, not the one chosen.
    capabilities = {0: (7, 0), 1: (8, 0), 2: (7, 5), 3: (9, 0)}  # V100, A100, T4, H100
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda device=None: capabilities[torch.device(device).index])
    chosen = [evaluate.autocast_dtype("auto", torch.device("cuda", index)) for index in capabilities]
    assert chosen == [torch.float16, torch.bfloat16, torch.float16, torch.bfloat16]
    assert evaluate.autocast_dtype("auto", torch.device("cpu")) is None
    assert evaluate.autocast_dtype("auto", torch.device("mps")) == torch.float16
    cpu = torch.device("cpu")
    assert [evaluate.autocast_dtype(p, cpu) for p in ("fp32", "bf16", "fp16")] == [None, torch.bfloat16, torch.float16]


def test_both_scripts_make_the_device_current_and_keep_fp32_without_tf32(monkeypatch):
    current = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    evaluate.use_device(torch.device("cpu"))
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert current == []
    evaluate.use_device(torch.device("cuda", 1))
    assert current == [torch.device("cuda", 1)]


def test_fp32_autocast_leaves_the_forward_pass_in_fp32():
    a = torch.randn(4, 4)
    with evaluate.autocast(torch.device("cpu"), None):
        assert (a @ a).dtype == torch.float32
    with evaluate.autocast(torch.device("cpu"), torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16


class AdaptedModel(nn.Module):
    """A frozen backbone under the name "clip." and a trained part beside it, as CSKT and DM-Adapter."""

    def __init__(self):
        super().__init__()
        self.clip = nn.Linear(3, 3).requires_grad_(False)
        self.adapter = nn.Linear(3, 2)


def test_trained_weights_fit_only_a_model_with_exactly_those_weights():
    model = AdaptedModel()
    trained = train.trained_state(model)
    assert sorted(trained) == ["adapter.bias", "adapter.weight"]  # the backbone is not saved
    evaluate.load_trained(AdaptedModel(), trained, "best.pt")
    with pytest.raises(evaluate.CheckpointError, match=r"best\.pt does not fit this model: .*missing \['adapter\.bias'\]"):
        evaluate.load_trained(AdaptedModel(), {"adapter.weight": trained["adapter.weight"]}, "best.pt")
    with pytest.raises(evaluate.CheckpointError, match=r"unexpected weights \['extra'\]"):
        evaluate.load_trained(AdaptedModel(), {**trained, "extra": torch.zeros(1)}, "best.pt")


def test_an_interrupted_atomic_save_keeps_the_previous_file_and_no_temporary_one(tmp_path):
    path = str(tmp_path / "state.pt")
    with clip_min.atomic_file(path) as file:
        torch.save({"epoch": 1}, file)
    with pytest.raises(KeyboardInterrupt), clip_min.atomic_file(path) as file:
        file.write(b"half a file")  # then Ctrl-C
        raise KeyboardInterrupt
    assert torch.load(path, weights_only=True) == {"epoch": 1} and os.listdir(tmp_path) == ["state.pt"]
    with clip_min.atomic_file(path) as file:
        torch.save({"epoch": 2}, file)
    assert torch.load(path, weights_only=True) == {"epoch": 2} and os.listdir(tmp_path) == ["state.pt"]


def test_two_writers_of_one_file_never_share_a_temporary_file(tmp_path):
    """As two machines writing one path on a shared file system: each writes a file of its own,
    and the path holds one of them whole (a fixed "path.tmp" name mixed the two)."""
    path = str(tmp_path / "clip.pt")
    with clip_min.atomic_file(path) as first:
        first.write(b"first, ")
        with clip_min.atomic_file(path) as second:
            second.write(b"second")
        first.write(b"written last")
    assert open(path, "rb").read() == b"first, written last" and os.listdir(tmp_path) == ["clip.pt"]


def test_a_file_that_is_not_train_py_s_checkpoint_is_refused(tmp_path):
    path = tmp_path / "state_dict.pt"
    torch.save(AdaptedModel().state_dict(), path)  # a weights file, e.g. a CLIP state dict
    with pytest.raises(evaluate.CheckpointError, match="not a checkpoint written by train.py"):
        evaluate.read_checkpoint(str(path))


class RunsCodeWhenUnpickled:
    """Unpickling this calls os.mkdir(path): what a hostile best.pt could do with any function."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path):
    # Everything train.py's checkpoints hold, plus one object whose unpickling runs code: a best.pt
    # handed over by someone else must not be able to run code through evaluate.py.
    path, ran = tmp_path / "best.pt", tmp_path / "code-ran"
    torch.save({"method": "cskt", "method_args": {}, "clip": {}, "trainable": {}, "args": {},
                "payload": RunsCodeWhenUnpickled(str(ran))}, path)
    with pytest.raises(evaluate.CheckpointError, match="not a checkpoint written by train.py"):
        evaluate.read_checkpoint(str(path))
    assert not ran.exists()


def test_right_identity_is_framed_green_and_wrong_red():
    # The promise of evaluate.py --save-examples: green is the right person, red a wrong one.
    red, green, blue = evaluate.CORRECT_COLOUR
    assert green > 2 * max(red, blue)
    red, green, blue = evaluate.WRONG_COLOUR
    assert red > 2 * max(green, blue)
