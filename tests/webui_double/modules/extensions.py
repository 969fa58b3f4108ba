"""Installed extensions; mirrors modules/extensions.py (the double knows no extensions)."""

extensions = []  # mirrors modules/extensions.py (extensions)


def active():  # mirrors modules/extensions.py (active)
    """Enabled extensions; always empty in the double."""
    return []


def find_extension(filename):  # mirrors modules/extensions.py (find_extension)
    """Extension that owns a file; None in the double, so callback names start with 'base/'."""
    return None
