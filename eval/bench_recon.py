"""The release's reconstruction benchmark protocol: which frames of a video, and how they are made square.

``cascadev bench-recon`` (``cascadev/cli/bench_recon.py``) reconstructs the first ``--limit`` videos of a folder
this way and scores the cascade against the Previewer baseline; these functions are what it shares with anyone
reproducing the release's numbers in Python. Videos are (B, 3, T, H, W) in [-1, 1].
"""

from __future__ import annotations


def frame_stride(file_fps: float | None, fps: float) -> int:
    """Every how many frames a clip of ``file_fps`` is sampled to come near ``fps`` (0: every frame)."""
    if not fps or not file_fps:
        return 1
    return max(1, round(file_fps / fps))


def release_frames(video, size: int, size_div: int = 32):
    """(1, 3, T, H, W) in [-1, 1] -> (1, 3, T, size, size) as the release's loader makes them (``patch/cv_utils.py``,
    then ``evae.py --square``): a 3 x 3 box blur (OpenCV's reflect-101 border), the short side resized to ``size``
    (bilinear, half-pixel centres, no antialiasing), a centre crop to multiples of ``size_div``, then to a square;
    8-bit levels after each step, as OpenCV's uint8 images."""
    import torch.nn.functional as F
    from einops import rearrange

    T = video.shape[2]
    x = rearrange((video.float() + 1) * 127.5, "b c t h w -> (b t) c h w").round()
    x = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), 3, stride=1).round()     # "reflect" is reflect-101
    H, W = x.shape[-2:]
    scale = size / min(H, W)
    dh, dw = round(H * scale), round(W * scale)
    x = F.interpolate(x, (dh, dw), mode="bilinear", align_corners=False).round().clamp_(0, 255)
    ch, cw = size_div * (dh // size_div), size_div * (dw // size_div)
    top, left = (dh - ch) // 2, (dw - cw) // 2
    s = min(ch, cw)
    top, left = top + (ch - s) // 2, left + (cw - s) // 2
    x = x[..., top:top + s, left:left + s]
    return rearrange(x / 127.5 - 1, "(b t) c h w -> b c t h w", t=T)


def square_crop(video, size: int):
    """(1, 3, T, H, W) -> (1, 3, T, size, size): short side resized to ``size``, then a centre crop."""
    from cascadev.pipelines.frames import resize_video

    H, W = video.shape[-2:]
    scale = size / min(H, W)
    video = resize_video(video, (max(size, round(H * scale)), max(size, round(W * scale))))
    H, W = video.shape[-2:]
    top, left = (H - size) // 2, (W - size) // 2
    return video[..., top:top + size, left:left + size]
