"""
model/train.py on micro sizes (16x16 shapes, ~0.3M parameters, a few dozen steps): both phases lower
their loss, a checkpoint is native weights that model.weights.load and the pipeline read, `--resume`
after an interruption (in either phase) takes exactly the steps the uninterrupted run took, and configs
with unknown keys or wrong types are refused with the key named. configs/tiny.yaml loads and builds.
"""

import json

import pytest
import torch
import yaml

from model.train import ConfigError, build_models, load_config, train
from model.weights import load
from service.cli import main as cli_main

MICRO = {
    "out_dir": "unused",
    "seed": 0,
    "image_size": 16,
    "data": {"shapes": {"length": 32, "seed": 0}},
    "tokenizer": {"vocab_size": 1024},
    "text_encoder": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
    "vae": {"block_out_channels": [16, 32], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 8},
    "unet": {"block_out_channels": [16, 32], "layers_per_block": 1, "attention_levels": [False, True],
             "attention_head_dim": 2, "norm_num_groups": 8},
    "vae_training": {"steps": 40, "batch_size": 32, "crop_size": 12, "lr": "3e-3", "warmup_steps": 2},   # YAML 1.1 reads 3e-3 as a string
    "diffusion_training": {"steps": 40, "batch_size": 16, "lr": 3.0e-3, "warmup_steps": 2, "ema_decay": 0.9,
                           "snr_gamma": 5.0},
    "checkpoint_every": 20,
    "sample_prompts": 4,
    "num_threads": 1,
}
VAE_STEPS, DIFFUSION_STEPS = 40, 40


def write_config(path, **changes):
    path.write_text(yaml.safe_dump({**MICRO, **changes}))
    return path


def entries(out, key="loss"):
    return [e for e in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if key in e]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One uninterrupted micro run through `sd train`."""
    tmp = tmp_path_factory.mktemp("train")
    config = write_config(tmp / "micro.yaml")
    assert cli_main(["train", "--config", str(config), "--out", str(tmp / "full")]) == 0
    return tmp / "full", config


def mean(xs):
    return sum(xs) / len(xs)


def test_both_phases_lower_the_loss(full_run):
    out, _ = full_run
    log = entries(out)
    vae = [e["loss"] for e in log if e["phase"] == "vae"]
    diffusion = [e["loss"] for e in log if e["phase"] == "diffusion"]
    assert [e["step"] for e in log] == list(range(1, VAE_STEPS + 1)) + list(range(1, DIFFUSION_STEPS + 1))
    assert mean(vae[-5:]) < 0.7 * mean(vae[:5])
    assert mean(diffusion[-10:]) < 0.7 * mean(diffusion[:5])


def test_checkpoint_is_loadable_weights_the_pipeline_runs(full_run):
    from model.pipeline import StableDiffusion

    out, _ = full_run
    c = load(out / "weights")
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert (state["phase"], state["step"]) == ("diffusion", DIFFUSION_STEPS)
    # the saved networks are the EMA copies, the VAE carries the measured latent scale
    for k, v in c.unet.state_dict().items():
        assert torch.equal(v, state["ema_unet"][k]), k
    assert any(not torch.equal(v, state["unet"][k]) for k, v in c.unet.state_dict().items())
    assert c.vae.config.scaling_factor == state["scaling_factor"] != 0.18215
    assert c.unet.config.sample_size * c.vae.config.downsample_factor == MICRO["image_size"]
    assert c.scheduler_config["beta_schedule"] == "scaled_linear"
    images = StableDiffusion(c).txt2img("a small red circle in the center on a blue background", steps=4)
    assert images[0].size == (16, 16)
    assert (out / "samples" / f"diffusion_{DIFFUSION_STEPS:06d}.png").exists()
    assert [e["step"] for e in entries(out, "eval")] == [20, 40]


@pytest.mark.parametrize("stop_after", [VAE_STEPS - 13, VAE_STEPS + 13])   # inside the VAE phase, the diffusion phase
def test_resume_continues_exactly(full_run, tmp_path, stop_after):
    full, config = full_run
    part = tmp_path / "part"
    cfg = load_config(config)
    cfg.sample_prompts = 0
    train(cfg, out_dir=part, stop_after=stop_after, quiet=True)
    state = torch.load(part / "checkpoint.pt", weights_only=True)
    assert state["step"] == (stop_after if stop_after <= VAE_STEPS else stop_after - VAE_STEPS)
    assert len(entries(part)) == stop_after

    assert cli_main(["train", "--config", str(config), "--out", str(part), "--resume"]) == 0
    got, want = entries(part), entries(full)
    assert [(e["phase"], e["step"], e["loss"]) for e in got] == [(e["phase"], e["step"], e["loss"]) for e in want]
    a, b = load(part / "weights"), load(full / "weights")
    for k, v in a.unet.state_dict().items():
        assert torch.equal(v, b.unet.state_dict()[k]), k


def test_resume_without_checkpoint_is_an_error(tmp_path, capsys):
    config = write_config(tmp_path / "micro.yaml")
    assert cli_main(["train", "--config", str(config), "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("changes, message", [
    ({"diffusion_training": {"stpes": 10}}, "diffusion_training: unknown key 'stpes'"),
    ({"learning_rate": 1}, "unknown key 'learning_rate'"),
    ({"unet": {"block_out_channels": [16, 32], "cross_attention_dim": 32}}, "unet.cross_attention_dim is set by training"),
    ({"vae": {"channels": [8, 16]}}, "vae: unknown key 'channels'"),
    ({"vae_training": {"steps": "many"}}, "vae_training.steps: expected int"),
    ({"data": {"shapes": {"length": 8}, "image_folder": {"root": "x"}}}, "exactly one"),
])
def test_bad_configs_are_refused_naming_the_key(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write_config(tmp_path / "bad.yaml", **changes))


def test_default_config_loads_and_builds():
    cfg = load_config("configs/tiny.yaml")
    assert cfg.data.shapes is not None and cfg.image_size == 64
    assert isinstance(cfg.vae_training.lr, float) and cfg.diffusion_training.snr_gamma == 5.0

    class Tok:   # the shapes vocabulary's size, without training it
        model_max_length = 77

        def __len__(self):
            return 614

    with torch.device("meta"):
        text_encoder, vae, unet = build_models(cfg, Tok())
    assert vae.config.downsample_factor == 4 and unet.config.sample_size == 16
    assert unet.config.cross_attention_dim == text_encoder.config.hidden_size
    assert text_encoder.config.max_position_embeddings == 77
    size = sum(p.numel() for m in (text_encoder, vae, unet) for p in m.parameters()) * 4
    assert size < 50e6


def test_init_from_fine_tunes_given_weights(full_run, tmp_path):
    full, config = full_run
    cfg = load_config(config)
    cfg.init_from = str(full / "weights")
    cfg.vae_training.steps = 0                  # keep its VAE and latent scale
    cfg.diffusion_training.steps = 3
    cfg.sample_prompts = 0
    out = train(cfg, out_dir=tmp_path / "tuned", quiet=True)
    before, after = load(full / "weights"), load(out / "weights")
    assert after.tokenizer.vocab == before.tokenizer.vocab
    assert after.vae.config.scaling_factor == before.vae.config.scaling_factor
    for k, v in after.vae.state_dict().items():
        assert torch.equal(v, before.vae.state_dict()[k]), k
    assert [e["phase"] for e in entries(out)] == ["diffusion"] * 3
