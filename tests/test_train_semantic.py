"""Stage "semantic": the semantic encoder and the Previewer trained as an f32 autoencoder of frames."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cascadev.config import ConfigError
from cascadev.synthetic import write_clips
from cascadev.training.config import load_train_config
from cascadev.training.data import VideoDataset, split_validation
from cascadev.training.tasks import DiTTask, SemanticTask, build_task
from cascadev.training.checkpoints import checkpoints
from cascadev.training.train import main

ROOT = Path(__file__).resolve().parents[1]
SEMANTIC_TINY = ROOT / "configs" / "semantic_tiny.yaml"
DIT_TINY = ROOT / "configs" / "dit_tiny.yaml"
SMALL = ["data.height=32", "data.width=32", "data.num_frames=2"]   # latents 1x1, previews 8x8


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    write_clips(folder, 4, frames=4, height=64, width=80)
    return folder


def train(run_dir: Path, clips: Path, steps: int, *overrides: str) -> Path:
    return main(["--config", str(SEMANTIC_TINY), "--max-steps", str(steps), "--set", f"data.videos={clips}",
                 f"run.dir={run_dir}", "run.tensorboard=false", *overrides])


def assert_same_state(a: Path, b: Path, atol: float = 1e-6) -> None:
    """Same keys, same values (integer buffers such as num_batches_tracked exactly)."""
    wa = load_file(str(a / "diffusion_pytorch_model.safetensors"))
    wb = load_file(str(b / "diffusion_pytorch_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        same = torch.allclose(wa[k], wb[k], atol=atol) if wa[k].is_floating_point() else torch.equal(wa[k], wb[k])
        assert same, k


@pytest.mark.slow
def test_semantic_script_resumed_run_equals_uninterrupted(clips, tmp_path):
    common = ["run.save_every=2", "run.val_every=3", "run.log_every=1", *SMALL]
    whole = train(tmp_path / "whole", clips, 3, *common)
    parts = train(tmp_path / "parts", clips, 2, *common)
    train(tmp_path / "parts", clips, 3, *common)                         # resumes from step 2 by itself
    assert [s for s, _ in checkpoints(parts / "checkpoints")] == [2, 3]
    # final/ holds the trained weights as loadable folders (no EMA with BatchNorm)
    for sub in ("semantic_encoder", "previewer"):
        assert_same_state(whole / "final" / sub, parts / "final" / sub)
    assert not (whole / "final" / "model").exists()
    # BatchNorm running statistics are buffers: checkpointed, restored on resume, exported
    ckpt = load_file(str(parts / "checkpoints/step_00000002/model.safetensors"))
    assert ckpt["encoder.mapper.1.num_batches_tracked"].item() == 2
    final = load_file(str(whole / "final/semantic_encoder/diffusion_pytorch_model.safetensors"))
    assert final["mapper.1.num_batches_tracked"].item() == 3
    assert not torch.allclose(final["mapper.1.running_var"], torch.ones(16))
    log = (whole / "train.log").read_text()
    assert "val/psnr" in log and "latent_std" in log
    assert (whole / "samples/step_00000003.mp4").is_file()

    # the export loads, and a dit run takes it as its frozen semantic encoder
    from vae.previewer import Previewer
    from vae.semantic_encoder import SemanticEncoder
    encoder = SemanticEncoder.from_pretrained(whole / "final/semantic_encoder")
    Previewer.from_pretrained(whole / "final/previewer")
    config = load_train_config(DIT_TINY, [f"data.videos={clips}", "data.height=32", "data.width=32",
                                          f"condition.semantic_weights={whole / 'final/semantic_encoder'}"])
    task = DiTTask(config)
    assert not task.semantic.training
    for k, v in encoder.state_dict().items():
        assert torch.equal(task.semantic.state_dict()[k], v), k
    video = VideoDataset(split_validation(config.data)[0], config.data, train=False)[0]["video"][None]
    encoded = task.encode(video)
    assert torch.allclose(encoded["cond"], encoder.encode(video) * config.stage_a.model_config().scale_factor)


@pytest.mark.slow
def test_semantic_loss_falls_on_generated_clips(clips):
    config = load_train_config(SEMANTIC_TINY, [f"data.videos={clips}"])
    task = SemanticTask(config)
    data = VideoDataset(split_validation(config.data)[0], config.data, train=False)
    video = torch.stack([data[i]["video"] for i in range(len(data))])           # 3 clips x 4 frames of 64x64
    optimizer = torch.optim.AdamW(task.model.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        loss, preview, _ = task.loss(task.model, video)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert preview.shape == (3, 3, 4, 16, 16)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.4 * first, (first, last)


def test_frozen_encoder_trains_the_previewer_alone(tmp_path, clips):
    """The released setting: a given encoder (weights and running statistics) stays as it is."""
    from vae.semantic_encoder import build_semantic_encoder
    given = build_semantic_encoder("tiny")
    given.mapper[1].running_mean.normal_()
    given.mapper[1].running_var.uniform_(0.5, 2.0)
    given.save_pretrained(tmp_path / "encoder")
    config = load_train_config(SEMANTIC_TINY, [f"data.videos={clips}", "semantic.train_encoder=false",
                                               f"semantic.encoder_weights={tmp_path / 'encoder'}"])
    task = build_task(config)
    model = task.model.train()
    assert not model.encoder.training and model.previewer.training
    assert not any(p.requires_grad for p in model.encoder.parameters())
    video = VideoDataset(split_validation(config.data)[0], config.data, train=False)[0]["video"][None]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss, _, _ = task.loss(model, video)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = model.state_dict()
    for k, v in given.state_dict().items():
        assert torch.equal(after[f"encoder.{k}"], v), k
    assert not torch.equal(after["previewer.blocks.24.weight"], before["previewer.blocks.24.weight"])
    assert not torch.equal(after["previewer.blocks.2.running_mean"], before["previewer.blocks.2.running_mean"])


def test_semantic_config_mistakes_fail_with_one_clear_line(tmp_path):
    with pytest.raises(ConfigError, match="multiples of 32"):
        load_train_config(SEMANTIC_TINY, ["data.height=48"])
    with pytest.raises(ConfigError, match="previewer_overrides.latent_channels"):
        load_train_config(SEMANTIC_TINY, ["semantic.encoder_overrides={latent_channels: 8}"])
    with pytest.raises(ConfigError, match="set optim.ema_decay=0"):
        load_train_config(SEMANTIC_TINY, ["optim.ema_decay=0.99"])
    with pytest.raises(ConfigError, match="semantic.previewer_overrides.hidden"):
        load_train_config(SEMANTIC_TINY, ["semantic.previewer_overrides={hidden: 8}"])
    with pytest.raises(ConfigError, match="data.latents"):
        main(["--config", str(SEMANTIC_TINY), "--set", "data.latents=somewhere", "run.tensorboard=false",
              f"run.dir={tmp_path}"])
