"""Errors users see: each names what is wrong and what was expected."""


class ShapeError(ValueError):
    """An input of the wrong shape reached a layer; names the layer, expected and actual shapes."""
