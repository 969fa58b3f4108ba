"""Error reporting; mirrors modules/errors.py."""
import sys
import traceback

# double-only: every reported message, so tests can assert that the host logged (and swallowed) an error
reported = []


def record_exception():  # mirrors modules/errors.py (record_exception)
    """Remember the exception being handled (the WebUI keeps the last five for the UI)."""
    _, e, _ = sys.exc_info()
    if e is not None:
        reported.append(("exception", repr(e)))


def report(message: str, *, exc_info: bool = False) -> None:  # mirrors modules/errors.py (report)
    """Print a message (and the current traceback) to stderr; never raises."""
    record_exception()
    reported.append(("report", message))
    for line in message.splitlines():
        print("***", line, file=sys.stderr)
    if exc_info:
        print(traceback.format_exc(), file=sys.stderr)


def display(e: Exception, task, *, full_traceback=False):  # mirrors modules/errors.py (display)
    """Print an exception with a task label to stderr; never raises."""
    record_exception()
    reported.append(("display", f"{task}: {e!r}"))
    print(f"{task or 'error'}: {type(e).__name__}: {e}", file=sys.stderr)


def print_error_explanation(message):  # mirrors modules/errors.py (print_error_explanation)
    """Print a boxed explanation to stderr."""
    reported.append(("explanation", message))
    print(message, file=sys.stderr)
