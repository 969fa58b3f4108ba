"""Startup timer; mirrors modules/timer.py (only what script_callbacks touches)."""


class Timer:  # mirrors modules/timer.py (Timer)
    def __init__(self, print_log=False):
        self.records = {}

    def record(self, category, extra_time=0, disable_log=False):  # mirrors modules/timer.py (Timer.record)
        self.records[category] = self.records.get(category, 0) + extra_time


startup_timer = Timer()  # mirrors modules/timer.py (startup_timer)
