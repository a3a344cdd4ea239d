"""The shapes attribute classifier (shipped weights) and the ground-truth metrics.

Validation of the metric itself: real images rendered per prompt with the ground-truth sampler score
near-perfect alignment and near-ideal coverage; a collapsed generator (one image for every noise)
scores zero coverage.
"""

import numpy as np
import pytest
import torch

from scadfast.data import shapes as shp
from scadfast.metrics.shapes_truth import (ShapesTruthScorer, coverage_of_counts, ideal_coverage,
                                           render_prompt_images)
from scadfast import shapes_classifier as sc

# One prompt per template family: few, many and no free attributes.
PROMPTS = ["a circle", "a red square", "a small blue star at the top left",
           "a large green hexagon on the right on a noise background", "a yellow triangle on a white background"]
N = 48


@pytest.fixture(scope="module")
def clf():
    torch.manual_seed(0)
    return sc.load_or_train(cache_dir="/nonexistent-should-not-be-used", device="cpu")


def test_shipped_classifier_is_used_and_small(clf):
    import os

    assert os.path.getsize(sc.shipped_path()) < 1_000_000
    acc = clf.meta["heldout"]["accuracy"]
    assert set(acc) == set(shp.ATTRIBUTE_NAMES) | {"all"}
    assert min(acc[a] for a in shp.ATTRIBUTE_NAMES) > 0.8


def test_classifier_reads_fresh_images(clf):
    rng = np.random.default_rng(123)
    attrs = [shp.sample_attrs(rng)[0] for _ in range(64)]
    x = torch.from_numpy(np.stack([shp.render(a, 64, rng) for a in attrs])).permute(0, 3, 1, 2).float() / 127.5 - 1
    pred = clf.predict(x)
    truth = torch.tensor([[shp.ATTRIBUTES[k].index(a[k]) for k in shp.ATTRIBUTE_NAMES] for a in attrs])
    acc = (pred == truth).float().mean(0)
    assert acc.min() > 0.75, acc
    # Input checks and resizing (a 32 px image is upsampled to the classifier's 64 px).
    assert clf.predict(torch.zeros(2, 3, 32, 32)).shape == (2, 5)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        clf(torch.zeros(2, 64, 64))


def test_coverage_definition():
    assert coverage_of_counts([5, 5, 5]) == pytest.approx(1.0)
    assert coverage_of_counts([15, 0, 0]) == pytest.approx(0.0)
    # q = (1/2, 1/2, 0): TV = 1/3, max TV = 2/3 → 0.5.
    assert coverage_of_counts([4, 4, 0]) == pytest.approx(0.5)
    ideal = ideal_coverage([["color"], ["size", "position"]], n=48)
    assert 0.5 < ideal < 1.0
    assert ideal_coverage([["color"]], n=4000) > 0.95


def test_real_images_score_near_perfect(clf):
    scorer = ShapesTruthScorer(clf, PROMPTS, progress=False)
    for i, p in enumerate(PROMPTS):
        imgs = render_prompt_images(p, N, size=64, seed=i)
        scorer.add(i, imgs[:20])  # images of a prompt may arrive in several batches
        scorer.add(i, imgs[20:])
    r = scorer.result()
    assert r["n_per_prompt"] == N and r["n_prompts"] == 5 and r["n_prompts_with_free"] == 4  # the fourth prompt names every attribute
    assert r["alignment"] > 0.85, r
    assert min(r["alignment_per_attribute"].values()) > 0.85
    # Coverage of real data is close to the finite-sample ceiling.
    assert r["coverage"] > 0.85 * r["coverage_ideal"], r
    assert r["coverage"] > 0.6


def test_collapsed_generator_scores_zero_coverage(clf):
    scorer = ShapesTruthScorer(clf, PROMPTS, progress=False)
    for i, p in enumerate(PROMPTS):
        one = render_prompt_images(p, 1, size=64, seed=100 + i)
        scorer.add(i, one.expand(N, -1, -1, -1))
    r = scorer.result()
    assert r["coverage"] == pytest.approx(0.0, abs=1e-9)
    # ... while its alignment can still be high: coverage is what exposes the collapse.
    assert r["alignment"] >= 0.6


def test_rejects_non_shapes_prompts(clf):
    with pytest.raises(ValueError, match="shapes grammar"):
        ShapesTruthScorer(clf, ["a photo of a dog"], progress=False)


def test_cache_key_names_every_parameter():
    k = sc.cache_key(n=100, image_size=32, seed=5, epochs=2, batch_size=16, lr=1e-3)
    for part in ("n100", "32px", "seed5", "ep2", "bs16", "lr0.001", f"shapes-v{shp.SHAPES_VERSION}"):
        assert part in k
