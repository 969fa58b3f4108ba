"""Press the txt2img "Generate" button the way the browser does (gradio 3.41 queue websocket),
with the Character-Adapter accordion ticked and a reference image uploaded; prints the gallery,
the infotext and the HTML info (comments, errors) that the page would show.

    python ui_checks.py [--url http://127.0.0.1:7861] [elem_id=value ...]

Every input gets the value the page starts with (from /config); elem_id=value pairs override
(values parsed as JSON when they parse, else kept as text).
"""
import argparse
import asyncio
import json
import os
import random
import string
import sys
import time

import requests
import websockets

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from api_checks import ADAPTER, REF  # noqa: E402

DEFAULTS = {
    "txt2img_prompt": "a girl, face, red jacket on the upper body, blue jeans on the lower body",
    "txt2img_width": 64, "txt2img_height": 64, "txt2img_steps": 2, "txt2img_sampling": "Euler",
    "txt2img_seed": 1234,
    "charadapter_txt2img_accordion-checkbox": True,
    "charadapter_txt2img_image": "data:image/png;base64," + REF,
    "charadapter_txt2img_model": ADAPTER,
}


def build_inputs(url, overrides, tab="txt2img"):
    config = requests.get(f"{url}/config", timeout=60).json()
    comps = {c["id"]: c for c in config["components"]}
    by_elem = {c.get("props", {}).get("elem_id"): c["id"] for c in config["components"]}
    button = by_elem[f"{tab}_generate"]
    for index, dep in enumerate(config["dependencies"]):
        if button in dep["targets"] and dep.get("js") == "submit":
            break
    else:
        raise RuntimeError("no Generate dependency")
    data, used = [], set()
    for cid in dep["inputs"]:
        comp = comps[cid]
        props = comp.get("props", {})
        elem = props.get("elem_id")
        value = None if comp["type"] in ("state", "video", "image", "label") else props.get("value")
        if value is None and props.get("multiselect"):
            value = []  # what the page sends for an empty multi-select
        if elem in overrides:
            value = overrides[elem]
            used.add(elem)
        data.append(value)
    data[0] = "task(" + "".join(random.choices(string.ascii_lowercase, k=15)) + ")"  # what submit() puts there
    missing = set(overrides) - used
    if missing:
        print("not inputs of Generate:", sorted(missing))
    return index, data, [comps[c]["type"] for c in dep["outputs"]]


async def press(url, fn_index, data):
    session = "".join(random.choices(string.ascii_lowercase, k=11))
    ws_url = url.replace("http", "ws", 1) + "/queue/join"
    async with websockets.connect(ws_url, max_size=None) as ws:
        while True:
            msg = json.loads(await ws.recv())
            kind = msg.get("msg")
            if kind == "send_hash":
                await ws.send(json.dumps({"fn_index": fn_index, "session_hash": session}))
            elif kind == "send_data":
                await ws.send(json.dumps({"data": data, "event_data": None, "fn_index": fn_index,
                                          "session_hash": session}))
            elif kind == "process_completed":
                return msg


def paste(url, infotext, tab="txt2img"):
    """Press the prompt's "Read generation parameters" button (↙) with `infotext` in the prompt box;
    return {elem_id: value} of what the page would put in our components."""
    config = requests.get(f"{url}/config", timeout=60).json()
    comps = {c["id"]: c for c in config["components"]}
    prompt = next(c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == f"{tab}_prompt")
    for index, dep in enumerate(config["dependencies"]):
        targets = [comps.get(t, {}).get("props", {}).get("elem_id") for t in dep["targets"]]
        if dep["inputs"] == [prompt] and "paste" in targets and len(dep["outputs"]) > 20:
            break
    else:
        raise RuntimeError("no paste dependency")
    msg = asyncio.run(press(url, index, [infotext]))
    values = (msg.get("output") or {}).get("data") or []
    out = {}
    for cid, value in zip(dep["outputs"], values):
        elem = comps[cid].get("props", {}).get("elem_id") or ""
        if "charadapter" in elem:
            out[elem] = value
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:7861")
    ap.add_argument("--paste", help="an infotext to paste with the prompt's ↙ button instead of generating")
    ap.add_argument("pairs", nargs="*")
    a = ap.parse_args()
    if a.paste:
        for elem, value in paste(a.url, a.paste).items():
            print(f"{elem} = {value!r}")
        return
    overrides = dict(DEFAULTS)
    for pair in a.pairs:
        key, _, value = pair.partition("=")
        try:
            overrides[key] = json.loads(value)
        except ValueError:
            overrides[key] = value
    fn_index, data, out_types = build_inputs(a.url, overrides)
    t0 = time.time()
    msg = asyncio.run(press(a.url, fn_index, data))
    print(f"{time.time() - t0:.1f}s success={msg.get('success')} outputs={out_types}")
    output = msg.get("output") or {}
    if "error" in output:
        print("error:", output["error"])
    values = output.get("data") or []
    for kind, value in zip(out_types, values):
        if kind == "gallery":
            print("gallery:", len(value or []), "images")
        elif kind == "json" or (isinstance(value, str) and value.startswith("{")):
            try:
                info = json.loads(value)
                for text in info.get("infotexts", []):
                    print("infotext has Character-Adapter:", "Character-Adapter" in text)
            except (TypeError, ValueError):
                print(kind, str(value)[:500])
        else:
            print(kind, str(value)[:1500])


if __name__ == "__main__":
    main()
