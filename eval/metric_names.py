"""The metric names ``cascadev eval`` and ``bench-recon`` accept, and the one parser of them (no torch import)."""

from __future__ import annotations

from collections.abc import Iterable

from cascadev.errors import UserError

PAIRED_METRICS = ("psnr", "ssim", "lpips")       # per frame of paired videos (eval.metrics)
METRICS = PAIRED_METRICS + ("fvd",)              # FVD: between two sets (eval.fvd)


def parse_metrics(names: str | Iterable[str], option: str = "--metrics") -> list[str]:
    """``"PSNR, ssim"`` or ``["PSNR", "ssim"]`` -> ``["psnr", "ssim"]``: case-insensitive, blanks dropped, duplicates
    kept once in first-seen order. Unknown or no names: a one-line ``UserError`` listing the valid ones."""
    if isinstance(names, str):
        names = names.split(",")
    metrics = [m.strip().lower() for m in names if m.strip()]
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise UserError(f"{option}: unknown {', '.join(unknown) or '(empty)'}; choose from {','.join(METRICS)}")
    return list(dict.fromkeys(metrics))
