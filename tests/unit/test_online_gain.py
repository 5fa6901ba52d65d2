"""The online stage's before/after comparison: a paired difference over the same held-out seeds."""
import math

import numpy as np
import pytest

from stages.online import paired_gain


def test_paired_error_is_that_of_the_per_seed_differences():
    before = [0.2, 0.9, 0.5, 0.1]      # seeds of very different difficulty...
    after = [0.3, 1.0, 0.5, 0.15]      # ...each one a little better or the same
    gain = paired_gain({"route_completion": np.mean(before), "route_completion_per_episode": before},
                       {"route_completion": np.mean(after), "route_completion_per_episode": after})
    diff = np.subtract(after, before)
    assert gain["route_completion_gain"] == pytest.approx(diff.mean())
    assert gain["route_completion_gain_stderr"] == pytest.approx(diff.std(ddof=1) / math.sqrt(4))
    # The seeds' spread cancels: the paired error is far below either side's own.
    assert gain["route_completion_gain_stderr"] < 0.2 * np.std(before, ddof=1) / 2
    assert (gain["episodes_improved"], gain["episodes_worsened"]) == (3, 0)


def test_without_per_episode_figures_only_the_gain_is_given():
    # A before.json written by an earlier version has no per-episode list.
    gain = paired_gain({"route_completion": 0.5}, {"route_completion": 0.6, "route_completion_per_episode": [0.6]})
    assert gain == {"route_completion_gain": pytest.approx(0.1)}
