"""Exceptions that carry a message meant for the user."""


class CharacterAdapterError(ValueError):
    """Base class: the message says what was expected and what was found."""


class InputError(CharacterAdapterError):
    """Input the caller can fix is refused: a setting, the reference image, a model name, a pair of
    models that do not fit. The WebUI layer answers it as the caller's mistake (HTTP 422, one log
    line); any other error is a failure (HTTP 500 with its traceback)."""


class CheckpointError(CharacterAdapterError):
    """A weight file is missing, unreadable or not a supported layout."""


class MismatchError(InputError):
    """Two chosen models do not fit each other (adapter and checkpoint, adapter and image encoder)."""


class GeometryError(CharacterAdapterError):
    """A tensor's spatial size does not match the layer grid it should have."""


class ImageInputError(InputError):
    """A reference image cannot be decoded or used."""
