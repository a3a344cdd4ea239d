"""Learning curves and the reproduction table on the embedded default (shapes + scadfast-tiny).

    python bench/learning.py run --variants galip,scad_mi --seeds 0,1,2 [--steps N] [--set NAME] [-- TRAIN FLAGS...]
    python bench/learning.py report [--set NAME] [--readme README.md]
    python bench/learning.py real
    python bench/learning.py compare --name NAME [LABEL=]SET/VARIANT-sSEED ... [--readme README.md]

``run`` trains each (variant, seed) with ``python -m scadfast.train`` (learning-curve snapshots on,
as in the embedded default) into ``runs/learning/<variant>-s<seed>`` and keeps what the table needs
under ``docs/results/learning/``: ``<variant>-s<seed>.jsonl`` (every snapshot), ``.summary.json``
(wall time, images/s, the command, the CPU, the training's thread count and the versions of the packages
that enter a CPU run's arithmetic and data), ``.log`` (the run's console: its progress
lines) and ``docs/samples/learning/<variant>-s<seed>.png`` (the final sample grid). Runs one training at
a time.

``report`` reads every kept run and writes ``docs/learning-curves.png`` (each variant's mean curve over
seeds with its min–max band) and the markdown table of the final snapshots (mean ± std over seeds),
which it prints and, with ``--readme``, splices into README.md between ``<!-- learning:begin -->`` and
``<!-- learning:end -->``. Nothing is typed by hand: the table is the JSON.

``real`` scores real renders of the same held-out prompts (the shapes ground-truth sampler: what a
perfect generator would draw) with the same snapshot evaluator — prompts, classifier and CLIP as in a
run — into ``docs/results/learning/real-renders.json``; ``report`` adds it as the table's first row, the
ceiling of every column (and the CLIP score real images get).

``--set NAME`` keeps another set of runs apart from the reproduction table (default ``learning``): its
JSON under ``docs/results/NAME/``, grids under ``docs/samples/NAME/``, curves in ``docs/NAME-curves.png``
and the README block between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``; e.g. the longer recipe:
``run --variants scad_mi --seeds 0 --set long-run -- --config configs/cpu_long.yaml``.

``compare`` puts single kept runs of several sets in one table (a row per run, labelled) and one
curves plot, e.g. an ablation whose runs differ in training flags; README block ``<!-- NAME:begin -->``.
A run kept with ``<variant>-s<seed>.d-attributes.json`` (``bench/d_attributes.py`` on its last
checkpoint) adds a row to a second table: which attributes its discriminator checks; one whose kept
``.log`` has ``clipped_steps`` (a ``--d-grad-clip`` run) adds how many D steps the clip bound; one
kept with ``<variant>-s<seed>.common-prompts.json`` (``python -m scadfast.evaluate --ckpt RUN
--prompts FILE --out …`` on its last checkpoint) adds a row to a table on one prompt set for all runs —
for runs whose held-out prompts differ, e.g. runs on different training sets (the held-out prompts
exclude each run's own training captions); ``compare`` refuses if those files used different prompts.
``run`` keeps that file for every run (``--common-prompts``, default the 96 prompts of
``docs/results/heldout-prompts-96.txt``, held out from the default set's and from ``shapes:n=20000``'s
captions), and ``report`` adds the set's table on those prompts, mean ± std over the seeds that have
it: the 16 snapshot prompts are a small draw.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_name, package_versions, splice_readme  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEEP = os.path.join(ROOT, "docs", "results", "learning")
SAMPLES = os.path.join(ROOT, "docs", "samples", "learning")
BEGIN, END = "<!-- learning:begin -->", "<!-- learning:end -->"
DEFAULT_SET = "learning"
ATTRS = ("shape", "color", "size", "position", "background")
D_CHECKS = ".d-attributes.json"  # bench/d_attributes.py's JSON of a kept run's last checkpoint
COMMON = ".common-prompts.json"  # scadfast.evaluate's JSON of a kept run's last checkpoint on given prompts
COMMON_PROMPTS = os.path.join(ROOT, "docs", "results", "heldout-prompts-96.txt")  # see heldout-prompts-96.md


def _set_paths(name: str):
    """(results dir, sample-grid dir, curves PNG, README markers) of the kept set ``name``."""
    if name == DEFAULT_SET:
        return KEEP, SAMPLES, os.path.join(ROOT, "docs", "learning-curves.png"), (BEGIN, END)
    return (os.path.join(os.path.dirname(KEEP), name), os.path.join(os.path.dirname(SAMPLES), name),
            os.path.join(ROOT, "docs", f"{name}-curves.png"), (f"<!-- {name}:begin -->", f"<!-- {name}:end -->"))


def run(a, extra) -> int:
    if a.common_prompts and not os.path.isfile(a.common_prompts):  # found out now, not after the trainings
        print(f"error: --common-prompts {a.common_prompts}: no such file", file=sys.stderr)
        return 2
    keep, samples, _, _ = _set_paths(a.set)
    os.makedirs(keep, exist_ok=True)
    os.makedirs(samples, exist_ok=True)
    for v in a.variants.split(","):
        for seed in [int(x) for x in a.seeds.split(",")]:
            name = f"{v}-s{seed}"
            out = os.path.join(a.runs, name)
            if os.path.exists(out):
                shutil.rmtree(out)
            cmd = [sys.executable, "-m", "scadfast.train", "--variant", v, "--seed", str(seed), "--out", out, *extra]
            if a.steps:
                cmd += ["--steps", str(a.steps)]
            print("+", " ".join(cmd), flush=True)
            t0 = time.time()
            rc = _run_logged(cmd, os.path.join(out, "console.log"))
            if rc != 0:
                print(f"error: {name} failed (exit {rc}); its console: {out}/console.log", file=sys.stderr)
                return rc
            summary = json.load(open(os.path.join(out, "summary.json")))
            summary.update(command=" ".join(["python", "-m", "scadfast.train", *cmd[3:]]),
                           wall_with_setup_s=round(time.time() - t0, 1), date=time.strftime("%Y-%m-%d"),
                           machine=a.machine, cpu=cpu_name(), versions=package_versions())
            shutil.copy(os.path.join(out, "curves.jsonl"), os.path.join(keep, name + ".jsonl"))
            json.dump(summary, open(os.path.join(keep, name + ".summary.json"), "w"), indent=1)
            shutil.copy(os.path.join(out, "samples", "latest.png"), os.path.join(samples, name + ".png"))
            shutil.copy(os.path.join(out, "console.log"), os.path.join(keep, name + ".log"))
            if a.common_prompts:
                ev = [sys.executable, "-m", "scadfast.evaluate", "--ckpt", os.path.join(out, "ckpt.pt"),
                      "--metrics", "shapes,clip_score,ppd", "--prompts", a.common_prompts, "--n-per-prompt", "16",
                      "--out", os.path.join(keep, name + COMMON), "--quiet"]
                print("+", " ".join(ev), flush=True)
                rc = subprocess.call(ev)
                if rc != 0:
                    print(f"error: scoring {name} on {a.common_prompts} failed (exit {rc}); the run is kept",
                          file=sys.stderr)
                    return rc
    return 0


def _run_logged(cmd, log_path) -> int:
    """Run ``cmd``, its console (stdout and stderr) shown live and written to ``log_path``: the
    progress lines hold what the snapshots do not (losses, D's gradient norm, clipped steps)."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w") as log:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in p.stdout:
            sys.stderr.write(line)
            log.write(line)
        return p.wait()


REAL = "real-renders.json"


def real(a) -> int:
    import tempfile

    import torch

    from scadfast import train
    from scadfast.metrics.shapes_truth import render_prompt_images

    with tempfile.TemporaryDirectory() as tmp:  # a default run's evaluator: its held-out prompts, classifier, CLIP
        ev = train.Trainer(train.parse_args(["--variant", "scad_mi", "--out", os.path.join(tmp, "run")])).evaluator
    calls = {}

    def generate(z, s):  # the prompt is the held-out text embedding s was taken from
        i = int(torch.cdist(s[:1].float(), ev.s).argmin())
        calls[i] = calls.get(i, 0) + 1
        return render_prompt_images(ev.prompts[i], len(z), seed=1000 * i + calls[i])

    rec = dict(ev(generate), source="real renders of each held-out prompt (shapes ground-truth sampler)",
               prompts=ev.prompts, date=time.strftime("%Y-%m-%d"))
    path = os.path.join(_set_paths(a.set)[0], REAL)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    json.dump(rec, open(path, "w"), indent=1)
    print(f"alignment {rec['alignment']:.3f} | coverage {rec['coverage']:.3f} (ceiling {rec['coverage_ideal']:.2f}) | "
          f"mPPD {rec['mppd']:.3f} | CLIP score {rec['clip_score']:.1f} -> {os.path.relpath(path, ROOT)}")
    return 0


def _read_run(keep, name):
    """The kept run ``<variant>-s<seed>`` of ``keep``: ``(seed, snapshots, summary or {})``."""
    from scadfast.metrics.curves import read_jsonl

    summ = os.path.join(keep, name + ".summary.json")
    return (int(name.rsplit("-s", 1)[1]), read_jsonl(os.path.join(keep, name + ".jsonl")),
            json.load(open(summ)) if os.path.exists(summ) else {})


def _runs(keep):
    by_variant = {}
    for path in sorted(glob.glob(os.path.join(keep, "*.jsonl"))):
        name = os.path.basename(path)[:-6]
        by_variant.setdefault(name.rsplit("-s", 1)[0], []).append(_read_run(keep, name))
    return by_variant


def _mean_sd(xs):
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan"))


def _ms(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    m, sd = _mean_sd(xs)
    return f"{m:.3f}" if len(xs) == 1 else f"{m:.3f} ± {sd:.3f}"


def table(by_variant, real_rec=None, first="variant") -> str:
    head = (f"| {first} | seeds | steps | alignment ↑ | " + " | ".join(ATTRS) + " | coverage ↑ (ceiling) | "
            "mPPD ↑ | CLIP score | fastest wall (min) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    if real_rec:
        r = real_rec
        lines.append(f"| real renders | – | – | {r['alignment']:.3f} | "
                     + " | ".join(f"{r['alignment_per_attribute'][k]:.3f}" for k in ATTRS)
                     + f" | {r['coverage']:.3f} ({r['coverage_ideal']:.2f}) | {r['mppd']:.3f} | {r['clip_score']:.3f} | – |")
    for v, runs in by_variant.items():
        finals = [recs[-1] for _, recs, _ in runs]
        ceil = finals[0].get("coverage_ideal")
        walls = [s.get("wall_s", 0) / 60 for _, _, s in runs if s]
        lines.append(
            f"| `{v}` | {','.join(str(s) for s, _, _ in runs)} | {finals[0]['step']} | "
            f"{_ms([f['alignment'] for f in finals])} | "
            + " | ".join(_ms([f['alignment_per_attribute'].get(k) for f in finals]) for k in ATTRS)
            + f" | {_ms([f['coverage'] for f in finals])} ({ceil:.2f}) | {_ms([f['mppd'] for f in finals])} | "
            f"{_ms([f['clip_score'] for f in finals])} | {f'{min(walls):.1f}' if walls else '–'} |")
    return "\n".join(lines)


def claim(by_variant, base="galip", metrics=("mppd", "coverage", "alignment")) -> str:
    """SCAD's claim against ``base``: per metric, the difference of final-snapshot means ± its standard
    error (sqrt(sd_a²/n_a + sd_b²/n_b), seeds as samples); only variants with ≥ 2 seeds, as the base."""
    if len(by_variant.get(base, ())) < 2:
        return ""
    finals = {v: [recs[-1] for _, recs, _ in runs] for v, runs in by_variant.items()}
    head = f"| vs `{base}` (Δ mean ± s.e., seeds) | " + " | ".join(f"Δ {m}" for m in metrics) + " |"
    lines = [head, "|" + "---|" * (len(metrics) + 1)]
    for v in by_variant:
        if v == base or len(finals[v]) < 2 or not v.startswith("scad"):
            continue
        cells = []
        for m in metrics:
            (ma, sa), (mb, sb) = _mean_sd([f[m] for f in finals[v]]), _mean_sd([f[m] for f in finals[base]])
            se = math.sqrt(sa ** 2 / len(finals[v]) + sb ** 2 / len(finals[base]))
            ratio = f" ({(ma - mb) / se:+.1f} s.e.)" if se > 0 else ""
            cells.append(f"{ma - mb:+.3f} ± {se:.3f}{ratio}")
        lines.append(f"| `{v}` ({len(finals[v])} vs {len(finals[base])}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def report(a) -> int:
    from scadfast.metrics.curves import plot_curves

    keep, _, png, (begin, end) = _set_paths(a.set)
    by_variant = _runs(keep)
    if not by_variant:
        print(f"error: no kept runs in {keep}; run `python bench/learning.py run --set {a.set}` first", file=sys.stderr)
        return 2
    recipe = "embedded default" if a.set == DEFAULT_SET else a.set
    png = plot_curves({v: [r for _, recs, _ in runs for r in recs] for v, runs in by_variant.items()}, png,
                      title=f"{recipe}, held-out shapes prompts (mean over seeds, band = min–max)")
    real_path = os.path.join(keep, REAL)
    md = table(by_variant, json.load(open(real_path)) if os.path.exists(real_path) else None)
    vs = claim(by_variant)
    if vs:
        md += "\n\n" + vs
    evals, by_common = [], {}
    for v, runs in by_variant.items():
        for seed, _, summ in runs:
            ev = _kept_common(keep, f"{v}-s{seed}")
            if ev:
                evals.append(ev)
                by_common.setdefault(v, []).append((seed, [_common_record(ev)], summ))
    if evals:
        common = _common_caption(evals)
        if common is None:
            return 2
        md += "\n\n" + common + "\n\n" + table(by_common)
        vs = claim(by_common)
        if vs:
            md += "\n\n" + vs
    machines = sorted({s.get("machine", "?") for runs in by_variant.values() for _, _, s in runs if s})
    walls = [s["wall_s"] for runs in by_variant.values() for _, _, s in runs if s.get("wall_s")]
    shared = (" Wall is each variant's fastest seed: some runs shared the cores with another job (up to "
              f"{max(walls) / min(walls):.1f}× the fastest), so compare speed only between runs on an idle machine."
              if walls and max(walls) > 1.5 * min(walls) else "")
    md += (f"\n\nMachine: {'; '.join(machines)}.{shared} Raw snapshots: `{os.path.relpath(keep, ROOT)}/*.jsonl`; "
           f"curves: `{os.path.relpath(png, ROOT)}`.")
    print(md)
    return splice_readme(a.readme, begin, end, md) if a.readme else 0


def d_checks_table(d_checks: dict) -> str:
    """Markdown: per run, how often its last D prefers the true caption over a one-attribute edit
    (``bench/d_attributes.py`` JSON kept as ``<variant>-s<seed>.d-attributes.json``), real / generated."""
    head = ("| run | step | " + " | ".join(ATTRS) + " |\n|---|---|" + "---|" * len(ATTRS))
    lines = [head]
    for label, r in d_checks.items():
        cells = []
        for at in ATTRS:
            re_, ge = r["real"].get(at), r["generated"].get(at)
            cells.append("–" if re_ is None else f"{re_['accuracy']:.2f} / {ge['accuracy']:.2f}")
        lines.append(f"| `{label}` | {r['step']} | " + " | ".join(cells) + " |")
    n = next(iter(d_checks.values()))["n"]
    return ("Which attributes the discriminator checks at the last step (`bench/d_attributes.py`, kept as "
            f"`<run>{D_CHECKS}`): how often it scores the true caption above the same caption with one named "
            f"attribute changed, on {n} fresh real renders / on the run's own images of the same captions; "
            "chance 0.5.\n\n" + "\n".join(lines))


def _kept_common(keep: str, name: str) -> dict | None:
    """The kept run ``name``'s ``scadfast.evaluate`` JSON on the common prompts, or None."""
    path = os.path.join(keep, name + COMMON)
    return json.load(open(path)) if os.path.isfile(path) else None


def _common_record(ev: dict) -> dict:
    """``scadfast.evaluate``'s JSON of a final checkpoint (kept as ``<run>.common-prompts.json``) as a
    snapshot record, so that :func:`table` and :func:`claim` read it like a run's last snapshot."""
    m = ev["metrics"]
    return {"step": ev["step"], **{k: m["shapes"][k] for k in ("alignment", "alignment_per_attribute",
                                                                "coverage", "coverage_ideal")},
            "mppd": m["ppd"]["mppd"], "clip_score": m["clip_score"]["clip_score"]}


def _common_caption(evals: list) -> str | None:
    """The heading of the one-prompt-set table, or None (after one line on stderr) when the kept
    ``.common-prompts.json`` files used different prompts, images per prompt or noise seeds."""
    keys = ("prompts", "n_per_prompt", "seed")
    if len({json.dumps({k: e["settings"][k] for k in keys}) for e in evals}) > 1:
        print(f"error: the kept {COMMON} files used different prompts, images per prompt or seeds; evaluate "
              "every run with the same --prompts, --n-per-prompt and --seed", file=sys.stderr)
        return None
    first = evals[0]["settings"]
    return (f"The final checkpoints on one prompt set ({len(first['prompts'])} prompts, the same for every "
            f"row, {first['n_per_prompt']} images each, noise seed {first['seed']}; "
            f"`python -m scadfast.evaluate --prompts FILE`, kept as `<run>{COMMON}`):")


def _clipped_steps(log_path) -> int | None:
    """How many D steps a run's ``--d-grad-clip`` clipped: the sum of its progress lines'
    ``clipped_steps=N`` (each counts the steps since the line before); None without a log or a clip."""
    if not os.path.isfile(log_path):
        return None
    counts = [int(m) for m in re.findall(r"\bclipped_steps=(\d+)", open(log_path).read())]
    return sum(counts) if counts else None


def compare(a) -> int:
    """One table (and one curves PNG) of single kept runs from any sets: ``LABEL=SET/VARIANT-sSEED``."""
    from scadfast.metrics.curves import plot_curves

    rows, machines, d_checks, clipped, evals = {}, set(), {}, {}, {}
    for spec in a.runs:
        label, _, ref = spec.rpartition("=")
        set_name, _, name = ref.partition("/")
        keep = _set_paths(set_name)[0]
        path = os.path.join(keep, name + ".jsonl")
        if not name or not os.path.isfile(path):
            print(f"error: {spec}: no kept run {os.path.relpath(path, ROOT)} (give SET/VARIANT-sSEED)", file=sys.stderr)
            return 2
        rows[label or ref] = [_read_run(keep, name)]
        machines.add(rows[label or ref][0][2].get("machine", "?"))
        n_clipped = _clipped_steps(os.path.join(keep, name + ".log"))
        if n_clipped is not None:
            clipped[label or ref] = n_clipped
        d_path = os.path.join(keep, name + D_CHECKS)
        if os.path.isfile(d_path):
            d_checks[label or ref] = json.load(open(d_path))["results"][-1]
        ev = _kept_common(keep, name)
        if ev:
            evals[label or ref] = ev
    common = _common_caption(list(evals.values())) if evals else ""
    if common is None:
        return 2
    png = os.path.join(ROOT, "docs", f"{a.name}-curves.png")
    plot_curves({k: recs for k, [(_, recs, _)] in rows.items()}, png, title=f"{a.name}, held-out shapes prompts")
    md = table(rows, first="run") + (f"\n\nMachine: {'; '.join(sorted(machines))}. Commands: each run's `.summary.json`; "
                        f"curves: `{os.path.relpath(png, ROOT)}`.")
    if clipped:
        md += ("\n\nD steps the `--d-grad-clip` bound clipped (the sum of `clipped_steps` in each run's kept log): "
               + ", ".join(f"`{k}` {n}" for k, n in clipped.items()) + ".")
    if d_checks:
        md += "\n\n" + d_checks_table(d_checks)
    if evals:
        md += "\n\n" + common + "\n\n" + table(
            {k: [(rows[k][0][0], [_common_record(e)], rows[k][0][2])] for k, e in evals.items()}, first="run")
    print(md)
    return splice_readme(a.readme, f"<!-- {a.name}:begin -->", f"<!-- {a.name}:end -->", md) if a.readme else 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="python bench/learning.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--variants", default="galip,scad,scad_mi,scad_dd,ms_clip_gan")
    r.add_argument("--seeds", default="0,1,2")
    r.add_argument("--steps", type=int, default=None, help="default: the engine's default")
    r.add_argument("--runs", default=os.path.join(ROOT, "runs", "learning"))
    r.add_argument("--machine", default="2-core CPU (no GPU)", help="recorded with each run")
    r.add_argument("--common-prompts", default=COMMON_PROMPTS, metavar="FILE",
                   help="also score each final checkpoint on these prompts (16 images each) and keep it as "
                        f"<run>{COMMON} ('' to skip; default: the 96 held-out prompts)")
    q = sub.add_parser("report")
    g = sub.add_parser("real", help="score real renders of the held-out prompts (the table's ceiling row)")
    c = sub.add_parser("compare", help="one table of single runs from several sets")
    c.add_argument("--name", required=True, help="README block <!-- NAME:begin/end --> and docs/NAME-curves.png")
    c.add_argument("runs", nargs="+", metavar="[LABEL=]SET/VARIANT-sSEED")
    for sp in (r, q, g):
        sp.add_argument("--set", default=DEFAULT_SET, help="which kept set of runs (default: the reproduction table)")
    for sp in (q, c):
        sp.add_argument("--readme", default=None)
    a = p.parse_args(argv)
    name = a.name if a.cmd == "compare" else a.set
    if not name or not all(ch.isalnum() or ch in "-_" for ch in name):
        p.error(f"{'--name' if a.cmd == 'compare' else '--set'} {name!r}: use letters, digits, '-' and '_'")
    return {"run": lambda: run(a, extra), "report": lambda: report(a), "real": lambda: real(a),
            "compare": lambda: compare(a)}[a.cmd]()


if __name__ == "__main__":
    sys.exit(main())
