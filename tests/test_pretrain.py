"""Self-supervised pretraining (al_engine/pretrain.py, `app.py pretrain`): the loss falls, the output
loads with --weights (frozen features = the network's embed()) and --finetune, a rerun resumes, a
time budget stops and continues, and bad arguments are one line with exit status 2."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from al_engine import backbones
from al_engine.config import RunConfig
from al_engine.engine import Engine
from al_engine.errors import ConfigError
from al_engine.pretrain import PretrainConfig, nt_xent, pretrain, random_views

ROOT = Path(__file__).resolve().parents[1]


def small_config(tmp_path, **overrides) -> PretrainConfig:
    settings = dict(dataset="digits", model="small-cnn", out=str(tmp_path / "weights.pt"), epochs=3,
                    batch_size=128, device="cpu", seed=0)
    settings.update(overrides)
    return PretrainConfig(**settings)


def test_nt_xent_matches_hand_computed_value():
    # Two images, views identical and orthogonal: each view's partner scores 1, the other two 0, so with
    # tau = 1 every row's loss is -log(e / (e + 2)).
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    views = torch.stack([e1, e2])
    assert float(nt_xent(views, views.clone(), 1.0)) == pytest.approx(math.log(math.e + 2) - 1, abs=1e-6)
    # Partners swapped (each view's partner is the other image): a larger loss.
    assert float(nt_xent(views, views.flip(0), 1.0)) > math.log(math.e + 2) - 1 + 0.5


def test_views_differ_per_image_and_stay_in_range(digits):
    images = digits.train_images[:1].float().div(255).repeat(8, 1, 1, 1)  # one image, eight times
    views = random_views(images, torch.Generator().manual_seed(0), flip=False)
    assert views.shape == images.shape and views.min() >= 0 and views.max() <= 1
    flat = views.flatten(1)
    assert len({tuple(row.round(decimals=3).tolist()) for row in flat}) == 8  # parameters drawn per image


def test_pretrain_lowers_loss_and_writes_loadable_weights(tmp_path, digits):
    result = pretrain(small_config(tmp_path, epochs=4), dataset=digits, progress=False)
    assert result.finished and len(result.losses) == 4
    assert result.losses[-1] < result.losses[0] - 0.05  # contrastive loss falls within a few epochs
    state = torch.load(tmp_path / "weights.pt", weights_only=True)
    assert set(state) == {"conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "fc_embed.weight",
                          "fc_embed.bias"}

    # --weights on the same project model: frozen features are the network's embed() of the normalised images.
    config = RunConfig(dataset="digits", model="small-cnn", weights=str(tmp_path / "weights.pt"), embed_dim=256,
                       device="cpu", cache_dir=str(tmp_path / "cache"))
    assert backbones.model_mode(config.model, config.weights, False) == "frozen"
    engine = Engine(config, dataset=digits)
    assert engine.dataset.is_features and engine.dataset.image_shape == (50, 1, 1)
    network = backbones.load_project_network("small-cnn", config.weights, digits.image_shape, 10).eval()
    with torch.no_grad():
        expected = network.embed(digits.normalize(digits.train_images[:16]))
    assert torch.allclose(engine.dataset.train_images[:16].flatten(1), expected, atol=1e-5)
    engine.pool.add_labels(np.arange(60), digits.train_labels[:60].numpy(), -1)
    accuracy, _, _ = engine.train(0)  # a head trains on them
    assert accuracy is not None and accuracy > 0.2

    # --finetune from it: the whole network starts from the file's trunk.
    tuned = Engine(RunConfig(dataset="digits", model="small-cnn", weights=config.weights, finetune=True,
                             embed_dim=50, device="cpu"), dataset=digits)
    assert tuned.mode == "project" and not tuned.dataset.is_features
    model = tuned.new_model()
    assert torch.equal(model.conv1.weight.detach(), state["conv1.weight"])


@pytest.mark.slow
def test_rerun_resumes_and_extends(tmp_path, digits):
    first = pretrain(small_config(tmp_path, epochs=2), dataset=digits, progress=False)
    again = pretrain(small_config(tmp_path, epochs=2), dataset=digits, progress=False)
    assert again.resumed and again.steps == first.steps and again.losses == first.losses  # nothing left to do
    longer = pretrain(small_config(tmp_path, epochs=3), dataset=digits, progress=False)
    assert longer.resumed and longer.steps == first.steps * 3 // 2 and longer.losses[:2] == first.losses
    # The same three epochs in one go give the same losses: the resume is exact.
    (tmp_path / "other").mkdir()
    straight = pretrain(small_config(tmp_path / "other", epochs=3), dataset=digits, progress=False)
    assert straight.losses == pytest.approx(longer.losses, abs=1e-4)


def test_time_budget_stops_and_rerun_continues(tmp_path, digits):
    stopped = pretrain(small_config(tmp_path, epochs=3, time_budget=0.01), dataset=digits, progress=False)
    assert not stopped.finished and stopped.steps == 1
    assert (tmp_path / "weights.pt").is_file()  # usable weights even when stopped
    done = pretrain(small_config(tmp_path, epochs=3), dataset=digits, progress=False)
    assert done.finished and done.resumed and done.steps == 3 * (1442 // 128)


def test_changed_settings_refuse_the_checkpoint(tmp_path, digits):
    pretrain(small_config(tmp_path, epochs=1), dataset=digits, progress=False)
    with pytest.raises(ConfigError, match="lr 0.001 there, 0.01 now"):
        pretrain(small_config(tmp_path, epochs=1, lr=0.01), dataset=digits, progress=False)


def test_project_weights_file_checks(tmp_path, digits):
    pretrain(small_config(tmp_path, epochs=1), dataset=digits, progress=False)
    with pytest.raises(ConfigError, match="does not fit colour-cnn"):
        Engine(RunConfig(dataset="digits", model="colour-cnn", weights=str(tmp_path / "weights.pt"), device="cpu"),
               dataset=digits)
    with pytest.raises(ConfigError, match="must be a state-dict file"):
        backbones.model_mode("small-cnn", "DEFAULT", False)
    with pytest.raises(ConfigError, match="project network with --weights FILE"):
        backbones.model_mode("small-cnn", None, True)


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--batch-size", "1"], "--batch-size must be at least 2"),
    (["--time-budget", "-3"], "--time-budget must be a positive"),
    (["--model", "head"], "invalid choice"),
    (["--model", "nosuch"], "invalid choice"),
])
def test_cli_bad_arguments_are_one_line(tmp_path, args, message):
    result = subprocess.run([sys.executable, str(ROOT / "app.py"), "pretrain", "--out", str(tmp_path / "w.pt"),
                             *args], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
    assert not (tmp_path / "w.pt").exists()


def test_cli_out_folder_is_refused(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "app.py"), "pretrain", "--out", str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and "is a folder" in result.stderr
