"""Stage distill: the maths (unrolled samplers equal the pipeline's, the detail loss), the real training script with
the built-in tiny cascade as teacher (resumes exactly, exports a cascade folder that decodes at the student's
steps, through the CLI too), the one-line errors, and the built-in distilled decoder's shared parts."""

import json
from pathlib import Path

import pytest
import torch

from cascadev.training.config import load_train_config
from cascadev.training.diffusion import DiffusionConfig
from cascadev.training.distillation import detail_loss, ode_scheduler, sample_unrolled
from cascadev.training.checkpoints import checkpoints
from cascadev.training.train import main
from helpers import SHIPPED_CASCADE, randomize_, run_cli

ROOT = Path(__file__).resolve().parents[1]
DISTILL_TINY = ROOT / "configs" / "distill_tiny.yaml"
# 4 frames of 64 x 64 px (latents 4 x 8 x 8) from generated clips; the teacher is the shipped tiny cascade
SMALL = ["data.height=64", "data.width=64", "data.num_frames=4", "data.val_count=1", "data.batch_size=2",
         "run.tensorboard=false", "run.log_every=1", "run.save_every=2", "run.val_every=4", "optim.warmup_steps=1"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    from cascadev.synthetic import write_clips
    folder = tmp_path_factory.mktemp("clips")
    write_clips(folder, 3, frames=5, height=64, width=64)
    return folder


def train(run_dir: Path, clips: Path, steps: int, *overrides: str) -> Path:
    return main(["--config", str(DISTILL_TINY), "--max-steps", str(steps),
                 "--set", f"data.videos={clips}", f"run.dir={run_dir}", *SMALL, *overrides])


@pytest.mark.parametrize("objective", ["rf", "iddpm"])
def test_unrolled_student_and_teacher_samplers_equal_the_pipelines(objective):
    from cascadev.pipelines.sampling import sample
    from dit import build_dit

    dit = randomize_(build_dit("tiny"), std=0.02)
    diffusion = DiffusionConfig(objective=objective)
    g = torch.Generator().manual_seed(0)
    cond, noise = torch.randn(1, 16, 4, 8, 8, generator=g), torch.randn(1, 4, 4, 8, 8, generator=g)
    for student, steps in ((True, 1), (True, 2), (False, 3)):
        scheduler = ode_scheduler(diffusion, student=student)
        with torch.no_grad():
            ours = sample_unrolled(dit, cond, noise, scheduler, steps)
        assert torch.equal(ours, sample(dit, cond, noise, scheduler, steps))
    if objective == "iddpm":      # a 1-step student starts at the last timestep and predicts v
        scheduler = ode_scheduler(diffusion, student=True)
        scheduler.set_timesteps(1)
        assert scheduler.timesteps.tolist() == [999] and scheduler.config.prediction_type == "v_prediction"
    # gradients reach the student through its steps
    dit.requires_grad_(True)
    sample_unrolled(dit, cond, noise, ode_scheduler(diffusion, student=True), 2).square().mean().backward()
    assert dit.final_layer.linear.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("detail", ["average", "central"])
def test_unrolled_sampler_over_overlapping_windows_equals_the_pipelines_and_trains_every_window(detail):
    """Crops larger than the window: the student samples over the decoder's overlapping windows, as decode does."""
    from cascadev.pipelines.sampling import sample
    from cascadev.pipelines.tiling import Tiling, window_crops
    from dit import build_dit

    dit = randomize_(build_dit("tiny"), std=0.02)                    # window 4 frames x 16 x 16 latents
    tiling = Tiling("blend", detail=detail)
    g = torch.Generator().manual_seed(0)
    cond, noise = torch.randn(1, 16, 6, 24, 20, generator=g), torch.randn(1, 4, 6, 24, 20, generator=g)
    assert len(window_crops(dit.window, (6, 24, 20), tiling)) == 2 * 2 * 2
    scheduler = ode_scheduler(DiffusionConfig(objective="rf"), student=True)
    with torch.no_grad():
        ours = sample_unrolled(dit, cond, noise, scheduler, 2, tiling)
    assert torch.equal(ours, sample(dit, cond, noise, scheduler, 2, tiling))
    # every window's output reaches the loss: a latent only the last window covers moves the gradient
    dit.requires_grad_(True)
    x = noise.clone().requires_grad_(True)
    sample_unrolled(dit, cond, x, scheduler, 1, tiling)[:, :, -1, -1, -1].sum().backward()
    assert x.grad[:, :, -1, -1, -1].abs().sum() > 0 and dit.final_layer.linear.weight.grad.abs().sum() > 0


def test_a_ddp_wrapped_student_samples_as_the_bare_network(tmp_path):
    """Under DDP the student is called through its wrapper (for the gradients' all-reduce), its settings read inside."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from cascadev.pipelines.tiling import Tiling
    from dit import build_dit

    dit = randomize_(build_dit("tiny"), std=0.02)
    g = torch.Generator().manual_seed(0)
    cond, noise = torch.randn(1, 16, 4, 8, 24, generator=g), torch.randn(1, 4, 4, 8, 24, generator=g)
    scheduler = ode_scheduler(DiffusionConfig(objective="rf"), student=True)
    bare = sample_unrolled(dit, cond, noise, scheduler, 1, Tiling("blend", detail="central"))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = sample_unrolled(DistributedDataParallel(dit), cond, noise, scheduler, 1,
                                  Tiling("blend", detail="central"))
    finally:
        dist.destroy_process_group()
    assert torch.equal(wrapped, bare)


def test_a_two_step_flow_student_takes_its_second_step_at_the_last_sigma_and_refuses_one_step():
    from cascadev.config import ConfigError
    from cascadev.pipelines.sampling import sample
    from dit import build_dit

    rf = DiffusionConfig(objective="rf")
    scheduler = ode_scheduler(rf, student=True)
    scheduler.set_timesteps(2)                   # diffusers' spacing: the second step starts at sigma 0.001
    assert scheduler.sigmas[1].item() == pytest.approx(0.001)
    scheduler = ode_scheduler(rf, student=True, last_sigma=0.5)
    scheduler.set_timesteps(2)
    assert scheduler.sigmas.tolist() == pytest.approx([1.0, 0.5, 0.0])
    dit = randomize_(build_dit("tiny"), std=0.02)
    g = torch.Generator().manual_seed(0)
    cond, noise = torch.randn(1, 16, 4, 8, 8, generator=g), torch.randn(1, 4, 4, 8, 8, generator=g)
    with torch.no_grad():
        assert torch.equal(sample_unrolled(dit, cond, noise, scheduler, 2), sample(dit, cond, noise, scheduler, 2))
        # diffusers divides 0 by 0 for one step of a shift_terminal schedule: one line, not NaN frames
        with pytest.raises(ValueError, match=r"no finite noise levels at 1 step\(s\) \(its shift_terminal 0.5 "
                                             r"needs at least 2 steps\)"):
            sample(dit, cond, noise, scheduler, 1)
    with pytest.raises(ValueError, match="iddpm student's DDIM steps"):
        ode_scheduler(DiffusionConfig(objective="iddpm"), student=True, last_sigma=0.5)
    for steps, sigma in ((1, 0.5), (2, 1.5)):
        with pytest.raises(ConfigError, match=r"student_last_sigma: a noise level in \(0, 1\), for student_steps >= 2"):
            load_train_config(DISTILL_TINY, [f"distill.student_steps={steps}", f"distill.student_last_sigma={sigma}"])


def test_detail_loss_is_zero_for_the_same_frames_and_penalises_blur():
    from cascadev.synthetic import make_clip
    import torch.nn.functional as F

    video = make_clip(1, 2, 64, 64, "shapes")[None]
    blurred = F.avg_pool3d(video, (1, 3, 3), stride=1, padding=(0, 1, 1))
    shifted = torch.roll(video, 5, dims=-1)               # the same detail elsewhere: the spectrum's amplitude is kept
    assert detail_loss(video, video, 1 / 16).item() == 0
    assert detail_loss(blurred, video, 1 / 16).item() > 0.3
    assert detail_loss(shifted, video, 1 / 16).item() < 1e-4


@pytest.mark.slow
def test_distill_script_resumes_exactly_and_exports_a_cascade_at_the_students_steps(clips, tmp_path, capsys):
    from cascadev.pipelines.cascade import CascadeVPipeline
    from cascadev.pipelines.sampling import scheduler_name
    from cascadev.training.tasks.distill_task import DistillTask

    common = ["distill.detail_weight=0.1", "distill.student_steps=1"]
    whole = train(tmp_path / "whole", clips, 4, *common)
    parts = train(tmp_path / "parts", clips, 2, *common)
    assert [s for s, _ in checkpoints(parts / "checkpoints")] == [2]
    train(tmp_path / "parts", clips, 4, *common)                      # resumes from step 2 by itself
    for sub in ("dit", "model"):
        a = (whole / "final" / sub / "diffusion_pytorch_model.safetensors").read_bytes()
        assert a == (parts / "final" / sub / "diffusion_pytorch_model.safetensors").read_bytes(), sub
    log = (whole / "train.log").read_text()
    assert "detail" in log and "val/mse_to_teacher" in log
    # the export: a cascade of the student at its steps, the teacher cascade's other parts and settings
    pipe = CascadeVPipeline.from_pretrained(str(whole / "final"))
    teacher = json.loads((SHIPPED_CASCADE / "model_index.json").read_text())
    assert pipe.config.num_inference_steps == 1 and scheduler_name(pipe.scheduler) == "flow"
    assert pipe.config.colour_fix == teacher["colour_fix"] and pipe.previewer is not None
    assert pipe.config.tile_detail == "central"                       # distill.tile_detail, the config's default
    # what decode runs at the saved steps is what the student trained on: the unrolled sampler, exactly
    task = DistillTask(load_train_config(whole / "config.yaml"))
    from cascadev.pipelines.cascade import seeded_noise
    from cascadev.pipelines.conditioning import semantic_small, upsample_condition
    g = torch.Generator().manual_seed(1)
    for side in (2, 6):          # 8 x 8 latents: one window; 24 x 24: 2 x 2 overlapping tiles, central detail
        latents = torch.randn(1, 16, 4, side, side, generator=g)
        z = pipe.decode_latents(latents, seed=5)
        cond = upsample_condition(semantic_small(latents, pipe.scale_factor), (4, 4 * side, 4 * side))
        with torch.no_grad():
            ours = sample_unrolled(pipe.dit, cond, seeded_noise((1, 4, 4, 4 * side, 4 * side), 5), ode_scheduler(
                task.config.diffusion, student=True), 1, task.tiling())
        assert torch.allclose(z, ours, atol=1e-6), side
    latents = latents[..., :2, :2]
    video = pipe.decode(latents)
    assert video.shape == (1, 3, 4, 64, 64)

    # the student at its 1 step through the CLI: decode and reconstruct with --weights RUN/final
    from cascadev.pipelines.latents import save_latents
    save_latents(tmp_path / "z.safetensors", latents)
    code, out, err = run_cli(capsys, "decode", tmp_path / "z.safetensors", "-o", tmp_path / "d.mp4",
                             "--weights", whole / "final")
    assert code == 0, err
    assert (tmp_path / "d.mp4").is_file()
    clip = sorted(clips.glob("*.mp4"))[0]
    code, out, err = run_cli(capsys, "reconstruct", clip, "-o", tmp_path / "r.mp4", "--weights", whole / "final",
                             "--frames", "4")
    assert code == 0, err
    assert (tmp_path / "r.mp4").is_file()
    code, out, err = run_cli(capsys, "bench-recon", clips, "-o", tmp_path / "bench", "--size", 64, "--frames", 4,
                             "--limit", 1, "--metrics", "psnr", "--weights", whole / "final")
    assert code == 0, err
    assert json.loads((tmp_path / "bench" / "results.json").read_text())["settings"]["steps"] == 1
    code, out, err = run_cli(capsys, "generate", "a red disc", "-o", tmp_path / "g.mp4", "--cascade", whole / "final",
                             "--frames", 2, "--size", "64x64", "--steps", 1)     # the built-in base model's latents
    assert code == 0, err
    assert (tmp_path / "g.mp4").is_file()


def test_a_missing_teacher_is_one_line_naming_the_file_and_where_to_get_it(clips, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match=r"hf download ByteDance/CascadeV s1024\.effn-f32\.pth"):
        train(tmp_path / "run", clips, 1, "distill.teacher=official:nowhere/s1024.effn-f32.pth")
    with pytest.raises(FileNotFoundError, match="nowhere/model_index.json not found"):
        train(tmp_path / "run", clips, 1, "distill.teacher=nowhere")
    assert not (tmp_path / "run").exists()                   # nothing written before the inputs are checked
    code, out, err = run_cli(capsys, "train", "--config", DISTILL_TINY, "--set", f"data.videos={clips}",
                             f"run.dir={tmp_path / 'run'}", "distill.teacher=official:nowhere/s1024.effn-f32.pth")
    assert code != 0 and len(err.strip().splitlines()) == 1 and "s1024.effn-f32.pth" in err
    from cascadev.config import ConfigError
    with pytest.raises(ConfigError, match="needs distill.teacher"):
        load_train_config(DISTILL_TINY, ["distill.teacher=null"])
    with pytest.raises(ConfigError, match="teacher_scheduler"):
        load_train_config(DISTILL_TINY, ["distill.teacher_scheduler=fast"])


def test_builtin_distilled_decoder_shares_the_tiny_cascades_parts_and_decodes_in_two_steps():
    from cascadev.pipelines.cascade import (SHARED_PARTS_FILE, TINY_CASCADE, TINY_DISTILLED, CascadeVPipeline,
                                            load_cascade)
    from cascadev.pipelines.sampling import scheduler_name

    stored = sum(f.stat().st_size for f in TINY_DISTILLED.rglob("*") if f.is_file())
    assert stored < 4 * 2 ** 20                                    # the DiT in fp16 and configs only
    assert not (TINY_DISTILLED / "vae").exists() and (TINY_DISTILLED / SHARED_PARTS_FILE).is_file()
    pipe = CascadeVPipeline.from_pretrained(str(TINY_DISTILLED))
    teacher = CascadeVPipeline.from_pretrained(str(TINY_CASCADE))
    for part in ("semantic_encoder", "vae", "previewer"):
        ours, theirs = getattr(pipe, part).state_dict(), getattr(teacher, part).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), part
    assert pipe.dit.dtype == torch.float32                         # stored in fp16, runs in fp32
    assert pipe.config.num_inference_steps == 2 and scheduler_name(pipe.scheduler) == "flow"
    assert pipe.scheduler.config.shift_terminal == 0.5                # its second step starts at sigma 0.5
    assert (pipe.config.colour_fix, pipe.config.demo) == (teacher.config.colour_fix, teacher.config.demo)
    assert (pipe.config.tile_detail, teacher.config.tile_detail) == ("central", "average")    # saved with each
    # load_cascade (the CLI's loader): the Previewer only where asked for, a part given replaces the shared one
    assert load_cascade(TINY_DISTILLED, with_previewer=False).previewer is None
    from cascadev.synthetic import make_clip
    video = make_clip(100_000, 2, 64, 64, "shapes")[None]
    out = pipe.reconstruct(video)
    assert out.shape == video.shape and torch.isfinite(out).all()


def test_a_shared_part_that_is_missing_is_one_line(tmp_path):
    import shutil
    from cascadev.pipelines.cascade import SHARED_PARTS_FILE, TINY_DISTILLED, CascadeVPipeline

    folder = tmp_path / "copy"
    shutil.copytree(TINY_DISTILLED, folder)          # ../tiny_cascade/... is not beside the copy
    with pytest.raises(FileNotFoundError, match=f"{SHARED_PARTS_FILE}: its .* is ../tiny_cascade/"):
        CascadeVPipeline.from_pretrained(str(folder))


def test_a_dit_folder_teacher_of_an_eps_objective_exports_a_ddim_student_at_two_steps(clips, tmp_path):
    from cascadev.pipelines.cascade import CascadeVPipeline
    from cascadev.pipelines.sampling import scheduler_name

    run = train(tmp_path / "run", clips, 1, f"distill.teacher={SHIPPED_CASCADE / 'dit'}", "diffusion.objective=iddpm",
                "distill.student_steps=2", "distill.teacher_steps=2", "distill.detail_weight=0")
    pipe = CascadeVPipeline.from_pretrained(str(run / "final"))
    assert scheduler_name(pipe.scheduler) == "ddim" and pipe.config.num_inference_steps == 2
    assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.previewer is None
    video = pipe.decode(torch.randn(1, 16, 4, 2, 2))
    assert video.shape == (1, 3, 4, 64, 64) and torch.isfinite(video).all()


def test_the_built_in_two_step_decoder_at_one_step_is_one_line_before_any_work(tmp_path, capsys):
    from cascadev.pipelines.cascade import TINY_DISTILLED
    from cascadev.pipelines.latents import save_latents

    save_latents(tmp_path / "z.safetensors", torch.zeros(1, 16, 4, 2, 2))
    code, out, err = run_cli(capsys, "decode", tmp_path / "z.safetensors", "-o", tmp_path / "d.mp4",
                             "--weights", TINY_DISTILLED, "--steps", "1")
    assert code == 2 and err.count("\n") == 1 and "shift_terminal 0.5 needs at least 2 steps" in err
    assert not (tmp_path / "d.mp4").exists() and "decoding" not in out
