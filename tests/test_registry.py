import pytest

from advseg.errors import UserError
from advseg.registry import Registry


def test_registry_creates_by_name_and_lists_valid_names_on_error():
    reg: Registry = Registry("widget")

    @reg.register("square")
    def square(x: int) -> int:
        """Square a number."""
        return x * x

    reg.register("cube")(lambda x: x**3)
    assert reg.get("square")(3) == 9
    assert reg.names() == ["cube", "square"]
    assert reg.help("square") == "Square a number."
    with pytest.raises(
        UserError, match=r"unknown widget 'sqare' \(did you mean 'square'\?\); valid: cube, square"
    ):
        reg.get("sqare")


def test_registering_a_name_twice_is_an_error():
    reg: Registry = Registry("widget")
    reg.register("a")(object)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("a")(object)
