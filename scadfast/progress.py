"""Progress reporting for long runs: a status line (step, images/s, losses, ETA) and TensorBoard."""

from __future__ import annotations

import sys
import time


def format_seconds(s: float) -> str:
    s = int(max(0, s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


class Progress:
    """Prints ``step/total | img/s | losses | ETA`` lines and mirrors scalars to TensorBoard.

    Only the main rank should create one with ``enabled=True``. The console shows ``console_keys``
    (when present); TensorBoard gets every scalar.
    """

    console_keys = ("d_loss", "g_loss", "d/d_gp", "d/grad_norm", "d/clipped_steps", "d/d_mi", "g/g_clip_cos", "g/g_kl")
    # Snapshot metrics the progress line repeats (alignment and FID, else the first there is), TensorBoard's eval/*.
    headline_metrics = (("alignment", "align"), ("fid", "fid"), ("kid", "kid"), ("clip_score", "clip"))
    eval_scalars = ("alignment", "coverage", "mppd", "clip_score", "fid", "kid")

    def __init__(self, total_steps: int, start_step: int = 0, log_dir: str | None = None,
                 enabled: bool = True, stream=None, start_images: int = 0):
        self.total, self.start = total_steps, start_step
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()
        # A resumed run starts at (start_step, start_images): its first window counts only its own images.
        self.last_t, self.last_step, self.images = self.t0, start_step, start_images
        self.writer = None
        self.latest_metrics: dict = {}
        if enabled and log_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir)
            except Exception as e:  # tensorboard missing: keep training, say so once
                print(f"[scadfast] TensorBoard logging disabled ({e})", file=self.stream)

    def log(self, step: int, images_seen: int, scalars: dict[str, float]) -> dict:
        now = time.perf_counter()
        dt = max(now - self.last_t, 1e-9)
        ips = (images_seen - self.images) / dt
        done = step - self.start
        rate = done / max(now - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        self.last_t, self.last_step, self.images = now, step, images_seen
        info = dict(scalars, images_per_s=ips)
        if self.enabled:
            shown = [k for k in self.console_keys if k in scalars] or list(scalars)[:4]
            losses = " ".join(f"{k.split('/')[-1]}={scalars[k]:.4g}" for k in shown)
            if self.latest_metrics:
                m = self.latest_metrics
                have = [(short, m[k]) for k, short in self.headline_metrics if k in m]
                head = [h for h in have if h[0] in ("align", "fid")] or have[:1]
                if head:
                    losses += " | " + " ".join(f"{short}={v:.3f}" for short, v in head) + f"@{m['step']}"
            pct = 100.0 * step / max(self.total, 1)
            print(f"step {step}/{self.total} ({pct:5.1f}%) | {ips:7.1f} img/s | {losses} | "
                  f"elapsed {format_seconds(now - self.t0)} ETA {format_seconds(eta)}",
                  file=self.stream, flush=True)
            if self.writer is not None:
                for k, v in info.items():
                    self.writer.add_scalar(k, v, step)
        return info

    def metrics(self, step: int, record: dict) -> None:
        """A learning-curve snapshot: one console line, ``eval/*`` scalars in TensorBoard; the progress
        line shows its headline metrics (alignment and/or FID, ...) from now on."""
        self.latest_metrics = {"step": step, **{k: v for k, v in record.items() if k != "step"}}
        if not self.enabled:
            return
        per = record.get("alignment_per_attribute", {})
        parts = []
        if "alignment" in record:  # the shapes metrics
            parts += [f"alignment {record['alignment']:.3f} (" + " ".join(f"{k} {v:.2f}" for k, v in per.items()) + ")",
                      f"coverage {record['coverage']:.3f} (ceiling {record['coverage_ideal']:.2f})",
                      f"mPPD {record['mppd']:.3f}"]
        for key, fmt in (("clip_score", "CLIP score {:.1f}"), ("fid", "FID {:.2f}"), ("kid", "KID {:.4f}")):
            if key in record:
                parts.append(fmt.format(record[key]))
        print(f"eval step {step} | " + " | ".join(parts) + f" | {record['eval_seconds']:.0f}s",
              file=self.stream, flush=True)
        if self.writer is not None:
            for k in self.eval_scalars:
                if k in record:
                    self.writer.add_scalar(f"eval/{k}", record[k], step)
            for k, v in per.items():
                self.writer.add_scalar(f"eval/alignment_{k}", v, step)

    def image(self, tag: str, grid_hwc, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, grid_hwc, step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
