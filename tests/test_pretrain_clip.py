"""The embedded CLIP's contrastive pretraining: loss, the shipped weights, held-out retrieval."""

import os

import pytest
import torch
import torch.nn.functional as F

from scadfast import pretrain_clip as pc
from scadfast.data import shapes as shp
from scadfast.models.clip import resolve_pretrained, shipped_weights_path


def test_multi_positive_loss_reduces_to_clip_loss():
    torch.manual_seed(0)
    i, t = F.normalize(torch.randn(6, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(10.0)
    logits = scale * i @ t.t()
    want = 0.5 * (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.t(), torch.arange(6)))
    got = pc.multi_positive_clip_loss(i, t, scale, torch.eye(6, dtype=torch.bool))
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def test_positive_mask_follows_caption_semantics():
    attrs = pc.attribute_matrix([
        {"shape": "circle", "color": "red", "size": "small", "position": "top", "background": "black"},
        {"shape": "circle", "color": "blue", "size": "large", "position": "top", "background": "white"},
    ])
    caps = ["a circle", "a red circle", "a large circle at the top", "a square"]
    pos = pc.positive_mask(attrs, pc.caption_spec_matrix(caps))
    assert pos.tolist() == [[True, True, False, False], [True, False, True, False]]


def test_resolve_pretrained():
    assert resolve_pretrained("scadfast-tiny", None) is None
    assert resolve_pretrained("scadfast-tiny", "/x/y.pt") == "/x/y.pt"
    assert resolve_pretrained("scadfast-tiny", "shapes") == shipped_weights_path()
    with pytest.raises(ValueError, match="only for"):
        resolve_pretrained("ViT-B-32", "shapes")


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    # A seed never used for training (training used seed 0, the pretraining report seed 1).
    d = shp.make_shapes_dataset(tmp_path_factory.mktemp("heldout"), n=200, image_size=64, seed=4242)
    return pc.load_shapes_images(d)


def test_shipped_weights_retrieve_heldout_captions(heldout):
    from scadfast.models.clip import FrozenCLIP

    path = shipped_weights_path()
    assert os.path.getsize(path) <= 20 * 2 ** 20
    clip = FrozenCLIP("scadfast-tiny", pretrained=path)
    rand = FrozenCLIP("scadfast-tiny", pretrained=None)
    assert clip.weights_id().startswith("file:") and rand.weights_id().startswith("random:")
    imgs, attrs, rows = heldout
    caps = [r["caption"] for r in rows]
    res = pc.retrieval_metrics(clip.model, clip._tokenizer, imgs, attrs, caps)
    # Top-1 among the distinct held-out captions must be far above chance.
    assert res["num_captions"] > 100
    assert res["caption_top1"] > 0.6 and res["caption_top1"] > 20 * res["caption_chance"], res
    for a in ("color", "size", "position", "background"):
        assert res[f"attr_{a}"] > 0.9, res
    assert res["attr_shape"] > 0.6, res
    base = pc.retrieval_metrics(rand.model, rand._tokenizer, imgs, attrs, caps)
    assert base["caption_top1"] < 0.2  # random init is near chance: the weights carry the skill


def test_frozenclip_embeddings_through_shipped_weights_match_the_task():
    from scadfast.models.clip import FrozenCLIP

    clip = FrozenCLIP("scadfast-tiny", pretrained=shipped_weights_path())
    a = {"shape": "circle", "color": "red", "size": "large", "position": "center", "background": "black"}
    x = torch.from_numpy(shp.render(a, 64)).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        img = F.normalize(clip.image_embed(x), dim=-1)
        txt = F.normalize(clip.encode_text(clip.tokenize(["a red circle", "a blue circle", "a red square"])), dim=-1)
    assert (img @ txt.t()).argmax().item() == 0


def test_pretrain_writes_open_clip_loadable_file(tmp_path):
    import open_clip

    out = tmp_path / "w.pt"
    meta = pc.pretrain(str(out), n=48, heldout=24, steps=2, batch_size=16, time_budget=60,
                       data_root=str(tmp_path / "data"), device="cpu", stream=open(os.devnull, "w"))
    assert meta["steps"] == 2 and "caption_top1" in meta["heldout_retrieval"]
    sd = torch.load(out, weights_only=True)["state_dict"]
    assert all(v.dtype == torch.float16 for v in sd.values() if v.is_floating_point())
    m = open_clip.create_model("scadfast-tiny", pretrained=str(out))
    assert torch.equal(m.token_embedding.weight.half(), sd["token_embedding.weight"])


def test_dense_heads_train_the_patch_tokens_of_their_blocks_only():
    import open_clip

    from scadfast.models.clip import register_tiny_config

    torch.manual_seed(0)
    model = open_clip.create_model(register_tiny_config(), pretrained=None)
    dense = pc.DenseHeads(model, (2, 4))
    x = torch.randn(6, 3, 64, 64)
    te = torch.nn.functional.normalize(torch.randn(6, model.text_projection.shape[1]), dim=-1)
    model.encode_image(x)
    loss = dense.loss(te, torch.tensor(10.0), torch.eye(6, dtype=torch.bool))
    loss.backward()
    res = model.visual.transformer.resblocks
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in res[4].parameters() if p.requires_grad)
    assert all(p.grad is None for p in res[5].parameters())  # after the last dense block: untouched
    assert model.visual.proj.grad is None
    dense.remove()
    model.encode_image(x)
    assert not dense._tokens  # hooks gone: nothing captured, and no head enters the model's state dict
    assert not any("heads" in k for k in model.state_dict())
    with pytest.raises(ValueError, match="dense blocks"):
        pc.DenseHeads(model, (6,))


def test_pretrain_init_and_dense_term(tmp_path):
    first = tmp_path / "a.pt"
    quiet = dict(n=48, heldout=24, batch_size=16, time_budget=60, data_root=str(tmp_path / "data"), device="cpu",
                 stream=open(os.devnull, "w"))
    pc.pretrain(str(first), steps=1, **quiet)
    second = tmp_path / "b.pt"
    meta = pc.pretrain(str(second), steps=2, lr=1e-9, init=str(first), dense_weight=1.0, dense_blocks=(2, 4), **quiet)
    assert meta["args"]["init"] == str(first) and meta["args"]["dense_blocks"] == [2, 4]
    a = torch.load(first, weights_only=True)["state_dict"]
    b = torch.load(second, weights_only=True)["state_dict"]
    assert a.keys() == b.keys()  # the heads are not saved
    # started from ``first``: a near-zero learning rate leaves its weights (fp16-rounded) in place
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-3) for k in a if a[k].is_floating_point())
