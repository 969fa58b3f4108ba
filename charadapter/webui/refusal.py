"""Refused input as the WebUI's API handler understands it: HTTP 422, no traceback.

modules/api/api.py (api_middleware.handle_exception) answers every exception with the status in
its `status_code` (500 when there is none) and prints a traceback, with rich's local variables
under WEBUI_RICH_EXCEPTIONS, for anything that is not a fastapi HTTPException. A refused input
(charadapter.errors.InputError) is raised as `CharacterAdapterError` below: an HTTPException with
status 422 whose text is the message alone, so the API's body (`detail`, `errors`) and the UI
(modules/call_queue.py wrap_gradio_call_no_job shows "<type>: <text>") show what they showed
before, "CharacterAdapterError: Character-Adapter: weight: ...". It is still a
charadapter.errors.InputError, so code that catches ours catches it too.
"""

import logging

from fastapi.exceptions import HTTPException  # the class v1.10.1's handler checks (fastapi 0.94 and later)

from ..errors import InputError

log = logging.getLogger("character_adapter")

STATUS = 422  # Unprocessable Entity: the request is well-formed, its values are refused


class CharacterAdapterError(HTTPException, InputError):
    """A refused input, raised where it stops the run; named as the core's error it carries."""

    def __init__(self, message: str):
        super().__init__(status_code=STATUS, detail=message)
        self.args = (message,)  # some starlette versions call no Exception.__init__

    def __str__(self) -> str:  # starlette >= 0.29 would give "422: <message>"
        return str(self.detail)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.detail!r})"


def refuse(message: str) -> CharacterAdapterError:
    """Log a refused input once, as one plain line, and return the error to raise."""
    log.error("%s", message)
    return CharacterAdapterError(message)
