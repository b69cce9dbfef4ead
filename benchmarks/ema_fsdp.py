"""What the EMA costs under FSDP2 beside DDP: memory per rank, time of an update, time to gather it whole (each
checkpoint and the export). The training script's own EMA (``make_ema``, ``ema_weights``) over a DiT whose blocks
are ``fully_shard``-ed as configs/accelerate/fsdp.yaml does, and over the same DiT whole (DDP keeps a whole EMA on
every rank).

    python -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/ema_fsdp.py [--preset tiny]

On CPU it runs over gloo. Prints one JSON line (rank 0): per rank EMA bytes sharded and whole, median update time of
each, gather time; and for the official preset on 8 GPUs, the EMA bytes per GPU the same arithmetic gives.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cascadev.training.checkpoints import ema_weights  # noqa: E402
from cascadev.training.train import make_ema  # noqa: E402
from dit.video_dit import PRESETS, VideoDiT  # noqa: E402


def local_bytes(ema) -> int:
    """Bytes of the shadow weights this rank holds (its shards, or everything)."""
    return sum((s.to_local() if hasattr(s, "to_local") else s).numel() * 4 for s in ema.shadow_params)


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    whole_model = VideoDiT(**PRESETS[args.preset]).to(device)
    sharded_model = VideoDiT(**PRESETS[args.preset]).to(device)
    mesh = init_device_mesh(device, (world,))
    for block in sharded_model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(sharded_model, mesh=mesh)

    row = {"preset": args.preset, "device": device, "world": world, "threads": torch.get_num_threads()}
    for name, model in (("whole", whole_model), ("sharded", sharded_model)):
        ema, names = make_ema(model, 0.9999)
        params = [p for p in model.parameters() if p.requires_grad]
        ema.step(params)                                    # the first update copies
        row[f"{name}_ema_MiB_per_rank"] = round(local_bytes(ema) / 2 ** 20, 3)
        row[f"{name}_update_ms"] = round(1e3 * median_time(lambda: ema.step(params), args.repeats), 3)
        if name == "sharded":
            row["gather_whole_ms"] = round(1e3 * median_time(lambda: ema_weights(ema, names, keep=rank == 0),
                                                             max(3, args.repeats // 4)), 3)
    with torch.device("meta"):
        official = sum(p.numel() for p in VideoDiT(**PRESETS["official"]).parameters())
    row["official_ema_GiB_whole"] = round(official * 4 / 2 ** 30, 3)
    row["official_ema_GiB_per_gpu_fsdp8"] = round(official * 4 / 8 / 2 ** 30, 3)
    if rank == 0:
        print(json.dumps(row), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
