"""How much of MS-CLIP-GAN's condition ĉ the text decides: ``MSCLIPGAN.text_share`` at initialisation
(conditioning-augmentation variants) and for trained checkpoints.

    python bench/text_share.py [--ckpt RUN ...] [--out docs/results/ms_clip_gan-text-share.json]

Text share = Σ_d Var_s(μ_d) / Σ_d (Var_s(μ_d) + E_s[σ_d²]) over 512 distinct shapes captions embedded by
the shipped tiny CLIP (law of total variance: the part of ĉ's variance the prompt explains).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/text_share.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", action="append", default=[], help="trained run directory or checkpoint (repeatable)")
    p.add_argument("--out", default=None, help="JSON report")
    a = p.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import write_json
    from scadfast import runs, variants
    from scadfast.data.shapes import sample_prompts
    from scadfast.models.clip import FrozenCLIP

    clip = FrozenCLIP("scadfast-tiny", pretrained="shapes")
    caps = list(dict.fromkeys(sample_prompts(3000, seed=5)))[:512]
    with torch.no_grad():
        s = clip.encode_text(clip.tokenize(caps)).float()
    report = {"captions": len(caps), "init": {}, "trained": {}}
    for mode, kl in (("relu", 2.0), ("glu", 1.0)):
        for scaled in (False, True):
            torch.manual_seed(0)
            pair = variants.build(variants.get("ms_clip_gan", ca_mode=mode, kl_weight=kl, ngf=32, ndf=32), clip)
            if not scaled:
                pair.G.s_scale = 1.0  # the input CA had before: the unit-norm sentence embedding
            key = f"{mode} (v{1 if mode == 'relu' else 2}), s {'·√d_txt' if scaled else 'unit-norm'}"
            report["init"][key] = pair.text_share(s)
    for ck in a.ckpt:
        loaded = runs.load(ck, "cpu")
        cfg = loaded.pair.cfg
        report["trained"][ck] = {"step": loaded.state.get("step"), "ca_mode": cfg.ca_mode, "kl_weight": cfg.kl_weight,
                                 "text_share": loaded.pair.text_share(loaded.embed(caps))}
    print(json.dumps(report, indent=1))
    if a.out:
        write_json(a.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
