"""Exceptions that carry a message meant for the user."""


class CharacterAdapterError(ValueError):
    """Base class: the message says what was expected and what was found."""


class CheckpointError(CharacterAdapterError):
    """A weight file is missing, unreadable or not a supported layout."""


class GeometryError(CharacterAdapterError):
    """A tensor's spatial size does not match the layer grid it should have."""


class ImageInputError(CharacterAdapterError):
    """A reference image cannot be decoded or used."""
