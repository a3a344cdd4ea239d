"""How fast can the generator learn the shapes task from a direct pixel teacher? (learning issue)

    python bench/g_floor.py [--steps 1500] [--lr 1e-3] [--object-weight 30] [--ngf 32]
                            [--arch galip|decoder] [--betas B1 B2] [--canonical] [--cond text|onehot]
                            [--image-size 64] [--batch-size 16]
                            [--eval-every 100] [--seed 0] [--threads 2] [--out JSON] [--grid PNG]
    python bench/g_floor.py --optimum [--renders 32] [--object-weight 30] [--image-size 64] [--out JSON]
    python bench/g_floor.py --report JSON [JSON ...] [--readme README.md] [--plot PNG]

``--report`` prints the kept runs as one table (each run at steps 400, 1000, 3000 and its last step) and
with ``--readme`` splices it between ``<!-- g-floor:begin -->`` and ``<!-- g-floor:end -->``;
``--plot`` draws each attribute's accuracy against the step, one line per run.
``--optimum`` scores what a perfect learner of this teacher would draw (see below); its JSON enters
the report as one more row and as a dotted line in the plot.

The embedded default's generator (``scad_mi``'s G at the embedded width, with the shipped CLIP as
its frozen mapper) is trained by regression alone, with no discriminator and no CLIP loss. Its
targets are renders of fully specified captions: all five attributes are named, so the target is
fixed up to the renderer's jitter of a few pixels. The loss is L1 per pixel, and the pixels of the
object (saturated colour: the backgrounds are always neutral grey levels) are weighted by
``--object-weight`` so the small object is not drowned by the background. Adam with the recipe's
betas (0, 0.9), batch 16 (``--batch-size``), the recipe's noise.

Every ``--eval-every`` steps, 256 fixed evaluation captions (all attributes named, drawn from their
own seed with fresh renders; of the 6,480 possible captions most also occur in training, which can
only make the test easier) are drawn with fixed noise and read by the shipped attribute classifier:
accuracy per attribute and of all five together. Chance: shape 0.17, colour 0.13, size 0.33,
position 0.11, background 0.2.

The loss's optimum: per pixel, the weighted L1 loss over the renders of one caption is minimised by
their weighted median. ``--optimum`` draws that median from 32 fresh renders of each evaluation
caption and lets the classifier read it, so the table shows what the teacher *can* teach. The object
weighting makes the optimum draw a pixel as object wherever the jittered object covers it in more
than 1/(2 + object weight) of the renders (1/32 at the default), so the optimum's object is enlarged:
at the default weight its size reads at chance and this teacher says nothing about size, while its
shape still reads correctly (``--object-weight 3`` keeps both).

``--arch decoder`` swaps G for a conventional conditional decoder of about the same size
(:class:`Decoder`, usually trained with Adam (0.5, 0.999)): the control that tells "slow for this
generator" from "slow for any generator of this size on this task".

``--canonical`` teaches with the renderer's canonical images (no jitter of place, radius, colour or
background), so each caption has exactly one target and no sample's gradient is noise; evaluation is
unchanged (fresh jittered renders). It tells "shape is slow because the jittered targets' outlines
disagree" from "shape is slow even when the answer is exact".

``--cond onehot`` replaces the text embedding s by an exact code of the caption: the five attributes'
one-hot vectors (6 + 8 + 3 + 9 + 5 = 31 entries, each hot entry :data:`ONEHOT_SCALE`) in the first
31 of s's dimensions, zeros elsewhere, for training and evaluation alike. It tells "shape is slow
because s hides it" from "shape is slow even when the generator is told it exactly".

``--image-size N`` renders the same scenes at N px (the renderer places and sizes everything in
fractions of the side, so at 128 px an object covers 4× the pixels) and has the generator draw them
at N px (G: its Dec2 up-samples to N; the decoder: one more up-sampling stage per doubling); the
classifier reads every image resized to its 64 px (antialiased), as it reads any input. It tells
"shape is slow because the object is a few pixels" from "shape is slow at any resolution".

Reading: this teacher tells G every pixel of the answer, which no GAN's discriminator does. The step
at which G learns an attribute here is therefore a floor for what the GAN can learn in that many
steps with the same generator and optimiser (the embedded GAN run has 1000 steps) — with one
caveat: L1 rewards an object's mass more than its outline, where a discriminator could weigh the
outline more, so it is strong evidence rather than proof. This is a
diagnostic of the generator's learning speed, not a training recipe; nothing here feeds the GAN.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from scadfast import shapes_classifier as sc  # noqa: E402
from scadfast import variants  # noqa: E402
from scadfast.grid import save_grid  # noqa: E402
from scadfast.data import shapes as shp  # noqa: E402
from scadfast.models.clip import TINY_NAME, FrozenCLIP  # noqa: E402
from common import environment, splice_readme, write_json  # noqa: E402

NAMES = shp.ATTRIBUTE_NAMES
EVAL_SEED = 123_457  # the evaluation captions' and noise's seed; training draws from --seed
ONEHOT_SCALE = 3.0  # --cond onehot: the value of each hot entry (five of them: norm 6.7; s's mean norm is 14.4)


def object_mask(x: torch.Tensor, threshold: float = 0.3) -> torch.Tensor:
    """(B, 1, H, W) bool: pixels of saturated colour (max − min over RGB > ``threshold`` in [-1, 1]
    units). Every background of the shapes data is neutral grey, every object colour saturated."""
    return (x.amax(1, keepdim=True) - x.amin(1, keepdim=True)) > threshold


def draw_attrs(rng: np.random.Generator, n: int) -> tuple[list[dict], torch.Tensor]:
    """``n`` fully specified attribute sets and their (n, 5) value indices."""
    attrs = [{a: str(rng.choice(shp.ATTRIBUTES[a])) for a in NAMES} for _ in range(n)]
    return attrs, torch.tensor([[shp.ATTRIBUTES[a].index(at[a]) for a in NAMES] for at in attrs])


def to_unit(imgs: np.ndarray) -> torch.Tensor:
    """uint8 (n, H, W, 3) renders → float (n, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(imgs).float().permute(0, 3, 1, 2) / 127.5 - 1.0


def pixel_weights(x: torch.Tensor, object_weight: float) -> torch.Tensor:
    """(B, 1, H, W) weights of the L1 loss: 1 + ``object_weight`` on the object's pixels."""
    return 1.0 + object_weight * object_mask(x).to(x.dtype)


class CaptionBatches:
    """Fully specified captions, their renders and their text embeddings (cached per caption), or with
    ``onehot`` an exact code of their attributes in place of the embedding (see ``--cond``)."""

    def __init__(self, clip: FrozenCLIP, image_size: int, onehot: bool = False):
        self.clip, self.image_size, self.onehot = clip, image_size, onehot
        self._emb: dict[str, torch.Tensor] = {}
        sizes = [len(shp.ATTRIBUTES[a]) for a in NAMES]
        self._offsets = torch.tensor(np.cumsum([0] + sizes[:-1]))

    def code(self, labels: torch.Tensor) -> torch.Tensor:
        """(n, embed_dim): each attribute's one-hot block (value ``ONEHOT_SCALE``), zeros after them."""
        out = torch.zeros(len(labels), self.clip.embed_dim)
        out.scatter_(1, labels + self._offsets, ONEHOT_SCALE)
        return out

    @torch.no_grad()
    def embed(self, captions: list[str]) -> torch.Tensor:
        new = sorted({c for c in captions if c not in self._emb})
        for i in range(0, len(new), 256):
            chunk = new[i:i + 256]
            for c, e in zip(chunk, self.clip.encode_text(self.clip.tokenize(chunk)).float().cpu()):
                self._emb[c] = e
        return torch.stack([self._emb[c] for c in captions])

    def embed_all(self) -> None:
        """Embed every fully specified caption once (6·8·3·9·5 = 6,480), so steps do no text encoding."""
        import itertools

        combos = itertools.product(*(shp.ATTRIBUTES[a] for a in NAMES))
        self.embed([shp.format_caption(dict(zip(NAMES, c)), NAMES) for c in combos])

    def draw(self, rng: np.random.Generator, n: int, canonical: bool = False):
        """(s (n, d), images (n, 3, H, W) in [-1, 1], labels (n, 5) value indices). With
        ``canonical`` the images are the renderer's canonical ones: no nuisance jitter, so every
        caption has exactly one target."""
        attrs, labels = draw_attrs(rng, n)
        caps = [shp.format_caption(a, NAMES) for a in attrs]
        x = to_unit(np.stack([shp.render(a, self.image_size, None if canonical else rng) for a in attrs]))
        return (self.code(labels) if self.onehot else self.embed(caps)), x, labels


class Decoder(torch.nn.Module):
    """The control: a conventional conditional decoder of about G's size (4.1 M parameters at the
    embedded sizes). [z ‖ s] → linear → ReLU → (256, 8, 8) → ``n_up`` × (2× nearest up-sampling, conv
    3×3, BatchNorm, ReLU), halving the channels (3 stages to 64 px) → conv 3×3 to RGB. The text reaches the spatial map in the
    first layer, where GALIP's G has it only in per-channel affines and the mapper's prompts."""

    def __init__(self, cond_dim: int, width: int = 256, grid: int = 8, n_up: int = 3):
        if width >> n_up < 1:
            raise ValueError(f"Decoder: width {width} cannot be halved {n_up} times")
        super().__init__()
        nn = torch.nn
        self.width, self.grid = width, grid
        self.fc = nn.Linear(cond_dim, width * grid * grid)
        layers, c = [], width
        for _ in range(n_up):
            layers += [nn.Upsample(scale_factor=2), nn.Conv2d(c, c // 2, 3, 1, 1), nn.BatchNorm2d(c // 2), nn.ReLU()]
            c //= 2
        self.net = nn.Sequential(*layers, nn.Conv2d(c, 3, 3, 1, 1))

    def forward(self, z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc(torch.cat([z, s.to(z.dtype)], 1)))
        return self.net(h.view(len(z), self.width, self.grid, self.grid))


def scores(pred: torch.Tensor, labels: torch.Tensor) -> dict:
    """Accuracy per attribute and of all five together, from (n, 5) predicted and true value indices."""
    hit = pred == labels
    out = {a: round(float(hit[:, k].float().mean()), 4) for k, a in enumerate(NAMES)}
    out["all"] = round(float(hit.all(1).float().mean()), 4)
    return out


def weighted_median(samples: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per-pixel weighted median over axis 0: ``samples`` (n, H, W, C), ``weights`` (n, H, W). It is
    the minimiser of Σ_i w_i·|y − x_i| per pixel and channel, i.e. the best a generator could do under
    the weighted L1 loss for a caption whose renders are ``samples``."""
    order = np.argsort(samples, axis=0, kind="stable")
    xs = np.take_along_axis(samples, order, 0)
    ws = np.take_along_axis(np.broadcast_to(weights[..., None], samples.shape), order, 0)
    cum = np.cumsum(ws, 0)
    first = (cum >= cum[-1] / 2).argmax(0)
    return np.take_along_axis(xs, first[None], 0)[0]


def optimum(object_weight: float = 30.0, n_eval: int = 256, renders: int = 32, image_size: int = 64) -> dict:
    """The shipped classifier's accuracy on the loss's own optimum: for each evaluation caption, the
    weighted pixelwise median of ``renders`` fresh renders (weights as in training). What G would
    score if it had learned the teacher perfectly."""
    clf = sc.load(sc.shipped_path())
    rng = np.random.default_rng(EVAL_SEED)
    attrs, labels = draw_attrs(rng, n_eval)  # the same captions as run()'s evaluation set
    best = []
    for at in attrs:
        r = np.stack([shp.render(at, image_size, rng) for _ in range(renders)])
        w = pixel_weights(to_unit(r), object_weight)[:, 0].numpy()
        best.append(weighted_median(r.astype(np.float32), w))
    return scores(clf.predict(to_unit(np.stack(best))), labels)


@torch.no_grad()
def accuracy(G, z: torch.Tensor, s: torch.Tensor, labels: torch.Tensor, clf) -> dict:
    was = G.training
    G.eval()
    pred = torch.cat([clf.predict(G(z[i:i + 64], s[i:i + 64]).clamp(-1, 1)) for i in range(0, len(z), 64)])
    G.train(was)
    return scores(pred, labels)


def run(steps: int = 1500, lr: float = 1e-3, object_weight: float = 30.0, ngf: int = 32,
        eval_every: int = 100, seed: int = 0, n_eval: int = 256, batch_size: int = 16,
        grid: str | None = None, prefill: bool = True, arch: str = "galip",
        betas: tuple[float, float] | None = None, canonical: bool = False, cond: str = "text",
        image_size: int | None = None, log=print) -> dict:
    torch.manual_seed(seed)
    clip = FrozenCLIP(TINY_NAME, pretrained="shapes")
    size = int(image_size or clip.image_size)
    cfg = variants.get("scad_mi", ngf=ngf, ndf=32)
    if arch == "galip":
        G = variants.build(cfg, clip, img_size=size).G
    else:
        G = Decoder(cfg.z_dim + clip.embed_dim, grid=8, n_up=round(np.log2(size / 8)))
    clf = sc.load(sc.shipped_path())
    data = CaptionBatches(clip, size, onehot=cond == "onehot")
    if prefill and not data.onehot:
        data.embed_all()
    s_eval, x_eval, y_eval = data.draw(np.random.default_rng(EVAL_SEED), n_eval)  # always jittered
    z_eval = torch.randn(n_eval, cfg.z_dim, generator=torch.Generator().manual_seed(EVAL_SEED))
    opt = torch.optim.Adam(G.parameters(), lr=lr, betas=tuple(betas or cfg.betas))
    rng = np.random.default_rng(seed)
    curve, t0, train_s = [], time.perf_counter(), 0.0
    for step in range(steps + 1):
        if step % eval_every == 0 or step == steps:
            acc = accuracy(G, z_eval, s_eval, y_eval, clf)
            curve.append({"step": step, "train_seconds": round(train_s, 1), **acc})
            log(f"step {step:5d}  {time.perf_counter() - t0:6.0f}s  "
                + "  ".join(f"{k} {v:.2f}" for k, v in acc.items()))
        if step == steps:
            break
        t = time.perf_counter()
        s, x, _ = data.draw(rng, batch_size, canonical)
        loss = ((G(torch.randn(batch_size, cfg.z_dim), s) - x).abs() * pixel_weights(x, object_weight)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        train_s += time.perf_counter() - t
    if grid:
        G.eval()
        with torch.no_grad():
            save_grid(torch.cat([G(z_eval[:16], s_eval[:16]), x_eval[:16]]), grid, nrow=16)
    return {"curve": curve, "n_params_G": sum(p.numel() for p in G.parameters())}


CHANCE = {a: 1 / len(shp.ATTRIBUTES[a]) for a in NAMES}  # uniform guessing


def label(res: dict) -> str:
    a = res["args"]
    b1, b2 = a.get("betas") or variants.get("scad_mi").betas
    who = "control decoder" if a.get("arch") == "decoder" else f"G ngf {a['ngf']}"
    canon = ", canonical renders (no jitter)" if a.get("canonical") else ""
    code = ", one-hot attributes instead of s" if a.get("cond") == "onehot" else ""
    batch = f", batch {a['batch_size']}" if a.get("batch_size", 16) != 16 else ""
    return (f"{who}, lr {a['lr']:g}, Adam ({b1:g}, {b2:g}), object weight {a['object_weight']:g}"
            f"{canon}{code}{_px(res)}{batch}")


def _px(res: dict) -> str:
    """", N px" for a run or optimum at another image size than the embedded 64 px."""
    n = res["args"].get("image_size", 64)
    return f", {n} px" if n != 64 else ""


def is_optimum(res: dict) -> bool:
    return "accuracy" in res and "curve" not in res


def report_table(results: list[dict]) -> str:
    rows = []
    for res in results:
        if is_optimum(res):
            r = res["accuracy"]
            rows.append([f"the loss's optimum (weighted median of {res['args']['renders']} renders, object weight "
                         f"{res['args']['object_weight']:g}{_px(res)})", "–"] + [f"{r[a]:.2f}" for a in (*NAMES, "all")])
            continue
        curve = {r["step"]: r for r in res["curve"]}
        last = max(curve)
        for step in sorted({s for s in (400, 1000, 3000) if s in curve} | {last}):
            r = curve[step]
            rows.append([label(res), str(step)] + [f"{r[a]:.2f}" for a in (*NAMES, "all")])
    chance = ["chance", "–"] + [f"{CHANCE[a]:.2f}" for a in NAMES] + ["0.00"]
    machines = sorted({"{name} ({type}), {threads} thread(s)".format(**r["environment"]["device"])
                       for r in results if not is_optimum(r)})
    head = ["run", "step", *NAMES, "all"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows + [chance]]
    return ("\n".join(lines)
            + f"\n\nMachine: {'; '.join(machines)}. Accuracy of the shipped classifier on "
              f"{'/'.join(sorted({str(r['args']['n_eval']) for r in results if not is_optimum(r)}))} fixed evaluation captions (fully specified, fresh renders), fixed noise; raw JSON: `docs/results/g-floor/`.")


def plot(results: list[dict], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    legend_rows = -(-len(results) // 3)
    fig, axes = plt.subplots(1, len(NAMES), figsize=(3.3 * len(NAMES), 3.0 + 0.25 * legend_rows), squeeze=False)
    optimum_styles = iter([("black", ":"), ("dimgrey", "-."), ("silver", ":")] * len(results))
    for res in results:
        if is_optimum(res):
            colour, ls = next(optimum_styles)
            for ax, a in zip(axes[0], NAMES):
                ax.axhline(res["accuracy"][a], color=colour, ls=ls, lw=1.2,
                           label=f"the loss's optimum, object weight {res['args']['object_weight']:g}{_px(res)}")
            continue
        steps = [r["step"] for r in res["curve"]]
        for ax, a in zip(axes[0], NAMES):
            ax.plot(steps, [r[a] for r in res["curve"]], marker="o", ms=2.5, label=label(res))
    for ax, a in zip(axes[0], NAMES):
        ax.axhline(CHANCE[a], color="grey", ls="--", lw=0.8)
        ax.set_title(f"{a} (dashed: chance)", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle("generator trained by a direct pixel teacher (bench/g_floor.py)", fontsize=10)
    fig.tight_layout(rect=(0, 0.08 * legend_rows, 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--object-weight", type=float, default=30.0)
    p.add_argument("--ngf", type=int, default=32)
    p.add_argument("--arch", choices=("galip", "decoder"), default="galip",
                   help="galip: the embedded default's G; decoder: the conventional control (see Decoder)")
    p.add_argument("--betas", type=float, nargs=2, metavar=("B1", "B2"),
                   help="Adam's betas (default: the recipe's, 0 and 0.9)")
    p.add_argument("--optimum", action="store_true",
                   help="instead of training: score the loss's optimum on the evaluation captions")
    p.add_argument("--renders", type=int, default=32, help="with --optimum: renders per caption")
    p.add_argument("--canonical", action="store_true",
                   help="teach with the renderer's canonical images (no nuisance jitter: one exact target "
                        "per caption); evaluation is unchanged")
    p.add_argument("--cond", choices=("text", "onehot"), default="text",
                   help="text: condition on the shipped CLIP's sentence embedding s; onehot: on an exact "
                        "one-hot code of the five attributes instead (see below)")
    p.add_argument("--image-size", type=int, default=64,
                   help="render and generate at this many pixels (a power of two >= 16); the classifier "
                        "reads every image resized to 64 px")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--n-eval", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--no-prefill", action="store_true",
                   help="embed captions as they are drawn instead of all 6,480 at the start (short runs)")
    p.add_argument("--out", help="write the result JSON here")
    p.add_argument("--grid", help="write a PNG: top row G's images of 16 evaluation captions, bottom row their renders")
    p.add_argument("--report", nargs="+", metavar="JSON", help="tabulate kept runs instead of training")
    p.add_argument("--readme", help="with --report: splice the table into this file's g-floor block")
    p.add_argument("--plot", help="with --report: draw the runs' curves into this PNG")
    args = p.parse_args(argv)
    if args.report:
        results = []
        for path in args.report:
            try:
                with open(path) as f:
                    results.append(json.load(f))
            except (OSError, ValueError) as e:
                p.error(f"cannot read {path}: {e}")
        md = report_table(results)
        print(md)
        if args.plot:
            print(f"wrote {plot(results, args.plot)}")
        return splice_readme(args.readme, "<!-- g-floor:begin -->", "<!-- g-floor:end -->", md) if args.readme else 0
    for name in ("steps", "eval_every", "n_eval", "ngf", "renders", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.image_size < 16 or args.image_size & (args.image_size - 1):
        p.error(f"--image-size must be a power of two >= 16, got {args.image_size}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.optimum:
        args_kept = {k: getattr(args, k) for k in ("object_weight", "n_eval", "renders")}
        if args.image_size != 64:
            args_kept["image_size"] = args.image_size
        out = {"what": "bench/g_floor.py --optimum: shipped classifier on the weighted pixelwise median of "
                       "fresh renders of each evaluation caption (the weighted L1 loss's minimiser)",
               "args": args_kept, "accuracy": optimum(args.object_weight, args.n_eval, args.renders, args.image_size)}
        print("  ".join(f"{k} {v:.2f}" for k, v in out["accuracy"].items()))
        if args.out:
            write_json(args.out, out, announce=True)
        return 0
    res = run(args.steps, args.lr, args.object_weight, args.ngf, args.eval_every, args.seed,
              args.n_eval, args.batch_size, grid=args.grid, prefill=not args.no_prefill, arch=args.arch, betas=args.betas,
              canonical=args.canonical, cond=args.cond, image_size=args.image_size)
    out = {"what": "bench/g_floor.py: the embedded generator trained by object-weighted L1 regression to "
                   "renders of fully specified captions; shipped classifier on n_eval fixed evaluation captions",
           "args": vars(args), "environment": environment(torch.device("cpu")), **res}
    if args.out:
        write_json(args.out, out, announce=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
