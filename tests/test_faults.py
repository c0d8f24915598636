"""Faults and bad input (issue 18): nothing is lost, and nothing runs silently wrong. Each test fails without its fix."""

import time

import pytest
import torch
from tiny_models import VIDEO_TOKEN_ID, tiny_model

from evaluation.tasks import parse_timestamps

# ---------------------------------------------------------------------------------------------------------------------
# Non-finite pixel values


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_pixel_values_are_an_error_naming_the_input(bad):
    model = tiny_model()
    ids = torch.tensor([[5, 6] + [VIDEO_TOKEN_ID] * 8 + [7]])
    pixels = torch.zeros(2, 3, 28, 28)
    pixels[1, 0, 3, 4] = bad
    with pytest.raises(ValueError, match="pixel_values_videos holds 1 NaN/Inf"):
        model(input_ids=ids, pixel_values_videos=pixels)
    with pytest.raises(ValueError, match="pixel_values holds 1 NaN/Inf"):
        model.get_image_features(pixels[1:])


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation: answer parsing


def test_grounding_parser_is_linear_in_the_output_length():
    """A run of 16k digits took 16 s with the old pattern (quadratic); linear parsing takes milliseconds."""
    for text in ("1" * 16_000, "1" * 16_000 + " to 5", "<answer>" * 16_000 + "3 to 4"):
        started = time.perf_counter()
        parse_timestamps(text)
        assert time.perf_counter() - started < 1.0, text[:20]
    assert parse_timestamps("<answer>x</answer> 1 to 2 <ANSWER>at 3.5 - 7 s</answer>") == (3.5, 7.0)
    assert parse_timestamps("from 0:05 to 1:02:03.5 seconds") == (5.0, 3723.5)
