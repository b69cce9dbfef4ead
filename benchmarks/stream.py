"""Peak memory of a reconstruction as the clip grows: the streamed CLI against the in-memory Python path.

    python benchmarks/stream.py                       # 32, 128, 512 frames at 256x256, a few minutes on 2 cores

Each run is a fresh process (the shipped tiny cascade, 1 DiT step) that reports its own peak resident memory.
``cascadev reconstruct`` reads, encodes, decodes and writes the clip in pieces; the in-memory path is
``pipe.reconstruct(read_video(...))`` then ``write_video``, holding the whole clip in pixels.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from cascadev.pipelines.cascade import TINY_CASCADE

REPORT = "import resource; print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
STREAMED = ("import sys; from cascadev.cli import main; "
            "main(['reconstruct', sys.argv[1], '-o', sys.argv[2], '--weights', sys.argv[3], '--steps', '1']); "
            + REPORT)
IN_MEMORY = ("import sys, torch; from cascadev.pipelines.cascade import CascadeVPipeline; "
             "from cascadev.video_io import read_video, write_video; "
             "pipe = CascadeVPipeline.from_pretrained(sys.argv[3]); pipe.set_progress_bar_config(disable=True); "
             "write_video(sys.argv[2], pipe.reconstruct(read_video(sys.argv[1]), steps=1)); " + REPORT)


def peak_rss_mib(code: str, clip: Path, out: Path) -> float:
    result = subprocess.run([sys.executable, "-c", code, str(clip), str(out), str(TINY_CASCADE)], capture_output=True,
                            text=True, check=True)
    line = next(line for line in result.stdout.splitlines() if line.startswith("MAXRSS"))
    return int(line.split()[1]) / 1024                           # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--size", type=int, default=256, help="square side in pixels")
    args = parser.parse_args()
    from cascadev.synthetic import make_clip
    from cascadev.video_io import VideoWriter

    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'frames':>7}{'streamed MiB':>15}{'in-memory MiB':>15}")
        for frames in args.frames:
            clip = Path(tmp) / f"clip{frames}.mp4"
            with VideoWriter(clip, fps=8) as writer:               # generated in pieces, as it is read
                for start in range(0, frames, 32):
                    writer.write(make_clip(seed=start, frames=min(32, frames - start), height=args.size,
                                           width=args.size)[None])
            streamed = peak_rss_mib(STREAMED, clip, Path(tmp) / "s.mp4")
            in_memory = peak_rss_mib(IN_MEMORY, clip, Path(tmp) / "m.mp4")
            print(f"{frames:>7}{streamed:>15.0f}{in_memory:>15.0f}", flush=True)


if __name__ == "__main__":
    main()
