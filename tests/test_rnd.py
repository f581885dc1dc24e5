"""Random network distillation: a frozen random target, a predictor fine-tuned across rounds."""
import json

import numpy as np
import pytest
import torch

from al_engine.data import Dataset, Pool
from al_engine.errors import ConfigError
from al_engine.models import SmallCNN
from al_engine.strategies import QueryState, get_strategy
from al_engine.train import TrainConfig


def make_state(images, labeled, round_index=0):
    dataset = Dataset(name="tiny", classes=["a", "b"], train_images=images, train_labels=torch.arange(len(images)) % 2)
    pool = Pool(len(images))
    pool.add_labels(labeled, np.zeros(len(labeled), dtype=np.int64), -1)
    torch.manual_seed(0)
    model = SmallCNN(embed_dim=8, num_classes=2).eval()
    return QueryState(model=model, dataset=dataset, pool=pool, device=torch.device("cpu"), round_index=round_index,
                      seed=4, train_config=TrainConfig(eval_batch_size=64))


@pytest.fixture
def images():
    generator = torch.Generator().manual_seed(5)
    return torch.randint(0, 256, (30, 1, 28, 28), generator=generator, dtype=torch.uint8)


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_target_stays_fixed_while_the_predictor_learns(images):
    strategy = get_strategy("rnd", epochs=2)
    first = make_state(images, np.arange(8))
    strategy.score(first)
    target, predictor = snapshot(strategy.target), snapshot(strategy.predictor)
    second = make_state(images, np.arange(12), round_index=1)
    scores = strategy.score(second)
    assert scores.shape == (18,) and np.all(scores >= 0)
    assert all(torch.equal(target[k], v) for k, v in strategy.target.state_dict().items())
    assert any(not torch.equal(predictor[k], v) for k, v in strategy.predictor.state_dict().items())
    assert strategy.rounds_trained == 2
    strategy.score(second)  # the same round again: no second fine-tuning
    assert strategy.rounds_trained == 2


def test_resume_restores_target_and_predictor(images):
    strategy = get_strategy("rnd", epochs=2)
    state = make_state(images, np.arange(8))
    before = strategy.score(state)
    saved = json.loads(json.dumps(strategy.state_dict()))  # it must be JSON, as state.json stores it
    resumed = get_strategy("rnd", epochs=2)
    resumed.load_state_dict(saved)
    resumed._networks(state)
    for mine, theirs in ((strategy.target, resumed.target), (strategy.predictor, resumed.predictor)):
        assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in mine.state_dict().items())
    resumed._trained_key = strategy._trained_key  # same round: score without training again
    assert np.allclose(resumed.score(state), before)


def test_unfamiliar_images_score_highest():
    """Labeled: dark images; unlabeled: copies of them plus two bright ones, which must come first."""
    generator = torch.Generator().manual_seed(6)
    dark = torch.randint(0, 40, (16, 1, 28, 28), generator=generator, dtype=torch.uint8)
    bright = torch.randint(200, 256, (2, 1, 28, 28), generator=generator, dtype=torch.uint8)
    images = torch.cat([dark, dark[:6], bright])  # pool 0..15 labeled, 16..21 copies, 22..23 bright
    strategy = get_strategy("rnd", epochs=12, batch_size=8)
    picked, _ = strategy.query(make_state(images, np.arange(16)), 2)
    assert set(picked) == {22, 23}


def test_bad_options_are_one_config_error():
    with pytest.raises(ConfigError, match="epochs"):
        get_strategy("rnd", epochs="0")
