from dataclasses import dataclass, field

import pytest

from winnow.core.params import build_params, parse_sets
from winnow.core.store import UserError


@dataclass
class P:
    name: str
    n: int = 1
    ratio: float = 0.5
    flag: bool = False
    items: list[str] = field(default_factory=list)
    maybe: int | None = None

    def __post_init__(self):
        if not 0 <= self.ratio <= 1:
            raise ValueError(f"ratio={self.ratio}: must be in [0, 1]")


def test_converts_strings_by_annotation():
    p = build_params(
        P, parse_sets(["name=x", "n=3", "ratio=0.25", "flag=true", "items=a,b", "maybe=none"], "t"), "t"
    )
    assert (p.name, p.n, p.ratio, p.flag, p.items, p.maybe) == ("x", 3, 0.25, True, ["a", "b"], None)


@pytest.mark.parametrize(
    "values, match",
    [
        ({"name": "x", "bogus": 1}, "unknown parameter"),
        ({"name": "x", "n": "three"}, "n='three'"),
        ({"name": "x", "ratio": "2"}, "ratio=2.0: must be"),
        ({}, "name"),
        ({"name": "x", "n": 1.5}, "n=1.5"),
        ({"name": "x", "flag": "maybe"}, "flag"),
    ],
)
def test_errors_name_the_key(values, match):
    with pytest.raises(UserError, match=match):
        build_params(P, values, "t")


def test_parse_sets_requires_equals():
    with pytest.raises(UserError, match="key=value"):
        parse_sets(["oops"], "t")
