import math

import pytest

from services.common.errors import InvalidArgumentError
from services.frontend.validation import check_sampling, resolve_max_tokens

GOOD = dict(
    max_tokens=None, temperature=None, top_p=None, top_k=None, seed=None, stop=[], ignore_eos=False
)


def test_defaults():
    request = check_sampling(**GOOD)
    params = request.params
    assert (params.temperature, params.top_p, params.top_k, request.max_tokens) == (
        1.0,
        1.0,
        0,
        None,
    )


@pytest.mark.parametrize(
    ("field", "override"),
    [
        ("max_tokens", {"max_tokens": 0}),
        ("temperature", {"temperature": -0.1}),
        ("temperature", {"temperature": math.nan}),
        ("top_p", {"top_p": 0.0}),
        ("top_p", {"top_p": 1.01}),
        ("top_k", {"top_k": -1}),
        ("stop", {"stop": ["x"] * 17}),
        ("stop[1]", {"stop": ["ok", ""]}),
    ],
)
def test_each_bad_value_names_its_field(field, override):
    with pytest.raises(InvalidArgumentError) as info:
        check_sampling(**{**GOOD, **override})
    assert info.value.field == field


def test_max_tokens_against_the_context():
    assert resolve_max_tokens(None, 10, 100, default_cap=1024) == 90
    assert resolve_max_tokens(None, 10, 100, default_cap=16) == 16
    assert resolve_max_tokens(90, 10, 100, default_cap=16) == 90
    with pytest.raises(InvalidArgumentError, match="max_tokens"):
        resolve_max_tokens(91, 10, 100, default_cap=16)
    with pytest.raises(InvalidArgumentError, match="prompt"):
        resolve_max_tokens(None, 100, 100, default_cap=16)
