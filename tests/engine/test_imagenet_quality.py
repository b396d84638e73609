"""Quality on the real pretrained efficientnet_lite0 (issue 2): prototypes, entanglement, isolation."""

from __future__ import annotations

import os

import pytest
import torch

from leapcore import engine, penalties
from leapcore.adapter import LogitsModel, eval_mode
from leapcore.transforms import random_resized_crop_flip

from .conftest import IMAGENET_TARGETS

pytestmark = pytest.mark.slow


def _probs(lite0, images: torch.Tensor) -> torch.Tensor:
    preprocessing, model, class_list = lite0
    wrapped = LogitsModel(model, len(class_list), preprocessing)
    with eval_mode(model), torch.no_grad():
        return wrapped(images).softmax(1)


def test_prototypes_reach_target_probability(lite0_prototypes):
    result = lite0_prototypes.prototypes
    assert result.steps <= 300
    target_probs = result.probs[torch.arange(5), IMAGENET_TARGETS]
    assert target_probs.mean() >= 0.9, target_probs


def test_prototypes_survive_random_crops_and_flips(lite0, lite0_prototypes):
    images = lite0_prototypes.prototypes.images
    gen = torch.Generator().manual_seed(0)
    draws = 8
    batch = images.repeat(draws, 1, 1, 1)  # draw-major: row = draw * 5 + target
    probs = _probs(lite0, random_resized_crop_flip(batch, gen))
    target_probs = probs[torch.arange(len(batch)), IMAGENET_TARGETS * draws]
    # 0.98 measured (100 steps of "m"); the README claims over 0.9.
    assert target_probs.mean() >= 0.85, (target_probs.mean(), target_probs.view(draws, 5).mean(0))


def test_reported_logits_match_the_images(lite0, lite0_prototypes):
    """The logits in the results are those of the saved images, through the same preprocessing."""
    result = lite0_prototypes.prototypes
    probs = _probs(lite0, result.images)
    torch.testing.assert_close(probs, result.probs, atol=1e-4, rtol=0)


def test_entanglement_of_a_class_with_itself_is_one(lite0_prototypes):
    scores = lite0_prototypes.entanglement
    own = scores[torch.arange(5), IMAGENET_TARGETS]
    torch.testing.assert_close(own, torch.ones(5), atol=0.02, rtol=0)
    # Every other class is at most as entangled as the target (its logit rose less).
    assert (scores <= own[:, None] + 1e-4).all()


BIRDS = {*range(7, 25), *range(80, 101), *range(127, 147)}
INSECTS = set(range(300, 327))


def test_entanglement_names_imagenet_neighbours(lite0_prototypes):
    """The default entanglement's strongest other class is a bird for hummingbird and an insect for
    bee (peacock 0.43 and fly 0.66 in a scratch run of this config). The probe from grey falls
    short of their prototypes' target logits in 20 steps, so the guard keeps the relaxed share
    there; with the guard switched off, bee's strongest neighbour became honeycomb (and in the
    scratch run hummingbird's became television)."""
    scores = lite0_prototypes.entanglement.clone()
    scores[torch.arange(5), IMAGENET_TARGETS] = -1
    top = scores.argmax(1).tolist()
    assert top[1] in BIRDS and top[2] in INSECTS, top


def test_probability_trajectory_rises(lite0_prototypes):
    result = lite0_prototypes.prototypes
    assert result.trajectory_steps == [0, 50, 100]
    target = result.trajectory[:, torch.arange(5), IMAGENET_TARGETS]  # [steps, 5]
    assert (target[-1] > target[0] + 0.5).all(), target


# ---------------------------------------------------------------------------------------------- #
# Isolation on real photos
# ---------------------------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def photo_isolation(lite0, photos, tmp_path_factory):
    """Sample-mode ``generate`` on both photos with the default isolation options.

    Only the top class of each photo is isolated (``max_isolate_classes=1``, a choice of classes,
    not of how they are isolated), to keep the test at two masks instead of six.
    """
    preprocessing, model, class_list = lite0
    out = tmp_path_factory.mktemp("isolation")
    config = {"output_dir": str(out), "max_isolate_classes": 1}
    df, arrays = engine.generate("photos", model, class_list, config, None, preprocessing, photos)
    return df, arrays


def test_sample_isolation_keeps_the_top_logit_with_half_the_image(photo_isolation, lite0, photos):
    df, arrays = photo_isolation
    pairs = arrays["isolation_pairs"]
    assert len(pairs) == 2
    probs = _probs(lite0, photos)
    for i in range(len(photos)):
        top = int(probs[i].argmax())
        k = [n for n, (image, c) in enumerate(pairs) if image == i and c == top]
        assert len(k) == 1
        k = k[0]
        kept = arrays["isolation_logits_isolated"][k] / abs(arrays["isolation_logits_full"][k])
        coverage = float(arrays["masks"][k].mean())
        # Issue 19: the reported mask is the smallest top share of the saliency keeping >= 90 % of
        # the logit (measured: 0.5 and 0.25 of the image with 4 px cells).
        assert kept >= 0.9, (i, kept, coverage)
        # Part of the image, not all of it: measured 0.25-0.8 (4 px cells; the ranking shifts with
        # rounding between versions and the share is read off fixed levels 0.5, 0.6, ... 1.0).
        assert coverage <= 0.8 + 1e-4, (i, kept, coverage)
        # Regions, not speckle: measured 0.015 / 0.042 (mean absolute difference of neighbouring
        # mask pixels); the top share of the unsmoothed pixel-level evidence map gave 0.19 / 0.20.
        roughness = float(penalties.high_frequency(torch.as_tensor(arrays["masks"][k])[None]))
        assert roughness < 0.1, (i, roughness)
    # Faithful ranking: deleting the top pixels first drops the probability faster than random.
    table = arrays["tables"]["isolations"]
    from leapcore.adapter import LogitsModel
    from leapcore.faithfulness import deletion_insertion_auc

    preprocessing, model, class_list = lite0
    wrapped = LogitsModel(model, len(class_list), preprocessing)
    classes = table.column("class_index").to_pylist()
    sources = photos[table.column("image_index").to_pylist()]
    noise = torch.rand(
        sources.shape[0], *sources.shape[2:], generator=torch.Generator().manual_seed(1)
    )
    with eval_mode(model), torch.no_grad():
        random_deletion, _ = deletion_insertion_auc(wrapped, sources, noise, classes)
    ours = torch.tensor(table.column("deletion_auc").to_pylist())
    # Measured: ours 0.056-0.058 (4 px cells) vs a random map's 0.07-0.08 on the same photos.
    assert (ours < 0.9 * random_deletion).all(), (ours, random_deletion)


