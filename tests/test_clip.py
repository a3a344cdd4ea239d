"""FrozenCLIP (tiny open_clip config, random weights) and the text-embedding cache."""

import os

import numpy as np
import pytest
import torch

from scadfast.models.clip import (FrozenCLIP, TINY_NAME, register_tiny_config, scaled_feature_blocks,
                                  scaled_prompt_blocks)
from scadfast.models.text_cache import TextEmbeddingCache


pytestmark = pytest.mark.usefixtures("one_thread")  # fixtures one_thread, clip: conftest.py


def test_tiny_config_attributes(clip):
    import open_clip

    assert register_tiny_config() == TINY_NAME and TINY_NAME in open_clip.list_models()
    assert (clip.image_size, clip.patch_size, clip.grid, clip.width, clip.n_blocks) == (64, 8, 8, 128, 6)
    assert (clip.embed_dim, clip.context_length) == (128, 32)
    assert clip.feature_blocks == (0, 2, 4) and clip.prompt_blocks == (0, 1, 2, 3, 4)
    assert clip.name == TINY_NAME and clip.pretrained is None
    assert len(clip.mean) == 3 and len(clip.std) == 3
    assert clip.model.visual.transformer.resblocks[0].attn.num_heads == 4


def test_block_scaling_rule():
    assert scaled_feature_blocks(12) == (1, 4, 8)  # GALIP's ViT-B/32 choice is reproduced exactly
    assert scaled_prompt_blocks(12) == tuple(range(1, 9))
    assert scaled_feature_blocks(6) == (0, 2, 4)
    assert scaled_feature_blocks(24) == (2, 8, 17) and scaled_prompt_blocks(24) == tuple(range(2, 18))
    assert scaled_feature_blocks(2) == (0, 1) and scaled_feature_blocks(1) == (0,)


def test_frozen_and_always_eval(clip):
    assert all(not p.requires_grad for p in clip.parameters())
    clip.train()
    assert not clip.training and not any(m.training for m in clip.modules())


def test_text_embedding_is_projected_eot_token(clip):
    caps = ["a red circle", "a small blue square at the top left"]
    tok = clip.tokenize(caps)
    assert tok.shape == (2, 32) and tok.dtype == torch.int64
    s = clip.encode_text(tok)
    assert s.shape == (2, 128)
    # Independent computation: run the text transformer and take the EOT position by hand.
    m = clip.model
    with torch.no_grad():
        x = m.token_embedding(tok) + m.positional_embedding
        x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask))
        eot = (tok == 49407).int().argmax(1)
        ref = x[torch.arange(2), eot] @ m.text_projection
    torch.testing.assert_close(s, ref)
    with pytest.raises(TypeError):
        clip.tokenize("not a list")


def test_to_clip_input(clip):
    x = torch.full((1, 3, 64, 64), -1.0)
    mean = torch.tensor(clip.mean).view(1, 3, 1, 1)
    std = torch.tensor(clip.std).view(1, 3, 1, 1)
    torch.testing.assert_close(clip.to_clip_input(x), ((0 - mean) / std).expand(1, 3, 64, 64))
    torch.testing.assert_close(clip.to_clip_input(-x), ((1 - mean) / std).expand(1, 3, 64, 64))
    assert clip.to_clip_input(torch.zeros(2, 3, 96, 80)).shape == (2, 3, 64, 64)
    with pytest.raises(ValueError, match="B, 3, H, W"):
        clip.to_clip_input(torch.zeros(3, 64, 64))


def test_image_features_match_open_clip(clip):
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    feats, emb = clip.image_features(x)
    assert feats.shape == (2, 3, 128, 8, 8) and emb.shape == (2, 128)
    with torch.no_grad():
        out = clip.model.visual.forward_intermediates(clip.to_clip_input(x), indices=list(clip.feature_blocks))
        ref_emb = clip.model.encode_image(clip.to_clip_input(x))
    torch.testing.assert_close(feats, torch.stack(out["image_intermediates"], 1))
    torch.testing.assert_close(emb, ref_emb)
    torch.testing.assert_close(clip.image_embed(x), ref_emb)


