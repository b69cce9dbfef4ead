"""Evaluation: per-frame PSNR/SSIM/LPIPS (metrics), I3D and FVD (i3d, fvd), the ``cascadev eval`` command (cli)."""
