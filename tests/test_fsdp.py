"""The training script under accelerate's FSDP2 on 2 CPU processes over gloo, beside DDP: the same losses, an exact
resume in new processes, the export equal to what the sharded checkpoint gathers, the optimizer state and the EMA
sharded; validation samples drawn. Each launch takes the environment `accelerate launch --config_file` makes of
configs/accelerate/{ddp,fsdp}.yaml; tests/distributed_train.py lets accelerate shard on CPU processes."""

import json
import math
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import ROOT, subprocess_env
from cascadev.synthetic import write_clips

ACCELERATE = ROOT / "configs" / "accelerate"
DIT_TINY = ROOT / "configs" / "dit_tiny.yaml"
BASE_TINY = ROOT / "configs" / "base_tiny.yaml"
WEIGHTS = "diffusion_pytorch_model.safetensors"
# every step logged, a checkpoint at step 2, validation (loss and a sample) at step 4
COMMON = ["run.tensorboard=false", "run.log_every=1", "run.save_every=2", "run.val_every=4"]


def launch(tmp_path: Path, *runs: tuple[str, list[str]], machines: int = 1, processes: int = 2) -> None:
    """Training runs (accelerate config name, training argv) one after the other on 2 CPU processes (``processes``
    on one machine), one thread each,
    each with the environment `accelerate launch --config_file configs/accelerate/NAME` makes
    (tests/distributed_train.py: accelerate's own launcher starts CPU processes only through mpirun). ``machines=2``:
    as two machines of one process each, a torchrun agent per "machine" meeting at a main address (this host), as
    `accelerate launch --machine_rank R --main_process_ip HOST` starts them."""
    argv = [a for name, run in runs for a in ["--then", str(ACCELERATE / name), *run]][1:]
    script = [str(ROOT / "tests" / "distributed_train.py"), *argv]
    if machines == 1:
        agents = [["--standalone", "--nproc_per_node", str(processes)]]
    else:
        with socket.socket() as s:                              # a free port for the main machine's rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        agents = [["--nnodes", str(machines), "--node_rank", str(r), "--nproc_per_node", "1", "--master_addr",
                   "127.0.0.1", "--master_port", str(port)] for r in range(machines)]
    env = subprocess_env(tmp_path, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    started = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *agent, *script], env=env, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for agent in agents]
    try:
        for done in started:
            _, stderr = done.communicate(timeout=300)
            errors = [line for line in stderr.splitlines() if "Error" in line or "error:" in line]
            assert done.returncode == 0, "\n".join(errors[-8:]) or stderr[-3000:]
    finally:
        for agent in started:               # one failed or hung: the other agent would wait for it
            if agent.poll() is None:
                agent.kill()
                agent.communicate()


def run_args(config: Path, run_dir: Path, steps: int, *extra: str) -> list[str]:
    return ["--config", str(config), "--max-steps", str(steps), "--set", f"run.dir={run_dir}", *COMMON, *extra]


def logged(run_dir: Path) -> dict[int, dict[str, float]]:
    """{step: {name: value}} of train.log's lines (training means and validation)."""
    out: dict[int, dict[str, float]] = {}
    for step, rest in re.findall(r"INFO step (\d+)  (.*)", (run_dir / "train.log").read_text()):
        pairs = re.findall(r"(\S+) (-?[\d.]+(?:e[-+]\d+)?)", rest)
        out.setdefault(int(step), {}).update({k: float(v) for k, v in pairs})
    return out


def assert_equal_weights(a: Path, b: Path, atol: float = 0.0) -> None:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for k in wa:
        close = torch.equal(wa[k], wb[k]) if atol == 0 else torch.allclose(wa[k], wb[k], atol=atol, rtol=0)
        assert close, (k, (wa[k] - wb[k]).abs().max())