def test_sample_isolation_inserts_better_than_the_gradient(photo_isolation, lite0, photos):
    """Issue 19: the default saliency (``isolation_map: evidence``) ranks the pixels that bring the
    class back, on a blurred photo, better than the plain input gradient (captum's ``Saliency``),
    and deletes better too. Measured (RISE, blurred substrate, 16 budgets): insertion 0.41 (0.53 /
    0.29; 0.34 with the mask x logit evidence of before), deletion 0.04 against the gradient's
    0.21 / 0.10; the soft mask alone (``isolation_map: mask``, 100 steps, the default before)
    inserted 0.19, below the gradient."""
    from leapcore.faithfulness import deletion_insertion_auc

    preprocessing, model, class_list = lite0
    table = photo_isolation[1]["tables"]["isolations"]
    classes = table.column("class_index").to_pylist()
    sources = photos[table.column("image_index").to_pylist()]
    wrapped = LogitsModel(model, len(class_list), preprocessing)
    with eval_mode(model):
        x = sources.clone().requires_grad_(True)
        wrapped(x).gather(1, torch.tensor(classes)[:, None]).sum().backward()
        gradient = x.grad.abs().sum(1)
        with torch.no_grad():
            deletion, insertion = deletion_insertion_auc(wrapped, sources, gradient, classes)
    ours_deletion = torch.tensor(table.column("deletion_auc").to_pylist())
    ours_insertion = torch.tensor(table.column("insertion_auc").to_pylist())
    assert ours_insertion.mean() > insertion.mean() + 0.05, (ours_insertion, insertion)
    assert ours_deletion.mean() < deletion.mean(), (ours_deletion, deletion)


def test_sample_isolation_frame(photo_isolation, lite0):
    df, arrays = photo_isolation
    assert {"sample_index", "output_class", "logits", "probs", "input", "mask"} <= set(df.columns)
    assert len(df) == 2
    class_list = lite0[2]
    for _, row in df.iterrows():
        assert row["output_class"] in class_list
    assert all(os.path.isfile(p) for p in df["input"])
    assert all(os.path.isfile(p) for p in df["mask"])
    # The frame's coverage agrees with the mask arrays.
    torch.testing.assert_close(
        torch.tensor(df["mask_coverage"].to_numpy()),
        torch.tensor(arrays["masks"].reshape(2, -1).mean(1), dtype=torch.float64),
        atol=1e-5,
        rtol=0,
    )


def test_hipe_mask_points_at_the_evidence(lite0, photos):
    """Deleting the top-HiPE cells drops the logit more than deleting as many random cells."""
    preprocessing, model, class_list = lite0
    probs = _probs(lite0, photos)
    top = probs.argmax(1)
    # The HiPE saliency itself (``isolation_keep: 0``), not the calibrated binary mask.
    config = {"use_hipe": True, "max_isolate_classes": 1, "isolation_keep": 0}
    audit = engine.run(model, class_list, config, None, preprocessing, photos)
    iso = audit.isolation
    assert iso.method == "hipe"
    assert iso.pairs == [(0, int(top[0])), (1, int(top[1]))]
    assert iso.masks.min() >= 0 and iso.masks.max() <= 1
    cell = 28
    grid = 224 // cell
    wrapped = LogitsModel(model, len(class_list), preprocessing)
    gen = torch.Generator().manual_seed(0)
    noise = torch.rand(photos.shape, generator=gen)
    k = grid * grid // 4
    drops_top, drops_random = [], []
    for i in range(len(photos)):
        pair, c = i, int(top[i])
        saliency = iso.masks[pair, 0].unfold(0, cell, cell).unfold(1, cell, cell).mean((-1, -2))
        chosen = [saliency.flatten().topk(k).indices]
        chosen += [torch.randperm(grid * grid, generator=gen)[:k] for _ in range(8)]
        deleted = []
        for cells in chosen:
            keep = torch.ones(grid * grid)
            keep[cells] = 0
            keep = keep.view(1, 1, grid, grid).repeat_interleave(cell, 2).repeat_interleave(cell, 3)
            deleted.append(photos[i : i + 1] * keep + noise[i : i + 1] * (1 - keep))
        with eval_mode(model), torch.no_grad():
            logits = wrapped(torch.cat(deleted))[:, c]
        full = iso.logits_full[pair]
        drops_top.append(float(full - logits[0]))
        drops_random.append(float(full - logits[1:].mean()))
    assert sum(drops_top) > sum(drops_random), (drops_top, drops_random)
