"""Several processes: the DiT's windows/tiles of a step split across ranks (2 CPU processes, gloo) give the
single-process result; the decode CLI on 2 processes writes what one process writes. (bench-recon on 2 processes,
checked by hand: the same results.json; a third launch here would cost ~15 s of the suite.)"""

import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from helpers import ROOT, randomize_, run_cli, subprocess_env
from cascadev.pipelines.distributed import share
from cascadev.pipelines.sampling import sample
from dit import PRESETS, VideoDiT

TINY = PRESETS["tiny"]          # window: 4 frames x 16x16 latents, 4 + 16 channels (VideoDiT's defaults)
SHAPE = (1, 4, 8, 32, 16)   # 3 windows x 3 row tiles x 1 column = 9 crops: 5 + 5 (one padded)


def _inputs():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(SHAPE, generator=g)
    cond = torch.randn(SHAPE[0], 16, *SHAPE[2:], generator=g)
    return randomize_(VideoDiT(**TINY), seed=1).eval(), cond, noise


def _sample(distributed: bool) -> tuple[torch.Tensor, int]:
    """The denoised latents and the number of DiT forwards this process ran (2 steps)."""
    model, cond, noise = _inputs()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    z = sample(model, cond, noise, "euler_a", steps=2, generator=torch.Generator().manual_seed(1),
               distributed=distributed)
    return z, len(calls)


def _rank(rank: int, size: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=size)
    try:
        torch.save(_sample(distributed=True), f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_share_gives_equal_contiguous_blocks_padded_with_the_last():
    items = list(range(9))
    assert [share(items, r, 2) for r in range(2)] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 8]]
    assert [share(items, r, 3) for r in range(3)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert [share([0], r, 2) for r in range(2)] == [[0], [0]]


@pytest.mark.slow
def test_windows_split_across_two_processes_equal_one_process(tmp_path):
    one, calls = _sample(distributed=True)        # no process group: the plain path
    assert calls == 2 * 9 and torch.equal(one, _sample(distributed=False)[0])
    out = str(tmp_path / "z")
    mp.spawn(_rank, args=(2, f"file://{tmp_path / 'rendezvous'}", out), nprocs=2)
    for rank in range(2):
        z, calls = torch.load(f"{out}.{rank}")
        assert calls == 2 * 5                     # its 5 of the 9 crops per step
        assert torch.equal(z, one), (z - one).abs().max()   # bit-identical on CPU


def _torchrun(tmp_path, *argv) -> subprocess.CompletedProcess:
    """`cascadev ARGV` as 2 CPU processes over gloo (what `accelerate launch --multi_gpu` does with GPUs; accelerate
    launches CPU processes only through mpirun), one thread each like the in-process tests; temp files in tmp_path."""
    env = subprocess_env(tmp_path, PYTHONPATH=str(ROOT), ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "cascadev", *map(str, argv)], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_cli_decode_on_two_processes_writes_what_one_writes(tmp_path, capsys, tiny_pipeline_dir):
    from cascadev.pipelines.latents import save_latents
    from cascadev.video_io import read_video

    z = tmp_path / "z.safetensors"   # 8 frames at 192x256 px: 3 windows x 2 x 3 tiles on the tiny DiT
    save_latents(z, torch.randn(1, 16, 8, 6, 8, generator=torch.Generator().manual_seed(0)))
    decode = ("decode", z, "--weights", tiny_pipeline_dir, "--steps", 2, "-o")
    assert run_cli(capsys, *decode, tmp_path / "one.mp4")[0] == 0
    two = _torchrun(tmp_path, *decode, tmp_path / "two.mp4")
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("two.mp4") == 1    # only the main process writes (and says so)
    assert two.stdout.count("loading weights") == 1 and two.stdout.count("decoding latents") == 1    # and reports
    assert torch.equal(read_video(tmp_path / "one.mp4"), read_video(tmp_path / "two.mp4"))

