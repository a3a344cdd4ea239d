"""FID (Fréchet distance on known Gaussians, streaming statistics, pipeline with a test-only extractor,
refusal without the standard weights), CLIP score and PPD."""

import os

import numpy as np
import pytest
import torch
import torch.nn as nn

from scadfast.metrics import fid as fid_lib
from scadfast.metrics.features import RunningMoments, iter_image_files, list_image_files
from scadfast.metrics.ppd import CLIPImageFeatures, DINOv2Features, PPDScorer, mean_pairwise_distance


def _rand_spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# --- Fréchet distance --------------------------------------------------------------------------

def test_frechet_1d_closed_form():
    # W2² between N(m1, s1²) and N(m2, s2²) is (m1-m2)² + (s1-s2)².
    assert fid_lib.frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9.0 + 1.0)


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    m1, m2 = rng.standard_normal(16), rng.standard_normal(16)
    want = ((m1 - m2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert fid_lib.frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(want, rel=1e-10)


def test_frechet_general_matches_product_eigenvalues_and_properties():
    rng = np.random.default_rng(1)
    d = 24
    s1, s2 = _rand_spd(rng, d), _rand_spd(rng, d)
    m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
    # Independent formulation: tr sqrt(S1 S2) = Σ sqrt(eig(S1 S2)) (real, non-negative eigenvalues).
    lam = np.linalg.eigvals(s1 @ s2).real
    want = ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(lam, 0, None)).sum()
    got = fid_lib.frechet_distance(m1, s1, m2, s2)
    assert got == pytest.approx(want, rel=1e-8)
    assert fid_lib.frechet_distance(m2, s2, m1, s1) == pytest.approx(got, rel=1e-8)  # symmetric
    assert abs(fid_lib.frechet_distance(m1, s1, m1, s1)) < 1e-8  # zero on identical Gaussians
    # Rank-deficient covariance (fewer samples than dims) is fine.
    x = rng.standard_normal((5, d))
    c = np.cov(x, rowvar=False)
    assert np.isfinite(fid_lib.frechet_distance(x.mean(0), c, m1, s1))


def test_frechet_rejects_bad_shapes():
    with pytest.raises(ValueError, match="shapes disagree"):
        fid_lib.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="not symmetric"):
        fid_lib.frechet_distance(np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]), np.zeros(2), np.eye(2))


def test_running_moments_match_numpy():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((301, 7)) * 3 + 5
    m = RunningMoments(7)
    for i in range(0, 301, 64):
        m.update(torch.from_numpy(x[i:i + 64]).float())
    assert m.n == 301
    np.testing.assert_allclose(m.mean(), x.astype(np.float32).mean(0), rtol=1e-5)
    np.testing.assert_allclose(m.cov(), np.cov(x.astype(np.float32), rowvar=False), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"\(B, 7\)"):
        m.update(torch.zeros(3, 5))


# --- FID pipeline --------------------------------------------------------------------------------

class _TinyExtractor:
    """Test-only stand-in for Inception: a random conv net (NOT an FID feature space)."""

    dim = 8
    id = "test-tiny-random"
    description = "test-only random CNN"

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        for p in self.net.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.5
        self.calls = 0

    @torch.no_grad()
    def __call__(self, x):
        self.calls += 1
        return self.net(x)


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    from scadfast.data.shapes import make_shapes_dataset

    return str(make_shapes_dataset(tmp_path_factory.mktemp("data"), n=96, image_size=32, seed=3))


def test_fid_pipeline_with_test_only_extractor(shapes_dir, tmp_path):
    files = list_image_files(shapes_dir)
    assert len(files) == 96
    ext = _TinyExtractor()
    real = lambda: iter_image_files(files, batch_size=32)  # noqa: E731
    # Same images as "generated": distance ~0; noise images: clearly > 0.
    same = fid_lib.compute_fid(files, real(), cache_dir=str(tmp_path), batch_size=32, progress=False,
                               _test_only_extractor=ext)
    assert same["n_real"] == same["n_fake"] == 96 and same["dim"] == 8
    assert abs(same["fid"]) < 1e-6
    noise = [torch.rand(32, 3, 32, 32) * 2 - 1 for _ in range(3)]
    other = fid_lib.compute_fid(files, iter(noise), cache_dir=str(tmp_path), progress=False,
                                _test_only_extractor=ext)
    assert other["fid"] > 1e-2
    # The reference statistics are cached (keyed by files + extractor): the second call read them.
    cached = os.listdir(os.path.join(tmp_path, "fid_stats"))
    assert len(cached) == 1
    calls = ext.calls
    fid_lib.reference_stats(files, ext, str(tmp_path), 32, progress=False)
    assert ext.calls == calls


