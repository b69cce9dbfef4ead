"""Training runs in every process of a CPU launch (tests only), each as `accelerate launch --config_file` would
start it: ``python -m torch.distributed.run --nproc_per_node 2 tests/distributed_train.py CONFIG ARGS [--then CONFIG
ARGS ...]`` runs ``python -m cascadev.training.train ARGS`` with the environment accelerate's launcher makes of the
accelerate config CONFIG (configs/accelerate/*.yaml), then each ``--then``'s, in the same processes, every run with
a process group and accelerate state of its own (torchrun's rendezvous is the only thing they share). Importing and
starting processes is what costs on CPU: one launch for several runs keeps the tests short.

FSDP on CPU: accelerate (1.15) turns ``ACCELERATE_USE_FSDP`` into ``DistributedType.FSDP`` on accelerators only; on
CPU processes it stays MULTI_CPU, a plain DDP run, though torch's FSDP2 (``fully_shard``) runs on CPU over gloo.
``allow_fsdp_on_cpu`` sets the state's type and FSDP plugin (with its mixed precision) as accelerate does on a GPU,
and leaves the rest to accelerate's own FSDP2 code: ``prepare`` (``fully_shard`` of every DiT block, then the root),
``save_state`` / ``load_state`` through torch.distributed.checkpoint, ``get_state_dict``, clipping, ``no_sync``. For
fp16 it also makes the GradScaler accelerate makes for FSDP2 on a GPU (on CPU it makes none)."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def allow_fsdp_on_cpu() -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)      # FSDP2's MixedPrecisionPolicy
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP    # what later states copy

    AcceleratorState.__init__ = __init__

    from accelerate import Accelerator
    from accelerate.utils.fsdp_utils import get_fsdp2_grad_scaler

    accelerator_init = Accelerator.__init__

    def with_fp16_scaler(self, *args, **kwargs):
        # fp16: accelerate makes its GradScaler on accelerators only (a CPU process trains fp16 without one); under
        # FSDP2 the scaler and the loop's unscale / clip / step are as on a GPU, so the test makes it as there
        accelerator_init(self, *args, **kwargs)
        if self.state.mixed_precision == "fp16" and self.device.type == "cpu" and self.is_fsdp2:
            self.native_amp, self.scaler = True, get_fsdp2_grad_scaler(device="cpu")

    Accelerator.__init__ = with_fp16_scaler


def launcher_env(accelerate_config: str, processes: int) -> dict[str, str]:
    """The ACCELERATE_* / FSDP_* variables `accelerate launch --config_file CONFIG --num_processes N` sets."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", accelerate_config, "--num_processes", str(processes),
                                               "script.py"])
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    return {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}


def init_process_group(run: int) -> None:
    """The gloo process group of run ``run``, its rendezvous under a prefix of its own in torchrun's store: a group
    made after another was destroyed would otherwise read the addresses the old one left there. accelerate takes a
    group it finds made."""
    import torch.distributed as dist

    env = os.environ
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False)
    dist.init_process_group("gloo", store=dist.PrefixStore(f"run{run}/", store), rank=int(env["RANK"]),
                            world_size=int(env["WORLD_SIZE"]))


def runs(argv: list[str]) -> list[tuple[str, list[str]]]:
    """CONFIG ARGS [--then CONFIG ARGS ...] -> [(CONFIG, ARGS), ...]"""
    groups = [[]]
    for arg in argv:
        if arg == "--then":
            groups.append([])
        else:
            groups[-1].append(arg)
    return [(group[0], group[1:]) for group in groups]


if __name__ == "__main__":
    from accelerate.state import AcceleratorState

    allow_fsdp_on_cpu()
    from cascadev.training.train import main

    for i, (accelerate_config, args) in enumerate(runs(sys.argv[1:])):
        for key in [k for k in os.environ if k.startswith(("ACCELERATE_", "FSDP_"))]:
            del os.environ[key]                                     # the previous run's
        os.environ.update(launcher_env(accelerate_config, int(os.environ["WORLD_SIZE"])), ACCELERATE_USE_CPU="true")
        init_process_group(i)
        main(args)                      # ends with accelerate's end_training: the process group is destroyed
        AcceleratorState._reset_state(reset_partial_state=True)      # the next run's Accelerator takes a new one
