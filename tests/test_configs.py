"""Every YAML in configs/ (but configs/accelerate/) is a TrainConfig whose models build on the meta device."""

from pathlib import Path

import pytest
import torch
import yaml

from helpers import config_fields
from cascadev.config import ConfigError, to_dict
from cascadev.training.config import TrainConfig, load_train_config
from cascadev.training.tasks import build_task

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TRAIN_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if "accelerate" not in p.relative_to(CONFIGS).parts)
ACCELERATE_CONFIGS = sorted((CONFIGS / "accelerate").glob("*.yaml"))


def test_the_configs_exist():
    names = {p.name for p in TRAIN_CONFIGS}
    assert {"dit_official_finetune.yaml", "dit_resize_4x.yaml", "vae_svd.yaml", "dit_tiny.yaml", "vae_tiny.yaml",
            "semantic_tiny.yaml", "base.yaml", "base_tiny.yaml"} <= names
    assert {p.name for p in ACCELERATE_CONFIGS} == {"ddp.yaml", "fsdp.yaml", "ddp_multinode.yaml",
                                                    "fsdp_multinode.yaml"}


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_its_models_build_on_meta(path, tmp_path):
    config = load_train_config(path)
    assert isinstance(config, TrainConfig)
    assert load_train_config(path, []) == config
    with torch.device("meta"):
        task = build_task(config, load_weights=False)
    # (diffusers' AlphaBlender makes its scalar mix_factor with torch.Tensor([...]), which ignores the device)
    assert sum(p.numel() for p in task.model.parameters() if not p.is_meta) < 100
    assert any(p.requires_grad for p in task.model.parameters())
    if config.stage == "dit":
        dit = task.model.dit if config.condition.train_encoder else task.model   # a DiffusionAutoencoder holds it
        assert config_fields(dit) == {**config_fields(dit), **config.dit.model_config()}
    elif config.stage == "stage_c":                                   # the frozen text encoder fits the TextDiT
        assert config_fields(task.model) == {**config_fields(task.model), **config.base.model_config()}
        assert (task.text_encoder.width, task.text_encoder.embed_dim) == (task.model.config.caption_channels,
                                                                          task.model.config.pooled_channels)
    # the resolved config round-trips through YAML (what a run writes into its directory)
    assert load_train_config(_write(tmp_path / f"{path.stem}.yaml", to_dict(config))) == config


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_configs_make_the_launch_they_say(path):
    """What `accelerate launch --config_file PATH` makes of it: torchrun's node arguments (several machines: this
    one's --machine_rank and the main machine's address from the command line) and the processes' environment
    (FSDP2 sharding each DiT block: the models' _no_split_modules, no class list to keep in step)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    multinode = path.stem.endswith("_multinode")
    argv = ["--config_file", str(path), *(["--machine_rank", "1", "--main_process_ip", "10.0.0.1"] if multinode
                                          else []), "-m", "cascadev.training.train"]
    args = _validate_launch_command(launch_command_parser().parse_args(argv))[0]
    env = prepare_multi_gpu_env(args)
    assert args.mixed_precision == "no"                # run.mixed_precision decides
    if multinode:
        assert (args.nnodes, args.node_rank, args.rdzv_endpoint) == ("2", 1, "10.0.0.1:29500")
        assert args.nproc_per_node == "8"              # 16 processes over 2 machines
    else:
        assert args.num_machines == 1 and args.nproc_per_node == "8"
    if path.stem.startswith("fsdp"):
        assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
        assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP" and "FSDP_TRANSFORMER_CLS_TO_WRAP" not in env
        assert env["FSDP_STATE_DICT_TYPE"] == "SHARDED_STATE_DICT"
    else:
        assert path.stem.startswith("ddp") and "ACCELERATE_USE_FSDP" not in env


def test_fsdp_shard_units_are_the_dit_blocks():
    from dit import TextDiT, VideoDiT
    from dit.text_dit import TextDiTBlock
    from dit.video_dit import DiTBlock

    assert VideoDiT._no_split_modules == [DiTBlock.__name__] and TextDiT._no_split_modules == [TextDiTBlock.__name__]


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_earlier_stage_and_section_names_load_with_a_note(tmp_path, caplog):
    """Stage "vae" is now "stage_a", "base" "stage_c", the section ``vae`` ``stage_a_training``: configs and overrides
    written with the earlier names give the same config, with one logged note per name."""
    old = yaml.safe_load((CONFIGS / "vae_tiny.yaml").read_text())
    old["stage"], old["vae"] = "vae", old.pop("stage_a_training")
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(old))
    with caplog.at_level("WARNING", logger="cascadev.training.config"):
        loaded = load_train_config(tmp_path / "old.yaml", ["vae.disc_start=3"])
    assert loaded == load_train_config(CONFIGS / "vae_tiny.yaml", ["stage_a_training.disc_start=3"])
    assert [r.getMessage() for r in caplog.records] == [
        "config section vae is now stage_a_training (the old name still loads)",
        "config section vae: is now stage_a_training: (the old name still loads)",
        "stage vae is now stage_a (the old name still loads)"]
    assert load_train_config(CONFIGS / "base_tiny.yaml", ["stage=base"]).stage == "stage_c"
    both = {**old, "stage_a_training": {}}
    (tmp_path / "both.yaml").write_text(yaml.safe_dump(both))
    with pytest.raises(ConfigError, match="both vae: and stage_a_training:"):
        load_train_config(tmp_path / "both.yaml")
