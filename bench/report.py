#!/usr/bin/env python
"""Markdown tables from every results JSON in bench/results/ (issue 10), optionally spliced into README.md.

    python bench/report.py [--results bench/results] [--readme README.md] [--check]

Reads every ``*.json`` under ``--results`` (sorted by date, then name) and renders one table per
result, each naming its device:

* ``scadfast.bench.train_step/1`` (bench/train_step.py): one row per side and the ratio;
* ``scadfast.bench.kernels/1`` (bench/kernels.py): one row per (op, case, mode) with the three
  providers side by side;
* ``scadfast.bench.loader/1`` (bench/loader.py): DALI vs torch DataLoader images/s;
* ``scadfast.bench.gpu_run/1`` (bench/gpu_run.sh): its stages and every result it embeds;
* ``scadfast.bench.data_scale/1`` (bench/data_scale.py): index time, caption store, loader images/s.

Files with another schema are listed as skipped. Without ``--readme`` the markdown goes to stdout.
With ``--readme FILE`` the text between ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` is
replaced (the markers must exist, once each, in that order); ``--check`` exits 1 instead of writing
when the file would change.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def _f(x, fmt: str, dash: str = "–") -> str:
    if x is None:
        return dash
    try:
        return format(x, fmt)
    except (TypeError, ValueError):
        return str(x)


def _table(headers: list[str], rows: list[list[str]], right_from: int = 1) -> str:
    align = ["---" if i < right_from else "---:" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    for r in rows:
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |")
    return "\n".join(lines)


def _device(res: dict) -> str:
    d = res.get("device") or {}
    name = d.get("name") or "unknown device"
    if d.get("type") == "cpu":
        thr = d.get("threads")
        return f"{name} (CPU{f', {thr} thread(s)' if thr else ''})"
    return f"{name} ({d.get('type', '?')})"


def _provenance(res: dict, path: str) -> str:
    v = res.get("versions") or {}
    bits = [f"`{os.path.relpath(path, ROOT) if path.startswith(ROOT) else path}`", str(res.get("date", "?"))[:10],
            f"torch {v.get('torch', '?')}"]
    if v.get("triton"):
        bits.append(f"triton {v['triton']}")
    if v.get("git_commit"):
        bits.append(f"commit {v['git_commit']}")
    return ", ".join(bits)


# ---------------------------------------------------------------------------------------------
# Per-schema renderers


def render_train_step(res: dict, path: str) -> str:
    st = res.get("settings", {})
    size = next((s.get("image_size") for s in res.get("sides", {}).values() if s.get("image_size")), st.get("image_size"))
    head = (f"#### Training step: `{st.get('variant')}` on {_device(res)} — batch {st.get('batch_size')}, "
            f"{size} px, CLIP {st.get('clip')}\n\n")
    rows = []
    for name, s in res.get("sides", {}).items():
        if s.get("status") != "ok":
            rows.append([name, "error: " + str(s.get("error", "?"))[:80]] + ["–"] * 7)
            continue
        mem = (s.get("peak_memory") or {}).get("peak_mib")
        epoch = next((p.get("device_days") for p in s.get("projection", []) if "one epoch" in p.get("name", "")), None)
        rows.append([
            name,
            f"{s.get('precision')}{', compiled' if s.get('compile') else ''}, impl={s.get('impl')}; {s.get('loader')}",
            f"{_f(s.get('images_per_s'), '.1f')} ({_f(s.get('images_per_s_min'), '.1f')}–{_f(s.get('images_per_s_max'), '.1f')})",
            _f(s.get("step_s_median"), ".3f"),
            _f(mem, ".0f"),
            _f(None if not s.get("flops_per_image") else s["flops_per_image"] / 1e9, ".2f"),
            _f(None if s.get("mfu") is None else 100 * s["mfu"], ".2f"),
            _f(None if epoch is None else epoch * 24, ".2f"),
        ])
    r = res.get("ratio") or {}
    if r.get("images_per_s") is not None:
        rows.append(["**ratio** scadfast / reference", "",
                     f"**{_f(r.get('images_per_s'), '.2f')}×** (worst window {_f(r.get('images_per_s_worst_case'), '.2f')}×)",
                     "", _f(r.get("peak_memory"), ".2f") + "×", _f(r.get("flops_per_image"), ".2f") + "×", "", ""])
    table = _table(["side", "setup", "images/s median (min–max)", "s/step", "peak MiB", "GFLOP/img", "MFU %",
                    "h / COCO epoch (1 device)"], rows, right_from=2)
    peak = res.get("peak") or {}
    notes = [f"MFU against {next((s.get('peak_source') for s in res.get('sides', {}).values() if s.get('peak_source')), '?')}",
             f"{st.get('windows')} windows × {st.get('steps_per_window')} steps after {st.get('warmup')} warm-up steps",
             "peak memory: " + str(next(((s.get("peak_memory") or {}).get("kind") for s in res.get("sides", {}).values()
                                        if s.get("peak_memory")), "?"))]
    if peak.get("measured_tflops"):
        notes.append(f"measured matmul peak {peak['measured_tflops']:.3g} TFLOP/s")
    if res.get("cpu_numbers"):
        notes.insert(0, "**CPU numbers**")
    return head + table + "\n\n" + "; ".join(notes) + f". Source: {_provenance(res, path)}.\n"


def render_kernels(res: dict, path: str) -> str:
    groups: dict = {}
    for r in res.get("rows", []):
        if r.get("case") is None:
            continue
        groups.setdefault((r["op"], r["case"], r["mode"], r.get("kind")), {})[r["provider"]] = r
    cuda = not res.get("cpu_numbers", True)
    rows = []
    for (op, case, mode, kind), prov in groups.items():
        def ms(p):
            r = prov.get(p)
            if r is None:
                return "–"
            return _f(r.get("ms"), ".4f") if r.get("status") == "ok" else r.get("status", "?")

        fused = prov.get("fused") or {}
        row = [op, case, kind or "", mode, ms("eager"), ms("compiled"), ms("fused"),
               _f(fused.get("speedup_vs_eager"), ".2f"), _f(fused.get("speedup_vs_compiled"), ".2f"),
               _f(fused.get("wall_ms"), ".4f"), _f(fused.get("gbps"), ".1f")]
        if cuda:
            row.append(_f(fused.get("pct_peak"), ".1f"))
        rows.append(row)
    headers = ["op", "case", "kind", "mode", "eager ms", "compiled ms", "fused ms", "× eager", "× compiled",
               "fused wall ms", "fused GB/s"] + (["% peak HBM"] if cuda else [])
    st = res.get("settings") or {}
    head = f"#### Fused ops on {_device(res)} — dtype {st.get('dtype')}{' (CPU numbers)' if not cuda else ''}\n\n"
    return head + _table(headers, rows, right_from=4) + f"\n\n{res.get('timing', '')}. Source: {_provenance(res, path)}.\n"


def render_loader(res: dict, path: str) -> str:
    st = res.get("settings") or {}
    rows = []
    for name, r in (res.get("loaders") or {}).items():
        if "error" in r:
            rows.append([name, "error: " + r["error"][:80], "–"])
        else:
            what = f"DALI, {r.get('decode')} decoding" if name == "dali" else f"torch DataLoader, {r.get('workers')} workers"
            rows.append([name, what, _f(r.get("images_per_s"), ".1f")])
    head = (f"#### Data loading on {_device(res)} — batch {st.get('batch_size')}, {st.get('image_size')} px, "
            f"{st.get('records')} records\n\n")
    ratio = res.get("ratio_dali_over_torch")
    tail = f"\n\nDALI / torch: {_f(ratio, '.2f')}×." if ratio else ""
    return head + _table(["loader", "setup", "images/s"], rows, right_from=2) + tail + f" Source: {_provenance(res, path)}.\n"


def render_data_scale(res: dict, path: str) -> str:
    sy, ix, cs = res.get("synth") or {}, res.get("index") or {}, res.get("caption_store") or {}
    ld, enc = res.get("loader") or {}, res.get("encode") or {}
    cold, warm = ix.get("cold") or {}, ix.get("warm") or {}
    rows = [
        ["index, cold (tar headers walked, captions read, image headers checked)", f"{_f(cold.get('seconds'), '.2f')} s",
         f"{_f(cold.get('us_per_record'), '.0f')} µs/record ({_f(cold.get('cpu_us_per_record'), '.0f')} CPU µs)"],
        ["index, warm (from the on-disk index cache)", f"{_f(warm.get('seconds'), '.3f')} s",
         f"{_f(warm.get('us_per_record'), '.1f')} µs/record ({_f(warm.get('cpu_us_per_record'), '.1f')} CPU µs)"],
        ["record set held per rank (Python heap)", f"{_f(ix.get('recordset_heap_bytes_per_record'), '.0f')} B/record", ""],
    ]
    for dt in ("float32", "float16"):
        c = cs.get(dt) or {}
        g = (c.get("rss_delta_after_gathers") or {})
        rows.append([f"caption store {dt}, {cs.get('dim')}-d: file; private RSS growth after {c.get('gathers')} gathers",
                     f"{_f(c.get('bytes_per_caption'), '.0f')} B/caption", f"{_f(g.get('anon'), '.0f')} B"])
        rows.append([f"gather {c.get('gather_batch')} rows ({dt}, host)", f"{_f(c.get('gather_us_median'), '.0f')} µs", ""])
    if enc:
        rows.append([f"caption encoding, {enc.get('clip')}", f"{_f(enc.get('captions_per_s'), '.0f')} captions/s",
                     f"{_f(enc.get('captions_per_cpu_s'), '.0f')} per CPU s, {enc.get('threads')} thread(s)"])
    rows.append([f"DALI loader, {ld.get('decode')} decoding, {ld.get('threads')} thread(s), {ld.get('image_size')} px",
                 f"{_f(ld.get('images_per_s'), '.1f')} images/s",
                 f"{_f(ld.get('images_per_cpu_s'), '.1f')} per CPU s; {_f(ld.get('jpeg_mb_per_s'), '.2f')} MB/s of JPEG"])
    head = (f"#### Data at scale on {_device(res)} — {sy.get('shards')} shards × {sy.get('per_shard')} synthetic JPEGs "
            f"({sy.get('min_side')}–{sy.get('max_side')} px sides, mean {_f(sy.get('mean_jpeg_bytes'), '.0f')} B)\n\n")
    note = f"**{res['note']}**. " if res.get("note") else ""
    return head + _table(["what", "measured", ""], rows) + f"\n\n{note}Source: {_provenance(res, path)}.\n"


def render_gpu_run(res: dict, path: str) -> str:
    rows = [[s.get("name", "?"), s.get("status", "?"), _f(s.get("seconds"), ".0f"), str(s.get("note", ""))[:100]]
            for s in res.get("stages", [])]
    head = (f"#### GPU run on {_device(res)}{' (dry run on the CPU)' if res.get('dry_run') else ''}\n\n"
            + _table(["stage", "status", "s", "note"], rows, right_from=2) + f"\n\nSource: {_provenance(res, path)}.\n")
    parts = [head]
    for sub in res.get("results", []):
        parts.append(render(sub, path))
    return "\n".join(parts)


RENDERERS = {
    "scadfast.bench.train_step/1": render_train_step,
    "scadfast.bench.kernels/1": render_kernels,
    "scadfast.bench.loader/1": render_loader,
    "scadfast.bench.gpu_run/1": render_gpu_run,
    "scadfast.bench.data_scale/1": render_data_scale,
}


def render(res: dict, path: str) -> str:
    fn = RENDERERS.get(res.get("schema"))
    if fn is None:
        return f"(skipped `{os.path.basename(path)}`: schema {res.get('schema')!r})\n"
    return fn(res, path)


def build(results_dir: str) -> str:
    files = sorted(glob.glob(os.path.join(results_dir, "**", "*.json"), recursive=True))
    loaded = []
    for path in files:
        try:
            with open(path) as f:
                res = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            loaded.append(("", path, None, f"(skipped `{os.path.basename(path)}`: {type(e).__name__})\n"))
            continue
        if not isinstance(res, dict):
            continue
        loaded.append((str(res.get("date", "")), path, res, None))
    loaded.sort(key=lambda t: (t[0], t[1]))
    parts = ["<!-- generated by `python bench/report.py --readme README.md` from bench/results/*.json; "
             "edit those, not this -->\n"]
    if not loaded:
        parts.append("No benchmark results yet (bench/results/ is empty).\n")
    for _, path, res, skipped in loaded:
        parts.append(skipped if res is None else render(res, path))
    return "\n".join(parts)


def splice(text: str, block: str) -> str:
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"expected one {BEGIN} followed by one {END}")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return head + BEGIN + "\n" + block.rstrip("\n") + "\n" + END + tail


def run(argv=None) -> int:
    p = argparse.ArgumentParser(description="markdown tables from bench/results/*.json")
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    p.add_argument("--readme", default=None, help="splice between the bench markers of this file")
    p.add_argument("--check", action="store_true", help="with --readme: exit 1 if the file is out of date")
    args = p.parse_args(argv)
    block = build(args.results)
    if not args.readme:
        sys.stdout.write(block)
        return 0
    with open(args.readme) as f:
        text = f.read()
    try:
        new = splice(text, block)
    except ValueError as e:
        print(f"bench/report.py: {args.readme}: {e}; add the two marker lines where the tables belong",
              file=sys.stderr)
        return 2
    if args.check:
        if new != text:
            print(f"{args.readme} is out of date: run python bench/report.py --readme {args.readme}", file=sys.stderr)
            return 1
        return 0
    if new != text:
        with open(args.readme, "w") as f:
            f.write(new)
    print(f"{args.readme}: {'updated' if new != text else 'already up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(run())