def test_gradients_flow_through_frozen_clip(clip):
    x = (torch.rand(2, 3, 64, 64) * 2 - 1).requires_grad_(True)
    feats, emb = clip.image_features(x)
    (feats.square().mean() + emb.sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    f1 = torch.randn(2, 128, 8, 8, requires_grad=True)
    pr = torch.randn(2, 5, 128, requires_grad=True)
    out = clip.mapper(f1, pr)
    assert out.shape == (2, 128, 8, 8)
    out.square().mean().backward()
    assert f1.grad.abs().sum() > 0 and pr.grad.abs().sum() > 0
    assert all(p.grad is None for p in clip.parameters())
    # Every prompt token matters (each one is seen by its block's attention).
    with torch.no_grad():
        for j in range(5):
            pr2 = pr.detach().clone()
            pr2[:, j] += torch.randn_like(pr2[:, j])  # (a constant shift would vanish in LayerNorm)
            assert (clip.mapper(f1, pr2) - out).abs().max() > 1e-4
    with pytest.raises(ValueError, match="prompts must be"):
        clip.mapper(f1, pr[:, :4])


def test_mapper_and_features_handle_seq_first_layout(clip):
    """Older open_clip runs the ViT in LND layout (batch_first=False): results must not change."""
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    f1, pr = torch.randn(2, 128, 8, 8), torch.randn(2, 5, 128)
    with torch.no_grad():
        ref = clip.image_features(x), clip.mapper(f1, pr)
        tr = clip.model.visual.transformer
        try:
            tr.batch_first = False
            for blk in tr.resblocks:
                blk.attn.batch_first = False
            got = clip.image_features(x), clip.mapper(f1, pr)
        finally:
            tr.batch_first = True
            for blk in tr.resblocks:
                blk.attn.batch_first = True
    torch.testing.assert_close(got[0][0], ref[0][0])
    torch.testing.assert_close(got[0][1], ref[0][1])
    torch.testing.assert_close(got[1], ref[1])


def test_local_checkpoint_and_weights_id(clip, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(clip.model.state_dict(), path)
    c2 = FrozenCLIP(TINY_NAME, pretrained=str(path))
    for (k, a), b in zip(clip.model.state_dict().items(), c2.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert c2.weights_id().startswith("file:") and str(path) in c2.weights_id()
    assert clip.weights_id().startswith("random:")
    with pytest.raises(ValueError, match="neither a file nor a known open_clip tag"):
        FrozenCLIP(TINY_NAME, pretrained=str(tmp_path / "missing.pt"))


def test_text_cache_hit_miss_and_keys(clip, tmp_path):
    caps = ["a red circle", "a blue square", "a green triangle at the bottom"]
    cache = TextEmbeddingCache(clip, tmp_path, batch_size=2)
    e1 = cache.embed(caps)
    assert cache.last_hit is False and isinstance(e1, np.memmap) and e1.shape == (3, 128)
    with torch.no_grad():
        ref = clip.encode_text(clip.tokenize(caps)).numpy()
    np.testing.assert_allclose(np.asarray(e1), ref, rtol=1e-4, atol=1e-5)  # batched 2+1 vs 3
    e2 = TextEmbeddingCache(clip, tmp_path).embed(caps)
    assert np.array_equal(np.asarray(e2), np.asarray(e1))
    cache.embed(caps)
    assert cache.last_hit is True
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 1 and not files[0].startswith(".tmp")
    # Copy-on-write map: writing to it never reaches the file.
    e2[0, 0] = 1e6
    assert TextEmbeddingCache(clip, tmp_path).embed(caps)[0, 0] != 1e6
    # The key changes with the captions (content and order) and with the weights.
    k = cache.key(caps)
    assert cache.key(caps[::-1]) != k and cache.key(caps[:2]) != k
    assert cache.key(["ab", "c"]) != cache.key(["a", "bc"])  # caption boundaries are part of the hash
    torch.manual_seed(1)
    other = FrozenCLIP()
    assert TextEmbeddingCache(other, tmp_path).key(caps) != k
    cache.embed(caps[::-1])
    assert cache.last_hit is False and len(os.listdir(tmp_path)) == 2


def test_text_cache_key_follows_checkpoint_file(clip, tmp_path):
    path = tmp_path / "w.pt"
    torch.save(clip.model.state_dict(), path)
    c2 = FrozenCLIP(TINY_NAME, pretrained=str(path))
    cache = TextEmbeddingCache(c2, tmp_path / "cache")
    k = cache.key(["x"])
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert cache.key(["x"]) != k
