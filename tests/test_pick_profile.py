"""benchmarks/pick_profile.py: the class-balance figures on batches whose answer is known by hand."""
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

_path = Path(__file__).resolve().parents[1] / "benchmarks" / "pick_profile.py"
_spec = importlib.util.spec_from_file_location("pick_profile", _path)
pick_profile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pick_profile)


def test_balanced_batch_has_entropy_one_and_single_class_batch_zero():
    balanced = np.repeat(np.arange(4), 5)  # 5 of each of 4 classes
    single = np.full(20, 2)
    result = pick_profile.profile_batches([balanced, single], num_classes=4)
    assert result["batches"] == 2
    assert result["class_entropy"] == pytest.approx(0.5)  # mean of 1 and 0
    assert result["top_class_share"] == pytest.approx((0.25 + 1.0) / 2)
    assert result["class_share"] == pytest.approx([0.125, 0.125, 0.625, 0.125])


def test_two_classes_of_four_half_and_half():
    result = pick_profile.profile_batches([np.array([0, 0, 1, 1])], num_classes=4)
    assert result["class_entropy"] == pytest.approx(round(math.log(2) / math.log(4), 4))
