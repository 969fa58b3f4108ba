"""Peak memory of the running WebUI (start_webui.sh) per API case, from the kernel's own counters.

For the WebUI process: RSS now (VmRSS) and the start-up peak (VmHWM) first; then per case the
peak is reset (`5` into /proc/PID/clear_refs), the case runs (api_checks.py), and VmHWM gives the
peak during that request, next to a 0.5 s sampled RSS trace. A case named twice runs twice (the
second time with the reference segmentation cached).

    python memory_check.py [--pid-file /work/realwebui/webui.pid] [--out DIR] case ...
"""
import argparse
import json
import os
import threading
import time

import api_checks


def status(pid: int) -> dict:
    """VmRSS, VmHWM, VmSize, VmPeak of the process, in MiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "VmSize", "VmPeak"):
                out[key] = int(value.split()[0]) / 1024  # kB -> MiB
    return out


def reset_peak(pid: int) -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


class Sampler(threading.Thread):
    """RSS every `every` seconds until stopped: when during a request the memory went up."""

    def __init__(self, pid: int, every: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.every, self.trace = pid, every, []
        self.done = threading.Event()

    def run(self) -> None:
        t0 = time.time()
        while not self.done.is_set():
            try:
                self.trace.append((round(time.time() - t0, 1), round(status(self.pid)["VmRSS"])))
            except OSError:
                return
            self.done.wait(self.every)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:7861")
    ap.add_argument("--pid-file", default="/work/realwebui/webui.pid")
    ap.add_argument("--out", default="/work/realwebui/out_mem")
    ap.add_argument("cases", nargs="*")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    with open(a.pid_file) as f:
        pid = int(f.read())
    s = status(pid)
    print(f"idle: RSS {s['VmRSS']:.0f} MiB, start-up peak {s['VmHWM']:.0f} MiB, address space {s['VmSize']:.0f} MiB "
          f"(peak {s['VmPeak']:.0f})", flush=True)
    records = [dict(case="idle", **s)]
    for name in a.cases:
        before = status(pid)["VmRSS"]
        reset_peak(pid)
        sampler = Sampler(pid)
        sampler.start()
        t0 = time.time()
        try:
            code, _ = api_checks.run(a.url, name, a.out)
        finally:
            sampler.done.set()
            sampler.join()
        s = status(pid)
        rec = dict(case=name, http=code, seconds=round(time.time() - t0, 1), rss_before=before, peak=s["VmHWM"],
                   rss_after=s["VmRSS"], address_space=s["VmSize"], trace=sampler.trace)
        records.append(rec)
        print(f"  {name}: RSS before {before:.0f} MiB, peak {s['VmHWM']:.0f} MiB (+{s['VmHWM'] - before:.0f}), "
              f"after {s['VmRSS']:.0f} MiB, {rec['seconds']} s", flush=True)
    with open(os.path.join(a.out, f"memory_{int(time.time())}.json"), "w") as f:
        json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
