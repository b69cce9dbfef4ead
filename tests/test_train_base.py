"""Stage "stage_c" (Stage C, the base model): the text-to-video TextDiT trained on semantic latents and captions."""

import json
from pathlib import Path

import pytest
import torch
from einops import rearrange
from safetensors import safe_open
from safetensors.torch import load_file

from cascadev.config import ConfigError
from cascadev.synthetic import make_clip
from cascadev.training.cache_latents import main as cache_main
from cascadev.training.config import load_train_config
from cascadev.training.data import LatentDataset, VideoDataset, make_loader, split_validation
from cascadev.training.tasks import StageCTask
from cascadev.training.checkpoints import checkpoints
from cascadev.training.train import main

ROOT = Path(__file__).resolve().parents[1]
BASE_TINY = ROOT / "configs" / "base_tiny.yaml"
DIT_TINY = ROOT / "configs" / "dit_tiny.yaml"
COLOURS = {"red": (0.8, -0.6, -0.6), "blue": (-0.6, -0.4, 0.8)}   # caption -> clip colour (RGB in [-1, 1])
PER_CLASS = 4


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Two kinds of generated clips, each with its caption (a JSONL list, the last clip held out), and a tiny
    semantic encoder whose BatchNorm statistics are those of these frames (as a "semantic" run leaves them;
    a random encoder's initial statistics squash every latent towards 0)."""
    from cascadev.video_io import write_video
    from vae.semantic_encoder import build_semantic_encoder

    folder = tmp_path_factory.mktemp("toy")
    rows, frames = [], []
    for i in range(PER_CLASS):                                       # interleaved: both kinds in the training split
        for k, (caption, colour) in enumerate(COLOURS.items()):
            clip = (torch.tensor(colour).view(3, 1, 1, 1)
                    + 0.15 * make_clip(10 * k + i, 4, 64, 64, "gradient")).clamp(-1, 1)
            write_video(folder / f"{caption}_{i}.mp4", clip, fps=8)
            rows.append({"path": f"{caption}_{i}.mp4", "caption": caption})
            frames.append(rearrange(clip, "c t h w -> t c h w"))
    (folder / "list.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    encoder = build_semantic_encoder("tiny")
    encoder.mapper[1].momentum = None                                # cumulative average over one pass
    with torch.no_grad():
        encoder.train()(torch.cat(frames))
    encoder.mapper[1].momentum = 0.1
    encoder.save_pretrained(folder / "encoder")
    return folder


def overrides(toy: Path) -> list[str]:
    return [f"data.videos={toy / 'list.jsonl'}", f"condition.semantic_weights={toy / 'encoder'}", "data.num_frames=2"]


def train(run_dir: Path, toy: Path, steps: int, *extra: str) -> Path:
    return main(["--config", str(BASE_TINY), "--max-steps", str(steps), "--set", *overrides(toy), f"run.dir={run_dir}",
                 "run.tensorboard=false", *extra])


def assert_same_weights(a: Path, b: Path, atol: float = 1e-6) -> None:
    wa = load_file(str(a / "diffusion_pytorch_model.safetensors"))
    wb = load_file(str(b / "diffusion_pytorch_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=atol), k


@pytest.mark.slow
def test_base_script_resumed_run_equals_uninterrupted(toy, tmp_path, tiny_pipeline_dir):
    # gradient accumulation, image batches (as_images), EMA and validation all take part
    common = ["optim.grad_accum=2", "data.image_prob=0.5", "run.save_every=2", "run.val_every=3", "run.log_every=1",
              "run.val_sample_steps=2"]
    whole = train(tmp_path / "whole", toy, 3, *common)
    parts = train(tmp_path / "parts", toy, 2, *common)
    train(tmp_path / "parts", toy, 3, *common)                       # resumes from step 2 by itself
    assert [s for s, _ in checkpoints(parts / "checkpoints")] == [2, 3]
    for sub in ("final/base_dit", "final/model/base_dit"):           # EMA weights, trained weights
        assert_same_weights(whole / sub, parts / sub)
    start = load_file(str(parts / "checkpoints/step_00000002/model.safetensors"))
    end = load_file(str(whole / "final/model/base_dit/diffusion_pytorch_model.safetensors"))
    assert not torch.allclose(start["final_layer.linear.weight"], end["final_layer.linear.weight"])
    log = (whole / "train.log").read_text()
    assert "val/loss" in log and "vb" in log
    # latents for `cascadev decode`
    with safe_open(str(whole / "samples/step_00000003.safetensors"), framework="pt") as f:
        assert (f.metadata() or {}).get("prompt") in COLOURS

    # a checkpoint is a TextDiT folder; final/ is a TextToVideoPipeline root (cascade apart)
    from cascadev.pipelines.text_to_video import load_text_to_video
    from dit.text_dit import TextDiT
    TextDiT.from_legacy_folder(whole / "checkpoints/step_00000003")
    pipe = load_text_to_video(whole / "final", cascade=tiny_pipeline_dir)
    assert type(pipe.base_scheduler).__name__ == "DPMSolverMultistepScheduler"     # iddpm's (eps) sampler, exported
    pipe.set_progress_bar_config(disable=True)
    video = pipe("red", num_frames=2, height=64, width=64, num_inference_steps=2, decoder_num_inference_steps=1).frames
    assert video.shape == (1, 3, 2, 64, 64)


def test_base_trains_from_a_latent_cache_with_captions(toy, tmp_path):
    fixed = [*overrides(toy), "data.crop=center", "data.flip_prob=0", "data.start_jitter=false"]
    cache = cache_main(["--config", str(BASE_TINY), "--out", str(tmp_path / "cache"), "--set", *fixed])
    files = sorted(cache.glob("*.safetensors"))
    assert len(files) == 2 * PER_CLASS - 1                            # the last clip is held out
    config = load_train_config(BASE_TINY, fixed)
    task = StageCTask(config)
    pixels = make_loader(VideoDataset(split_validation(config.data)[0], config.data), 3, seed=5)
    cached = make_loader(LatentDataset(cache), 3, seed=5)
    for _ in range(3):                                                # crosses an epoch boundary
        a, b = next(pixels), next(cached)
        assert set(b) == {"semantic", "caption", "skipped"} and b["semantic"].shape == (3, 16, 2, 2, 2)
        assert a["caption"] == b["caption"] and set(a["caption"]) <= set(COLOURS)
        assert torch.allclose(task.latents(a), task.latents(b), atol=1e-5)
        la, _ = task.loss(task.model, a, torch.Generator().manual_seed(0), as_images=False)
        lb, _ = task.loss(task.model, b, torch.Generator().manual_seed(0), as_images=False)
        assert torch.allclose(la, lb, atol=1e-5)
    run = train(tmp_path / "run", toy, 1, f"data.latents={cache}", 'data.videos=""', *fixed[1:])
    assert (run / "final/base_dit/diffusion_pytorch_model.safetensors").is_file()
    with pytest.raises(ConfigError, match="holds stage stage_c inputs, the config trains stage dit"):
        main(["--config", str(DIT_TINY), "--max-steps", "1", "--set", f"data.latents={cache}",
              f"run.dir={tmp_path / 'dit'}", "run.tensorboard=false"])


@pytest.mark.slow
def test_tiny_model_learns_two_captions(toy, tiny_pipeline_dir):
    """Trained on red clips captioned "red" and blue ones captioned "blue", the tiny model's generations
    (TextToVideoPipeline, its default sampler and guidance, the same noise for both prompts) land nearer
    their own kind's mean latent than the other's."""
    from cascadev.pipelines.text_to_video import TextToVideoPipeline
    from cascadev.pipelines.cascade import CascadeVPipeline

    config = load_train_config(BASE_TINY, [*overrides(toy), "data.val_count=0"])
    task = StageCTask(config)
    data = VideoDataset(split_validation(config.data)[0], config.data, train=False)
    items = [data[i] for i in range(len(data))]
    latents = task.latents({"video": torch.stack([item["video"] for item in items])})       # 8 16 2 2 2
    captions = [item["caption"] for item in items]
    means = {c: latents[[i for i, x in enumerate(captions) if x == c]].mean(0) for c in COLOURS}
    batch = {"semantic": latents.repeat(4, 1, 1, 1, 1), "caption": captions * 4}           # 32 videos a step
    optimizer = torch.optim.AdamW(task.model.parameters(), lr=2e-3)
    losses = []
    for step in range(400):
        loss, _ = task.loss(task.model, batch, torch.Generator().manual_seed(step), as_images=False)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.15 * first, (first, last)

    pipe = TextToVideoPipeline.from_parts(task.text_encoder, task.model,
                                          CascadeVPipeline.from_pretrained(str(tiny_pipeline_dir)))
    pipe.set_progress_bar_config(disable=True)
    for seed in range(3):
        for own, other in (("red", "blue"), ("blue", "red")):
            z = pipe(own, num_frames=2, height=64, width=64, generator=torch.Generator().manual_seed(seed),
                     output_type="latent").latents[0]
            assert (z - means[own]).square().mean() < (z - means[other]).square().mean(), (seed, own)


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_caption_dropout_rate_is_honoured(toy, rate):
    """The share of captions replaced by the empty prompt is ``base.caption_dropout``."""
    task = StageCTask(load_train_config(BASE_TINY, [*overrides(toy), f"base.caption_dropout={rate}"]))
    null = task.null_text.context[0]
    dropped = []

    class Spy(torch.nn.Module):                                       # records which rows read the empty prompt
        config, out_channels = task.model.config, task.model.out_channels

        def forward(self, x, t, context, pooled, mask, as_images=False):
            dropped.extend(torch.equal(row, null) for row in context)
            return torch.zeros(x.shape[0], self.out_channels, *x.shape[2:])

    batch = {"semantic": torch.randn(50, 16, 2, 2, 2), "caption": ["red", "blue"] * 25}
    for i in range(10):
        task.loss(Spy(), batch, torch.Generator().manual_seed(i), as_images=False)
    assert len(dropped) == 500 and abs(sum(dropped) / 500 - rate) < 0.05, sum(dropped)


def test_init_from_a_text_dit_folder_with_gradient_checkpointing(toy, tmp_path):
    from cascadev.training.tasks import build_base_dit
    from dit.text_dit import TextDiT
    config = load_train_config(BASE_TINY, overrides(toy))
    source = TextDiT(**config.base.model_config())
    torch.nn.init.normal_(source.final_layer.linear.weight)
    source.save_pretrained(tmp_path / "ours")
    model = build_base_dit(load_train_config(BASE_TINY, [*overrides(toy), f"base.init_from={tmp_path / 'ours'}",
                                                         "base.gradient_checkpointing=true"]), True)
    assert model.training and model.gradient_checkpointing
    assert torch.equal(model.final_layer.linear.weight, source.final_layer.linear.weight)
    with pytest.raises(FileNotFoundError, match="base.init_from"):
        build_base_dit(load_train_config(BASE_TINY, [f"base.init_from={tmp_path / 'missing'}"]), True)
    # a text encoder folder (a base run's final/text_encoder) is taken as it is
    task = StageCTask(config)
    task.text_encoder.save_pretrained(tmp_path / "text")
    again = StageCTask(load_train_config(BASE_TINY,
                                         [*overrides(toy), f"base.text_encoder_weights={tmp_path / 'text'}"]))
    assert torch.equal(again.text(["red"]).context, task.text(["red"]).context)


def test_rectified_flow_base_validates_samples_and_exports_the_flow_sampler(toy, tmp_path, tiny_pipeline_dir):
    """diffusion.objective=rf: validation at sigma in (0, 1), a sample by the flow sampler at the trained shift
    (stage_c_scheduler), and that sampler in final/base_scheduler, which load_text_to_video uses (a final/ without it
    is refused: the default eps sampler would turn a velocity model's output into noise)."""
    import shutil

    from cascadev.pipelines.text_to_video import load_text_to_video, stage_c_scheduler
    from cascadev.pipelines.sampling import scheduler_name
    rf = ("diffusion.objective=rf", "diffusion.sigma_shift=3", "base.overrides.learn_sigma=false")
    flow = stage_c_scheduler(load_train_config(BASE_TINY, list(rf)).diffusion)
    assert scheduler_name(flow) == "flow" and flow.config.shift == 3.0
    assert scheduler_name(stage_c_scheduler(load_train_config(BASE_TINY).diffusion)) == "dpmpp"
    run = train(tmp_path / "rf", toy, 2, *rf, "run.val_every=2")
    logs = (run / "train.log").read_text()
    assert "val/loss" in logs and "val/sample_std" in logs and "nan" not in logs.split("val/loss")[1][:30]
    assert (run / "samples" / "step_00000002.safetensors").is_file()
    pipe = load_text_to_video(run / "final", cascade=tiny_pipeline_dir)
    assert scheduler_name(pipe.base_scheduler) == "flow" and pipe.base_scheduler.config.shift == 3.0
    shutil.rmtree(run / "final/base_scheduler")
    with pytest.raises(FileNotFoundError, match="no base_scheduler/"):
        load_text_to_video(run / "final", cascade=tiny_pipeline_dir)


def test_base_config_mistakes_fail_with_one_clear_line():
    with pytest.raises(ConfigError, match="default schedule"):
        load_train_config(BASE_TINY, ["diffusion.num_timesteps=500"])
    with pytest.raises(ConfigError, match="caption_channels=32"):
        load_train_config(BASE_TINY, ["base.overrides.caption_channels=64"])
    with pytest.raises(ConfigError, match="latent_channels=16"):
        load_train_config(BASE_TINY, ["base.overrides.latent_channels=8"])
    with pytest.raises(ConfigError, match="route must be 'semantic'"):
        load_train_config(BASE_TINY, ["condition.route=resize"])
    with pytest.raises(ConfigError, match="multiple of 2"):
        load_train_config(BASE_TINY, ["data.num_frames=3"])
    with pytest.raises(ConfigError, match="caption_dropout"):
        load_train_config(BASE_TINY, ["base.caption_dropout=1.5"])
