"""The baseline every strategy must beat: a uniformly random batch."""
import numpy as np

from . import register_strategy
from .base import QueryState, Strategy


@register_strategy
class RandomSampling(Strategy):
    name = "random"
    help = "uniformly random unlabeled items (the baseline)"
    main_only = True  # one random stream over the whole pool: cheap, and only exact when drawn once

    def score(self, state: QueryState) -> np.ndarray:
        return state.rng.random(len(state.unlabeled_indices))
