"""Run the training script with accelerate's FSDP on CPU processes (tests only): ``python -m torch.distributed.run
... tests/fsdp_on_cpu.py ARGS`` is ``python -m cascadev.training.train ARGS``.

accelerate (1.15) turns ``ACCELERATE_USE_FSDP`` into ``DistributedType.FSDP`` only on accelerators; on CPU processes
(``ACCELERATE_USE_CPU``) it stays MULTI_CPU, a plain DDP run. torch's FSDP2 (``fully_shard``) itself runs on CPU
over gloo, so this makes the one change accelerate does on a GPU -- the state's type and FSDP plugin -- and leaves
the rest (``prepare``, ``save_state``/``load_state`` through torch.distributed.checkpoint, ``get_state_dict``,
clipping, ``no_sync``) to accelerate's own FSDP2 code."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def allow_fsdp_on_cpu() -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP    # what later states copy

    AcceleratorState.__init__ = __init__


if __name__ == "__main__":
    assert os.environ.get("ACCELERATE_USE_FSDP") == "true" and os.environ.get("ACCELERATE_USE_CPU") == "true"
    allow_fsdp_on_cpu()
    from cascadev.errors import run_guarded
    from cascadev.training.train import parse_args, run_training

    args = parse_args(None)
    run_guarded("cascadev.training.train", lambda: run_training(args), args.debug)
