"""benchmarks/train_step.py: the rows come from the training configs, and the model FLOPs it counts (the MFU's
numerator) agree with a count by hand."""

import importlib.util
import sys
from dataclasses import replace

import pytest

from helpers import ROOT


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("train_step", ROOT / "benchmarks" / "train_step.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module                        # its dataclass looks itself up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_rows_take_the_recipe_from_the_training_config(bench):
    finetune = bench.case_from_config("configs/dit_official_finetune.yaml", "cuda")
    assert (finetune.frames, finetune.size, finetune.batch, finetune.precision, finetune.checkpointing) == \
        (8, 128, 4, "fp16", True)                          # 8 frames at 1024 px, batch 4, fp16 as released
    base = bench.case_from_config("configs/base.yaml", "cuda", precision="fp32", checkpointing=False)
    assert (base.frames, base.size, base.batch, base.precision, base.checkpointing) == (16, 32, 2, "fp32", False)


def test_counted_flops_agree_with_the_hand_count(bench):
    # tiny DiT: D=96, 4 blocks with strides (1,2), (2,1), None, (1,2); 2 videos of 4 frames x 8x8 patches
    case = bench.case_from_config("configs/dit_tiny.yaml", "cpu", size=16, batch=2)
    D, videos, frames, side = 96, 2, 4, 8
    tokens = frames * side * side
    linear = 6 * (4 * 12 * D * D) * videos * tokens          # qkv, proj, fc1, fc2: 12 D^2 per block; fwd + bwd
    # attention: QK^T and AV, 2 * 2 * n^2 * D forward per part, x3 with backward
    attention = sum(videos * parts * 12 * n * n * D for parts, n in
                    [(4, tokens // 4), (2, tokens // 2), (1, tokens), (4, tokens // 4)])
    counted = bench.model_flops(case)
    assert 1.0 <= counted / (linear + attention) < 1.03, counted / (linear + attention)  # + embedders, adaLN, final
    assert bench.model_flops(replace(case, batch=4)) == 2 * counted
    assert bench.model_flops(replace(case, checkpointing=True)) == counted     # model FLOPs: no recomputation
