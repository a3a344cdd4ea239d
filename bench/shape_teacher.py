"""Does the generator satisfy its CLIP teacher on shape? (the learning issue's diagnostic)

    python bench/shape_teacher.py CKPT|RUN_DIR [...] [--n 32] [--out JSON]

For each of the six shapes, the prompt "a <shape>" (the shape only) is drawn ``--n`` times with fixed
noise by the checkpoint's EMA generator. Each image is read two ways: by the shipped attribute
classifier (ground truth, held-out shape accuracy 0.95) and zero-shot by the run's own frozen CLIP (the
teacher of G's CLIP loss and the features of D): cosine with "a circle", …, "a cross", highest wins.
Reported per checkpoint: both accuracies and how often the two agree. Reading:

* CLIP high, classifier at chance — G fools its teacher (shape-like CLIP features, no shape);
* both at chance — G does not satisfy the teacher either: the signal is there (the CLIP reads shape
  on real renders, see ``bench/clip_probe.py``) but G has not learned to follow it.

Evaluation only: nothing here feeds training.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from scadfast import runs  # noqa: E402
from scadfast import shapes_classifier as sc  # noqa: E402
from scadfast.data import shapes as shp  # noqa: E402
from scadfast.sample import generate  # noqa: E402
from common import checkpoint_diagnostic  # noqa: E402


@torch.no_grad()
def score(ckpt: str, n: int = 32, seed: int = 0) -> dict:
    loaded = runs.load(ckpt, "cpu")
    shapes = shp.ATTRIBUTES["shape"]
    prompts = [shp.format_caption({"shape": s}, ["shape"]) for s in shapes]
    imgs = generate(loaded, prompts, n, seed)  # (6, n, 3, H, W) in [-1, 1]
    flat = imgs.flatten(0, 1)
    truth = torch.arange(len(shapes)).repeat_interleave(n)
    clf = sc.load(sc.shipped_path())
    by_clf = clf.predict(flat)[:, shp.ATTRIBUTE_NAMES.index("shape")]
    txt = F.normalize(loaded.embed(prompts), dim=-1)
    img = F.normalize(loaded.clip.image_embed(flat).float(), dim=-1)
    by_clip = (img @ txt.t()).argmax(1)
    return {"checkpoint": ckpt, "step": int(loaded.state.get("step", -1)), "n_per_shape": n,
            "classifier_shape_accuracy": (by_clf == truth).float().mean().item(),
            "clip_zero_shot_shape_accuracy": (by_clip == truth).float().mean().item(),
            "classifier_clip_agreement": (by_clf == by_clip).float().mean().item(),
            "classifier_predicted_histogram": torch.bincount(by_clf, minlength=len(shapes)).tolist(),
            "clip_predicted_histogram": torch.bincount(by_clip, minlength=len(shapes)).tolist(),
            "shapes": shapes, "chance": 1 / len(shapes)}


def _report(r: dict) -> None:
    print(f"{r['checkpoint']} (step {r['step']}): classifier shape {r['classifier_shape_accuracy']:.3f}, "
          f"CLIP zero-shot {r['clip_zero_shot_shape_accuracy']:.3f}, agreement {r['classifier_clip_agreement']:.3f} "
          f"(chance {r['chance']:.3f}); classifier says {r['classifier_predicted_histogram']}, "
          f"CLIP says {r['clip_predicted_histogram']}")


def main(argv=None) -> int:
    def add_args(p):
        p.add_argument("--n", type=int, default=32, help="images per shape")
        p.add_argument("--seed", type=int, default=0)

    return checkpoint_diagnostic(argv, __doc__, lambda c, a: score(c, a.n, a.seed), _report,
                                 "scadfast.bench.shape_teacher/1", add_args)


if __name__ == "__main__":
    sys.exit(main())