def test_fid_refuses_without_standard_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(fid_lib.InceptionWeightsMissing, match="--inception-weights"):
        fid_lib.find_inception_weights(None)
    with pytest.raises(fid_lib.InceptionWeightsMissing, match="never substitutes"):
        fid_lib.InceptionFeatures(str(tmp_path / "nope.pth"))
    bogus = tmp_path / fid_lib.INCEPTION_FILE
    torch.save({"w": torch.zeros(3)}, bogus)
    with pytest.raises(ValueError, match="not the standard Inception-v3"):
        fid_lib.find_inception_weights(str(bogus))


# --- CLIP score ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_clip():
    from scadfast.models.clip import FrozenCLIP

    torch.manual_seed(0)
    return FrozenCLIP("scadfast-tiny", pretrained=None)


def test_clip_score_matches_direct_cosine(tiny_clip):
    from scadfast.metrics.clip_score import clip_score, parse_clip_spec

    prompts = ["a red circle", "a blue square at the top left"]
    x = [torch.rand(5, 3, 64, 64) * 2 - 1, torch.rand(3, 3, 64, 64) * 2 - 1]
    res = clip_score(tiny_clip, prompts, [(0, x[0][:2]), (1, x[1]), (0, x[0][2:])], label="t", progress=False)
    with torch.no_grad():
        t = torch.nn.functional.normalize(tiny_clip.encode_text(tiny_clip.tokenize(prompts)), dim=-1)
        per = [100 * (torch.nn.functional.normalize(tiny_clip.image_embed(xi), dim=-1) @ t[i]) for i, xi in enumerate(x)]
    assert res["n_images"] == 8 and res["n_prompts"] == 2
    assert res["clip_score"] == pytest.approx(torch.cat(per).mean().item(), abs=1e-4)
    assert res["per_prompt"]["a red circle"] == pytest.approx(per[0].mean().item(), abs=1e-4)
    assert parse_clip_spec("ViT-B-32:openai") == ("ViT-B-32", "openai")
    assert parse_clip_spec("scadfast-tiny") == ("scadfast-tiny", None)
    with pytest.raises(ValueError):
        parse_clip_spec(":x")


# --- PPD -------------------------------------------------------------------------------------------

def test_mean_pairwise_distance_known_values():
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # cosine distances: (0,1)=1, (0,2)=2, (1,2)=1 → mean 4/3; l2: √2, 2, √2.
    assert mean_pairwise_distance(f, "cosine") == pytest.approx(4 / 3)
    assert mean_pairwise_distance(f, "l2") == pytest.approx((2 * 2 ** 0.5 + 2) / 3)
    assert mean_pairwise_distance(f[[0, 0, 0]], "cosine") == pytest.approx(0, abs=1e-12)
    with pytest.raises(ValueError, match="N >= 2"):
        mean_pairwise_distance(f[:1])
    with pytest.raises(ValueError, match="distance"):
        mean_pairwise_distance(f, "l1")


def test_ppd_fallback_backbone_and_collapse(tiny_clip):
    ext = CLIPImageFeatures(tiny_clip, "training CLIP scadfast-tiny")
    sc = PPDScorer(ext, "cosine", batch_size=4, progress=False)
    diverse = sc.add(torch.rand(6, 3, 64, 64) * 2 - 1)
    collapsed = sc.add((torch.rand(1, 3, 64, 64) * 2 - 1).expand(6, -1, -1, -1))
    assert diverse > 1e-4 and collapsed == pytest.approx(0, abs=1e-6)
    r = sc.result()
    assert r["n_per_prompt"] == 6 and r["distance"] == "cosine" and r["fallback_backbone"]
    assert "FALLBACK" in r["backbone"]
    assert r["mppd"] == pytest.approx((diverse + collapsed) / 2)
    with pytest.raises(ValueError, match="same N"):
        sc.add(torch.rand(3, 3, 64, 64))


def test_dinov2_loads_from_local_hub_dir(tmp_path):
    # A local torch hub repo with a small model under DINOv2's entry-point name (no network).
    (tmp_path / "hubconf.py").write_text(
        "import torch\n"
        "def dinov2_vits14(pretrained=True):\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 14, stride=14), torch.nn.Flatten(1), torch.nn.LazyLinear(6))\n")
    ext = DINOv2Features(str(tmp_path), device="cpu")
    f = ext(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert f.shape == (2, 6) and not ext.is_fallback and "DINOv2" in ext.description
    with pytest.raises(FileNotFoundError, match="--dinov2"):
        DINOv2Features(str(tmp_path / "missing"))


def test_plot_curves_puts_a_long_legend_beside_the_panels(tmp_path):
    """Up to 6 runs keep the legend on the first panel; more put it beside the panels (a wider PNG)."""
    from PIL import Image

    from scadfast.metrics.curves import plot_curves

    def width(n):
        recs = {f"run {i}": [{"step": s, "alignment": 0.1 * i, "coverage": 0.2} for s in (0, 10)] for i in range(n)}
        with Image.open(plot_curves(recs, str(tmp_path / f"c{n}.png"))) as im:
            return im.size[0]

    assert width(12) > width(2) + 50
