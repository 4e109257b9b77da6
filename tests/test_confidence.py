import math

import pytest

from marco.confidence import rollout_value, token_confidences


def test_chosen_token_in_top5_hand_computed():
    # probabilities 0.5, 0.2, 0.1, 0.1, 0.05 (rest of the vocabulary holds 0.05): chosen = the top token
    top = [math.log(p) for p in (0.5, 0.2, 0.1, 0.1, 0.05)]
    c = token_confidences([math.log(0.5)], [top])
    assert c[0] == pytest.approx(0.5 / 0.95)


def test_second_token_chosen():
    top = [math.log(p) for p in (0.4, 0.3, 0.1, 0.05, 0.05)]
    assert token_confidences([math.log(0.3)], [top])[0] == pytest.approx(0.3 / 0.9)


def test_sampled_token_outside_top5_is_not_added_to_denominator():
    top = [math.log(p) for p in (0.3, 0.2, 0.2, 0.1, 0.1)]
    c = token_confidences([math.log(0.01)], [top])[0]
    assert c == pytest.approx(0.01 / 0.9)  # not 0.01 / 0.91
    assert c < 0.1 / 0.9


def test_mean_over_tokens_and_stability_with_very_negative_logprobs():
    top = [[-1000.0, -1001.0, -1002.0, -1003.0, -1004.0], [math.log(1.0), -50, -50, -50, -50]]
    c = token_confidences([-1000.0, 0.0], top)
    denom = sum(math.exp(-k) for k in range(5))
    assert c[0] == pytest.approx(1 / denom)
    assert c[1] == pytest.approx(1.0)
    assert rollout_value(c) == pytest.approx((1 / denom + 1.0) / 2)
    assert rollout_value([]) is None


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError):
        token_confidences([0.0, 0.0], [[0.0] * 5])
