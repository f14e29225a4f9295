"""Image generation: prompts, sizes and limits, seeds, batching and the promotion gate, on a
real (briefly trained) diffusers model."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from evaluation.gate import GatePolicy
from evaluation.images import ACCURACY, DigitJudge, evaluate_image_model, gate_image_model
from refinery.vision.diffusion import (
    ImageGenerator,
    ImageModelError,
    ImageRequest,
    PromptError,
    prompt_class,
    to_png,
)
from serving.generations import ImageGenerationRequest, image_items, images_response
from serving.openai_schema import ApiError
from tests.images import tiny_image_model
from training.images import check_checkpoint, load_split, prepare_digits

DIGITS = tuple(str(i) for i in range(10))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_image_model(tmp_path_factory.mktemp("image") / "model", steps=4)


@pytest.fixture(scope="module")
def generator(model_dir):
    return ImageGenerator(model_dir)


@pytest.mark.parametrize(
    ("prompt", "cls"),
    [("a handwritten 7", 7), ("the digit SEVEN, please", 7), ("0", 0), ("draw nine", 9)],
)
def test_a_prompt_names_its_class_as_a_digit_or_a_word(prompt, cls):
    assert prompt_class(prompt, DIGITS) == cls


@pytest.mark.parametrize("prompt", ["a cat", "", "a 3 next to a 5", "17"])
def test_a_prompt_with_no_class_or_two_is_refused_saying_what_the_model_draws(prompt):
    with pytest.raises(PromptError, match="draws one of 0, 1"):
        prompt_class(prompt, DIGITS)


def test_the_same_seed_gives_the_same_image_alone_or_in_a_batch(generator):
    alone = generator.generate([ImageRequest("a 3", 11, 5, 64, 64)])[0]
    batched = generator.generate(
        [ImageRequest("a 5", 1, 5, 64, 64), ImageRequest("a 3", 11, 5, 64, 64)]
    )
    assert alone.size == (64, 64)
    assert to_png(alone) == to_png(batched[1])
    assert to_png(alone) != to_png(batched[0])
    other_seed = generator.generate([ImageRequest("a 3", 12, 5, 64, 64)])[0]
    assert to_png(other_seed) != to_png(alone)


def test_requests_with_different_steps_and_sizes_share_a_call(generator):
    out = generator.generate([ImageRequest("a 1", 1, 3, 16, 16), ImageRequest("a 2", 2, 5, 40, 24)])
    assert [im.size for im in out] == [(16, 16), (40, 24)]


def test_a_folder_that_is_not_an_image_model_is_refused(tmp_path):
    with pytest.raises(ImageModelError, match="not an image model"):
        ImageGenerator(tmp_path)
    with pytest.raises(ImageModelError, match="neither a diffusers pipeline"):
        check_checkpoint(str(tmp_path))
    with pytest.raises(ImageModelError, match="not a folder"):
        check_checkpoint(str(tmp_path / "missing"))


def test_request_items_carry_consecutive_seeds_and_the_size():
    items = image_items(ImageGenerationRequest(prompt="a 4", n=3, size="64x32", seed=100))
    assert [i["seed"] for i in items] == [100, 101, 102]
    assert {(i["width"], i["height"]) for i in items} == {(64, 32)}
    random_seeds = image_items(ImageGenerationRequest(prompt="a 4", n=2))
    assert random_seeds[1]["seed"] == random_seeds[0]["seed"] + 1


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"size": "big"}, "invalid_size"),
        ({"size": "30x30"}, "invalid_size"),
        ({"size": "4096x4096"}, "invalid_size"),
        ({"n": 50}, "too_many_images"),
        ({"steps": 5000}, "too_many_steps"),
        ({"response_format": "url"}, "unsupported_response_format"),
    ],
)
def test_bad_requests_are_400s_that_say_what_is_wrong(fields, code):
    with pytest.raises(ApiError) as err:
        image_items(ImageGenerationRequest(prompt="a 1", **fields))
    assert err.value.status == 400
    assert err.value.body()["error"]["code"] == code


def test_a_refused_item_makes_the_response_a_400():
    with pytest.raises(ApiError) as err:
        images_response([{"b64_json": "x", "seed": 1}, {"error": "no class", "status": 400}], "m/1")
    assert err.value.status == 400
    ok = images_response([{"b64_json": base64.b64encode(b"png").decode(), "seed": 1}], "m/1")
    assert ok["data"][0]["seed"] == 1 and ok["model"] == "m/1"


def test_the_judge_reads_real_digits_and_scores_generated_ones(generator, tmp_path):
    ref = prepare_digits(tmp_path / "ds")
    judge = DigitJudge(load_split(ref, "train"), load_split(ref, "test"))
    assert judge.test_accuracy > 0.9  # logistic regression on 8×8 digits: ~0.96
    # The judge reads real test images, scaled up as served, back to their label.
    from PIL import Image

    x, y = load_split(ref, "test")
    pics = [
        Image.fromarray(((x[i, 0].numpy() + 1) * 127.5).astype(np.uint8)).resize((64, 64))
        for i in range(40)
    ]
    assert np.mean(np.array(judge.predict(pics)) == y[:40].numpy()) > 0.85
    ev = evaluate_image_model(generator, judge, tmp_path / "eval", per_class=2, steps=3)
    assert ev.images == 20 and 0.0 <= ev.accuracy <= 1.0
    assert set(ev.per_class) == set(DIGITS)
    assert (tmp_path / "eval" / "sample_sheet.png").stat().st_size > 0


WAIVED = GatePolicy(human_gate="waived", waiver_reason="unit test")


def test_the_gate_refuses_below_the_floor_and_worse_than_the_champion():
    low = gate_image_model({ACCURACY: 0.4, "examples": 100}, None, WAIVED, min_accuracy=0.6)
    assert not low.promoted and "below the floor" in low.reasons[0]
    first = gate_image_model({ACCURACY: 0.8, "examples": 100}, None, WAIVED, min_accuracy=0.6)
    assert first.promoted
    champ = {ACCURACY: 0.9, "examples": 100}
    worse = gate_image_model({ACCURACY: 0.8, "examples": 100}, champ, WAIVED, min_accuracy=0.6)
    assert not worse.promoted and any("lower than the champion" in r for r in worse.reasons)
    better = gate_image_model({ACCURACY: 0.89, "examples": 100}, champ, WAIVED, min_accuracy=0.6)
    assert better.promoted  # within the 0.02 tolerance


def test_the_human_gate_applies_to_images_too():
    required = GatePolicy()
    out = gate_image_model({ACCURACY: 0.95, "examples": 100}, None, required, min_accuracy=0.6)
    assert not out.promoted
    assert any("human gate: no ratings" in r for r in out.reasons)
