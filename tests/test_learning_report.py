"""bench/learning.py report: the reproduction table and curves come from the kept JSON, nothing typed."""

import json
import os

import pytest
import torch

@pytest.fixture
def learning(tmp_path, monkeypatch, bench_module):
    mod = bench_module("learning")
    monkeypatch.setattr(mod, "KEEP", str(tmp_path / "docs" / "results" / "learning"))
    monkeypatch.setattr(mod, "ROOT", str(tmp_path))
    os.makedirs(mod.KEEP)
    return mod


def _rec(step, a, shape):
    return {"step": step, "alignment": a, "alignment_per_attribute": {"shape": shape, "color": 0.5},
            "coverage": 0.4, "coverage_ideal": 0.75, "mppd": 0.2, "clip_score": 20.0}


def test_report_table_mean_std_over_seeds_and_readme_splice(learning, tmp_path, capsys):
    for seed, final in ((0, 0.2), (1, 0.4)):
        with open(os.path.join(learning.KEEP, f"scad_mi-s{seed}.jsonl"), "w") as f:
            for r in (_rec(0, 0.0, 0.1), _rec(100, final, final)):
                f.write(json.dumps(r) + "\n")
        json.dump({"wall_s": 600.0, "machine": "test box"}, open(os.path.join(learning.KEEP, f"scad_mi-s{seed}.summary.json"), "w"))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{learning.BEGIN}\nold\n{learning.END}\noutro\n")
    assert learning.main(["report", "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro\n") and text.endswith("outro\n")
    row = [line for line in text.splitlines() if line.startswith("| `scad_mi`")][0]
    assert "| 0,1 | 100 | 0.300 ± 0.141 |" in row  # mean ± sample std of the final snapshots
    assert row.endswith("| 10.0 |")  # the fastest seed's wall, in minutes
    assert "test box" in text
    assert os.path.getsize(tmp_path / "docs" / "learning-curves.png") > 1000


def test_report_without_runs_says_so(learning, capsys):
    assert learning.main(["report"]) == 2
    assert "no kept runs" in capsys.readouterr().err


def test_claim_rows_give_difference_and_standard_error_against_galip(learning):
    def final(a, mppd):
        return [dict(_rec(100, a, 0.2), mppd=mppd)]

    by_variant = {"galip": [(0, final(0.1, 0.2), {}), (1, final(0.3, 0.4), {})],
                  "scad_mi": [(0, final(0.1, 0.5), {}), (1, final(0.3, 0.7), {})],
                  "scad": [(0, final(0.2, 0.3), {})]}  # one seed: no row
    md = learning.claim(by_variant)
    rows = [line for line in md.splitlines() if line.startswith("| `")]
    assert len(rows) == 1 and rows[0].startswith("| `scad_mi` (2 vs 2)")
    # Δ mPPD = 0.6 - 0.3; both sd = 0.1414 → s.e. = sqrt(0.02/2 + 0.02/2) = 0.1414
    assert "+0.300 ± 0.141 (+2.1 s.e.)" in rows[0]
    assert "+0.000 ± 0.141 (+0.0 s.e.)" in rows[0]  # alignment: same means
    assert learning.claim({"galip": by_variant["galip"][:1], "scad_mi": by_variant["scad_mi"]}) == ""


def test_report_of_another_set_keeps_apart_from_the_reproduction_table(learning, tmp_path):
    other = os.path.join(os.path.dirname(learning.KEEP), "long-run")
    os.makedirs(other)
    with open(os.path.join(other, "scad_mi-s0.jsonl"), "w") as f:
        for r in (_rec(0, 0.0, 0.1), _rec(4000, 0.25, 0.3)):
            f.write(json.dumps(r) + "\n")
    readme = tmp_path / "README.md"
    block = f"{learning.BEGIN}\ntable stays\n{learning.END}"
    readme.write_text(f"{block}\n<!-- long-run:begin -->\nold\n<!-- long-run:end -->\n")
    assert learning.main(["report", "--set", "long-run", "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith(block) and "old" not in text
    assert "| `scad_mi` | 0 | 4000 | 0.250 |" in text and "docs/results/long-run/*.jsonl" in text
    assert os.path.getsize(tmp_path / "docs" / "long-run-curves.png") > 1000
    assert not os.path.exists(tmp_path / "docs" / "learning-curves.png")
    with pytest.raises(SystemExit):
        learning.main(["report", "--set", "../x"])


def test_real_renders_row_heads_the_table(learning):
    runs = {"scad_mi": [(0, [_rec(100, 0.3, 0.2)], {})]}
    real = dict(_rec(0, 0.95, 0.95), alignment_per_attribute={k: 1.0 for k in learning.ATTRS}, clip_score=56.0)
    rows = [line for line in learning.table(runs, real).splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[1].startswith("| real renders | – | – | 0.950 | 1.000 |") and "| 56.000 |" in rows[1]
    assert rows[2].startswith("| `scad_mi` |")
    assert "real renders" not in learning.table(runs)


def test_compare_puts_single_runs_of_several_sets_in_one_table(learning, tmp_path):
    for set_name, final in (("learning", 0.2), ("ablation-x", 0.6)):
        keep = learning._set_paths(set_name)[0]
        os.makedirs(keep, exist_ok=True)
        with open(os.path.join(keep, "scad_mi-s0.jsonl"), "w") as f:
            for r in (_rec(0, 0.0, 0.1), _rec(100, final, final)):
                f.write(json.dumps(r) + "\n")
        json.dump({"wall_s": 60.0, "machine": f"box {set_name}"}, open(os.path.join(keep, "scad_mi-s0.summary.json"), "w"))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- abl:begin -->\n<!-- abl:end -->\n")
    assert learning.main(["compare", "--name", "abl", "--readme", str(readme),
                          "base=learning/scad_mi-s0", "ablation-x/scad_mi-s0"]) == 0
    text = readme.read_text()
    assert "| `base` | 0 | 100 | 0.200 |" in text and "| `ablation-x/scad_mi-s0` | 0 | 100 | 0.600 |" in text
    assert "box learning" in text and "box ablation-x" in text
    assert os.path.getsize(tmp_path / "docs" / "abl-curves.png") > 1000
    assert "discriminator checks" not in text  # no run has a d-attributes file
    assert "clipped" not in text  # no run kept a log with clipped steps
    with open(os.path.join(learning._set_paths("ablation-x")[0], "scad_mi-s0.log"), "w") as f:
        f.write("step 25/50 | d_loss=1 clipped_steps=3 g_loss=2\nstep 50/50 | clipped_steps=4 \n")
    assert learning.main(["compare", "--name", "abl", "--readme", str(readme),
                          "base=learning/scad_mi-s0", "ablation-x/scad_mi-s0"]) == 0
    assert "clipped_steps` in each run's kept log): `ablation-x/scad_mi-s0` 7." in readme.read_text()
    assert learning.main(["compare", "--name", "abl", "learning/scad_mi-s9"]) == 2  # not kept: one line, no table

    # A run kept with bench/d_attributes.py's JSON adds a row to the D-checks table; the others do not.
    acc = {"shape": 0.5, "color": 0.75, "size": 0.625, "position": 0.875, "background": 1.0}
    res = {"step": 100, "n": 8, "real": {a: {"accuracy": v, "pairs": 8} for a, v in acc.items()},
           "generated": {a: {"accuracy": 1 - v, "pairs": 8} for a, v in acc.items()}}
    keep = learning._set_paths("ablation-x")[0]
    json.dump({"results": [res]}, open(os.path.join(keep, "scad_mi-s0" + learning.D_CHECKS), "w"))
    assert learning.main(["compare", "--name", "abl", "--readme", str(readme),
                          "base=learning/scad_mi-s0", "ablation-x/scad_mi-s0"]) == 0
    text = readme.read_text()
    assert "| `ablation-x/scad_mi-s0` | 100 | 0.50 / 0.50 | 0.75 / 0.25 | 0.62 / 0.38 | 0.88 / 0.12 | 1.00 / 0.00 |" in text
    assert "| `base` | 100 | " not in text and "8 fresh real renders" in text


def test_run_keeps_snapshots_summary_grid_and_console(learning, tmp_path, monkeypatch, tiny_train):
    """``run`` trains a (tiny) run and keeps what the table reads plus the run's console log."""
    monkeypatch.setattr(learning, "SAMPLES", str(tmp_path / "docs" / "samples" / "learning"))
    flags = [*tiny_train(eval_every=2), "--eval-prompts", "2", "--eval-n", "2", "--d-grad-clip", "1e-6"]
    prompts = tmp_path / "prompts.txt"
    assert learning.main(["run", "--variants", "scad", "--seeds", "0", "--common-prompts", str(prompts),
                          "--runs", str(tmp_path / "runs")]) == 2  # no prompt file: refused before training
    assert not (tmp_path / "runs").exists()
    prompts.write_text("a red circle on the left\na blue star\n")
    assert learning.main(["run", "--variants", "scad", "--seeds", "0", "--steps", "2", "--common-prompts", str(prompts),
                          "--runs", str(tmp_path / "runs"), "--machine", "test box", "--", *flags]) == 0
    keep = learning.KEEP
    common = json.load(open(os.path.join(keep, "scad-s0" + learning.COMMON)))  # the final checkpoint, scored
    assert common["step"] == 2 and common["settings"]["prompts"] == ["a red circle on the left", "a blue star"]
    assert common["settings"]["n_per_prompt"] == 16 and 0.0 <= common["metrics"]["shapes"]["alignment"] <= 1.0
    assert os.path.isfile(learning.COMMON_PROMPTS)  # the default prompt file is committed
    recs = [json.loads(line) for line in open(os.path.join(keep, "scad-s0.jsonl"))]
    assert [r["step"] for r in recs] == [0, 2] and "alignment" in recs[-1]
    summary = json.load(open(os.path.join(keep, "scad-s0.summary.json")))
    assert summary["machine"] == "test box" and "--d-grad-clip 1e-6" in summary["command"]
    assert summary["cpu"] == learning.cpu_name() and summary["threads"] >= 1  # recorded, not only described
    assert torch.__version__.startswith(summary["versions"]["torch"]) and "pillow" in summary["versions"]
    log = open(os.path.join(keep, "scad-s0.log")).read()
    assert "step 2/2" in log and "clipped_steps=1" in log  # the progress lines, as the console showed them
    assert os.path.getsize(tmp_path / "docs" / "samples" / "learning" / "scad-s0.png") > 100


def _evaluate_json(prompts, alignment):
    """The parts of ``python -m scadfast.evaluate --out`` that ``compare`` reads."""
    per = {"shape": 0.25, "color": 0.5, "size": 0.375, "position": 0.125, "background": 1.0}
    return {"step": 1000, "variant": "scad_mi", "settings": {"n_per_prompt": 4, "seed": 0, "prompts": prompts},
            "metrics": {"shapes": {"alignment": alignment, "alignment_per_attribute": per, "coverage": 0.3,
                                   "coverage_ideal": 0.48},
                        "ppd": {"mppd": 0.4}, "clip_score": {"clip_score": 25.0}}}


def test_compare_adds_the_runs_on_one_prompt_set_and_refuses_different_sets(learning, tmp_path):
    for set_name in ("learning", "more-x"):
        keep = learning._set_paths(set_name)[0]
        os.makedirs(keep, exist_ok=True)
        with open(os.path.join(keep, "scad_mi-s0.jsonl"), "w") as f:
            f.write(json.dumps(_rec(1000, 0.1, 0.1)) + "\n")
        json.dump({"wall_s": 60.0, "machine": "box"}, open(os.path.join(keep, "scad_mi-s0.summary.json"), "w"))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- md:begin -->\n<!-- md:end -->\n")
    args = ["compare", "--name", "md", "--readme", str(readme), "base=learning/scad_mi-s0", "more=more-x/scad_mi-s0"]
    assert learning.main(args) == 0 and "one prompt set" not in readme.read_text()  # no run has the file

    prompts = ["a red circle", "a blue star on a white background"]
    for set_name, al in (("learning", 0.125), ("more-x", 0.0625)):
        json.dump(_evaluate_json(prompts, al),
                  open(os.path.join(learning._set_paths(set_name)[0], "scad_mi-s0" + learning.COMMON), "w"))
    assert learning.main(args) == 0
    text = readme.read_text()
    assert "one prompt set (2 prompts, the same for every row, 4 images each, noise seed 0" in text
    assert "| `base` | 0 | 1000 | 0.125 | 0.250 | 0.500 | 0.375 | 0.125 | 1.000 | 0.300 (0.48) | 0.400 | 25.000 |" in text
    assert "| `more` | 0 | 1000 | 0.062 |" in text

    json.dump(_evaluate_json(prompts[:1], 0.5),
              open(os.path.join(learning._set_paths("more-x")[0], "scad_mi-s0" + learning.COMMON), "w"))
    assert learning.main(args) == 2  # different prompts: refused, the README keeps the last good table
    assert "| `more` | 0 | 1000 | 0.062 |" in readme.read_text()


def test_report_adds_the_seeds_on_one_prompt_set_with_their_own_claim_rows(learning, tmp_path):
    keep = learning._set_paths("common-x")[0]
    os.makedirs(keep, exist_ok=True)
    prompts = ["a red circle", "a blue star"]
    for variant, seed, al in (("galip", 0, 0.25), ("galip", 1, 0.75), ("scad_mi", 0, 0.5), ("scad_mi", 1, 0.5),
                              ("scad", 0, 0.125)):
        name = f"{variant}-s{seed}"
        with open(os.path.join(keep, name + ".jsonl"), "w") as f:
            f.write(json.dumps(_rec(1000, 0.1, 0.1)) + "\n")
        json.dump({"wall_s": 60.0, "machine": "box"}, open(os.path.join(keep, name + ".summary.json"), "w"))
        if variant != "scad":  # a run without the file is left out of that table only
            json.dump(_evaluate_json(prompts, al), open(os.path.join(keep, name + learning.COMMON), "w"))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- common-x:begin -->\n<!-- common-x:end -->\n")
    assert learning.main(["report", "--set", "common-x", "--readme", str(readme)]) == 0
    text = readme.read_text()
    common = text[text.index("one prompt set (2 prompts"):]
    assert "| `galip` | 0,1 | 1000 | 0.500 ± 0.354 |" in common and "| `scad_mi` | 0,1 | 1000 | 0.500 ± 0.000 |" in common
    assert "`scad`" not in common
    assert "| `scad_mi` (2 vs 2) | +0.000 ± 0.000 | +0.000 ± 0.000 | +0.000 ± 0.250 (+0.0 s.e.) |" in common
    json.dump(_evaluate_json(prompts[:1], 0.5), open(os.path.join(keep, "scad_mi-s1" + learning.COMMON), "w"))
    assert learning.main(["report", "--set", "common-x"]) == 2  # mixed prompt sets: refused