def gathered_checkpoint(checkpoint: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """The model weights of a sharded (torch.distributed.checkpoint) checkpoint, gathered whole by torch."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    whole = tmp_path / f"{checkpoint.name}.pt"
    dcp_to_torch_save(checkpoint / "pytorch_model_fsdp_0", whole)
    state = torch.load(whole, weights_only=True)
    whole.unlink()
    return state.get("model", state)


def sharded_tensors(checkpoint: Path, folder: str, suffix: str) -> int:
    """How many tensors of ``folder`` in a sharded checkpoint have keys ending in ``suffix``, asserting that each
    (but scalars) is stored as 2 chunks, one written by each rank."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(checkpoint / folder)).read_metadata().state_dict_metadata
    tensors = {k: m for k, m in metadata.items() if k.endswith(suffix)}
    assert all(len(m.chunks) == 2 for m in tensors.values() if m.size.numel() > 1), (folder, suffix)
    assert len(list((checkpoint / folder).glob("__*_0.distcp"))) == 2
    return len(tensors)


def assert_same_trajectory(ddp: Path, fsdp: Path, steps: int, keys: tuple[str, ...]) -> None:
    """The logged values of each step equal within rounding (train.log shows 4 significant digits)."""
    a, b = logged(ddp), logged(fsdp)
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    for step in a:
        for key in keys:
            assert a[step][key] == pytest.approx(b[step][key], rel=2e-3), (step, key)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    write_clips(folder, 4, frames=5, height=64, width=80)
    return folder


@pytest.mark.slow
def test_dit_fsdp_equals_ddp_resumes_exactly_and_shards_optimizer_and_ema(clips, tmp_path):
    data = [f"data.videos={clips}", "data.height=32", "data.width=32"]       # EMA on (dit_tiny: 0.99); latents 4x4
    launch(tmp_path, ("ddp.yaml", run_args(DIT_TINY, tmp_path / "ddp", 4, *data)),
           ("ddp.yaml", run_args(DIT_TINY, tmp_path / "ddp_parts", 2, *data)),
           ("fsdp.yaml", run_args(DIT_TINY, tmp_path / "whole", 4, *data)),
           ("fsdp.yaml", run_args(DIT_TINY, tmp_path / "parts", 2, *data)),
           ("fsdp.yaml", run_args(DIT_TINY, tmp_path / "bf16", 2, *data, "run.mixed_precision=bf16",
                                  "run.val_every=2")),
           ("fsdp.yaml", run_args(DIT_TINY, tmp_path / "fp16", 4, *data, "run.mixed_precision=fp16")),
           ("fsdp.yaml", run_args(DIT_TINY, tmp_path / "fp16_parts", 2, *data, "run.mixed_precision=fp16")))
    # resumed in new processes, as two machines of one process each (the same 2-way sharding; DDP's too)
    launch(tmp_path, ("fsdp_multinode.yaml", run_args(DIT_TINY, tmp_path / "parts", 4, *data)),
           ("ddp_multinode.yaml", run_args(DIT_TINY, tmp_path / "ddp_parts", 4, *data)),
           ("fsdp_multinode.yaml", run_args(DIT_TINY, tmp_path / "fp16_parts", 4, *data, "run.mixed_precision=fp16")),
           machines=2)
    ddp, whole, parts = tmp_path / "ddp", tmp_path / "whole", tmp_path / "parts"

    # DDP: data sharded over the 2 processes, and killed at step 2 and resumed equals uninterrupted, bit for bit
    assert "on 2 process(es)" in (ddp / "train.log").read_text()
    assert len(list((ddp / "checkpoints/step_00000004").glob("random_states_*.pkl"))) == 2
    for sub in ("model", "ema"):
        assert_equal_weights(ddp / "final" / sub / WEIGHTS, tmp_path / "ddp_parts/final" / sub / WEIGHTS)

    # the same training as DDP within rounding: logged losses, gradient norms, validation; the final weights
    assert_same_trajectory(ddp, whole, 4, ("loss", "mse", "vb", "grad_norm"))
    for key in ("val/loss", "val/psnr_sampled_vs_input"):
        assert logged(ddp)[4][key] == pytest.approx(logged(whole)[4][key], rel=2e-3)
    assert (whole / "samples/step_00000004.mp4").is_file()       # drawn by both ranks, written by the main one
    for sub in ("model", "ema"):
        assert_equal_weights(ddp / "final" / sub / WEIGHTS, whole / "final" / sub / WEIGHTS, atol=1e-5)

    # bf16 under FSDP (FSDP2's MixedPrecisionPolicy: bf16 weights in the forward, fp32 shards) trains, validates and
    # exports; its losses within bf16's rounding of fp32's
    bf16 = logged(tmp_path / "bf16")
    for step in (1, 2):
        assert bf16[step]["loss"] == pytest.approx(logged(whole)[step]["loss"], rel=2e-2)
    assert "val/psnr_sampled_vs_input" in bf16[2] and (tmp_path / "bf16/final/ema" / WEIGHTS).is_file()

    # fp16 under FSDP: fp16 weights in the forward and accelerate's FSDP2 GradScaler (unscaled before clipping; its
    # state in every checkpoint): losses within fp16's rounding of fp32's, weights that fp16 changed, and killed at
    # step 2 and resumed in new processes, bit-identical to uninterrupted, scaler included
    fp16 = tmp_path / "fp16"
    for step in range(1, 5):
        assert logged(fp16)[step]["loss"] == pytest.approx(logged(whole)[step]["loss"], rel=1e-2)
    scaler = torch.load(fp16 / "checkpoints/step_00000004/scaler.pt", weights_only=True)
    assert scaler["_growth_tracker"] == 4                           # 4 steps taken, none skipped for overflow
    half, full = (load_file(str(run / "final/model" / WEIGHTS)) for run in (fp16, whole))
    assert any(not torch.equal(half[k], full[k]) for k in full)     # fp16 was in the forward
    for sub in ("model", "ema"):
        assert_equal_weights(fp16 / "final" / sub / WEIGHTS, tmp_path / "fp16_parts/final" / sub / WEIGHTS)

    # killed at step 2 and resumed in new processes on two "machines": bit-identical weights, EMA and log
    for sub in ("model", "ema"):
        assert_equal_weights(whole / "final" / sub / WEIGHTS, parts / "final" / sub / WEIGHTS)
    assert (parts / "train.log").read_text().count("on 2 process(es)") == 2          # both halves on 2 ranks
    values = [{k: v for k, v in logged(run)[4].items() if not k.endswith("_per_s")} for run in (whole, parts)]
    assert values[0] == values[1] and "val/psnr_sampled_vs_input" in values[0]

    # sharded checkpoints: the model's and the optimizer's tensors written half by each rank
    last = whole / "checkpoints/step_00000004"
    assert not (last / "model.safetensors").exists() and len(list(last.glob("random_states_*.pkl"))) == 2
    trained = len(load_file(str(whole / "final/model" / WEIGHTS)))          # every parameter trains
    assert sharded_tensors(last, "pytorch_model_fsdp_0", "") == trained
    for moment in (".exp_avg", ".exp_avg_sq"):
        assert sharded_tensors(last, "optimizer_0", moment) == trained
    # the export is what torch gathers of the sharded checkpoint; the EMA export is the checkpoint's (whole) EMA
    exported = load_file(str(whole / "final/model" / WEIGHTS))
    gathered = gathered_checkpoint(last, tmp_path)
    assert exported.keys() == gathered.keys()
    assert all(torch.equal(exported[k], gathered[k]) for k in exported)
    assert_equal_weights(last / "ema.safetensors", whole / "final/ema" / WEIGHTS)
    assert json.loads((last / "trainer.json").read_text())["ema_step"] == 4


@pytest.mark.slow
def test_base_fsdp_equals_ddp_and_resumes_exactly(clips, tmp_path):
    """Stage C (TextDiT, sharded by TextDiTBlock) with its EMA and validation latents; the four runs in one launch
    (each with its own process group), the resumed one included."""
    captions = tmp_path / "list.jsonl"
    captions.write_text("".join(json.dumps({"path": str(clip), "caption": f"clip {i}"}) + "\n"
                                for i, clip in enumerate(sorted(clips.glob("*.mp4")))))
    data = [f"data.videos={captions}", "data.num_frames=2"]
    launch(tmp_path, ("ddp.yaml", run_args(BASE_TINY, tmp_path / "ddp", 4, *data)),
           ("fsdp.yaml", run_args(BASE_TINY, tmp_path / "whole", 4, *data)),
           ("fsdp.yaml", run_args(BASE_TINY, tmp_path / "parts", 2, *data)),
           ("fsdp.yaml", run_args(BASE_TINY, tmp_path / "parts", 4, *data)))
    ddp, whole, parts = tmp_path / "ddp", tmp_path / "whole", tmp_path / "parts"
    assert_same_trajectory(ddp, whole, 4, ("loss", "grad_norm"))
    assert logged(ddp)[4]["val/loss"] == pytest.approx(logged(whole)[4]["val/loss"], rel=2e-3)
    assert (whole / "samples/step_00000004.safetensors").is_file()
    for sub in ("base_dit", "model/base_dit"):                      # EMA (what inference loads) and trained
        name = f"{sub}/{WEIGHTS}"
        assert_equal_weights(ddp / "final" / name, whole / "final" / name, atol=1e-5)
        assert_equal_weights(whole / "final" / name, parts / "final" / name)
    last = whole / "checkpoints/step_00000004"
    trained = len(load_file(str(whole / "final/model/base_dit" / WEIGHTS)))
    assert sharded_tensors(last, "pytorch_model_fsdp_0", "") == trained
    assert sharded_tensors(last, "optimizer_0", ".exp_avg") == trained
    exported = load_file(str(whole / "final/model/base_dit" / WEIGHTS))
    gathered = gathered_checkpoint(last, tmp_path)
    assert all(torch.equal(exported[k], gathered[k]) for k in exported) and exported.keys() == gathered.keys()


@pytest.mark.slow
def test_an_fsdp_checkpoint_of_two_processes_resumes_on_one(clips, tmp_path):
    """torch.distributed.checkpoint reshards the model and the optimizer, and the EMA file is whole: a run of 2
    processes goes on on 1. Resumed at its last step, the 1-process run exports exactly what the 2-process run did;
    resumed with a step to go, it trains on (its batches differ from 2 processes': each rank draws its own)."""
    import shutil

    data = [f"data.videos={clips}", "data.height=32", "data.width=32"]
    two, one, on = tmp_path / "two", tmp_path / "one", tmp_path / "on"
    launch(tmp_path, ("fsdp.yaml", run_args(DIT_TINY, two, 2, *data)))
    for copy in (one, on):
        shutil.copytree(two, copy)
        shutil.rmtree(copy / "final")
    launch(tmp_path, ("fsdp.yaml", run_args(DIT_TINY, one, 2, *data)),
           ("fsdp.yaml", run_args(DIT_TINY, on, 3, *data)), processes=1)
    for run in (one, on):
        log = (run / "train.log").read_text()
        assert "on 1 process(es)" in log and "resumed from" in log and "(step 2)" in log
    for sub in ("model", "ema"):
        assert_equal_weights(two / "final" / sub / WEIGHTS, one / "final" / sub / WEIGHTS)
    assert math.isfinite(logged(on)[3]["loss"]) and (on / "checkpoints/step_00000003").is_dir()


def test_a_checkpoint_resumes_only_under_the_sharding_that_wrote_it(tmp_path):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from cascadev.config import ConfigError
    from cascadev.training.train import resume

    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    (ddp / "model.safetensors").parent.mkdir()
    (ddp / "model.safetensors").touch()
    (fsdp / "pytorch_model_fsdp_0").mkdir(parents=True)
    for path, kind, message in ((ddp, DistributedType.FSDP, "written without FSDP .whole weights., this run is under"),
                                (fsdp, DistributedType.MULTI_GPU, "written under FSDP .sharded., this run is not")):
        session = SimpleNamespace(accelerator=SimpleNamespace(distributed_type=kind))
        with pytest.raises(ConfigError, match=message):
            resume(SimpleNamespace(checkpoint=(2, path)), session)
