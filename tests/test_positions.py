"""Token positions: parsed once from text, lists or a Positions; the spec settings keep round-trips."""

import pytest

from melbo.errors import MelboError
from melbo.positions import Positions
from melbo.settings import DiscoverConfig


@pytest.mark.parametrize("spec, shown, first_of_five", [
    ("all", "all", [0, 1, 2, 3, 4]),
    (" last:2 ", "last:2", [3, 4]),
    ("[[-1, 0], [1]]", "[[-1, 0], [1]]", [4, 0]),
    ([[-1, 0], [1]], "[[-1, 0], [1]]", [4, 0]),
])
def test_every_form_parses_to_one_value_that_prints_back(spec, shown, first_of_five):
    positions = Positions.parse(spec)
    assert str(positions) == shown and positions.indices(0, 5) == first_of_five
    assert Positions.parse(positions.spec) == positions == Positions.parse(positions)


def test_last_k_of_a_short_prompt_is_the_whole_prompt():
    assert Positions.parse("last:8").indices(0, 3) == [0, 1, 2]


@pytest.mark.parametrize("spec, message", [
    ("first:2", "unknown token positions"),
    ("last:0", "unknown token positions"),
    ("[[1,", "not valid JSON"),
    ("[1, 2]", "not a list"),
    ([[]], "empty token index list"),
    ([[1.5]], "not a whole number"),
    ([[True]], "not a whole number"),
    (7, "not a list per prompt"),
])
def test_malformed_positions_are_one_line(spec, message):
    with pytest.raises(MelboError, match=message):
        Positions.parse(spec)


def test_explicit_lists_match_the_prompts_and_their_lengths():
    positions = Positions.parse([[0], [-3]])
    with pytest.raises(MelboError, match="for 2 prompts but 3 prompts"):
        positions.check_count(3)
    with pytest.raises(MelboError, match="token index -3 is outside prompt 1 \\(2 tokens\\)"):
        positions.indices(1, 2)


def test_settings_check_positions_once_and_keep_the_spec():
    cfg = DiscoverConfig(prompts=["a", "b"], positions="[[-1], [0, 1]]")
    assert cfg.positions == [[-1], [0, 1]]  # as config.json records it
    with pytest.raises(MelboError, match="not a whole number"):
        DiscoverConfig(prompts=["a"], positions=[["x"]])
