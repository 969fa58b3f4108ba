"""Drive a running WebUI (tools/real_webui/start_webui.sh) through its HTTP API, the way a user
would, and report per case: HTTP status (flagged when it is not the expected one: 422 for a
refused input, 500 for a failure, else 200), images returned, whether the infotext carries
"Character-Adapter", how the regions were located (flagged where EXPECT_LOCATED says what to
expect), the error text, and what the request added to the WebUI's log (--log): lines naming us,
a traceback. Results (JSON without the image data, PNGs) go to --out.

    python api_checks.py [--url http://127.0.0.1:7861] [--out DIR] [case|pattern ...]
    python api_checks.py --list

No case = every case for the loaded checkpoint's family; a pattern is a shell glob ("xyz_*").
Cases named sdxl_* need the WebUI started with CKPT=random-sdxl.safetensors, the others the
SD1.5 checkpoint; a case for the other family is skipped with a note. *_128 cases are the
memory baseline's requests (128x128, 3 Euler steps: memory_check.py).
"""
import argparse
import base64
import fnmatch
import io
import json
import os
import sys
import time

import requests
from PIL import Image, ImageDraw

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
from charadapter.params import ARG_NAMES_ONE  # noqa: E402

TITLE = "Character-Adapter"
ADAPTER = "ip-adapter_sd15.safetensors"
ADAPTER_PLUS = "ip-adapter-plus_sd15.safetensors"
SDXL_VITH = "ip-adapter_sdxl_vit-h.safetensors"  # ViT-H encoder (clip_vision/image_encoder)
SDXL_BIGG = "ip-adapter_sdxl.safetensors"  # ViT-bigG encoder (clip_vision/sdxl_models/image_encoder)
PROMPT = "a girl, face, red jacket on the upper body, blue jeans on the lower body"
TINY = dict(prompt=PROMPT, negative_prompt="blurry", width=64, height=64, steps=2, sampler_name="Euler",
            cfg_scale=5, seed=1234, batch_size=1, n_iter=1)
SIZE128 = dict(width=128, height=128, steps=3)  # the memory baseline's request


def reference_png(width=192, height=320, jacket=(200, 30, 30), trousers=(30, 40, 160)) -> str:
    """A character-like picture: skin-coloured head, a jacket, trousers on grey."""
    img = Image.new("RGB", (width, height), (128, 128, 128))
    d = ImageDraw.Draw(img)
    d.ellipse((width * 0.35, height * 0.03, width * 0.65, height * 0.22), fill=(230, 190, 160))
    d.rectangle((width * 0.25, height * 0.23, width * 0.75, height * 0.55), fill=jacket)
    d.rectangle((width * 0.3, height * 0.55, width * 0.7, height * 0.97), fill=trousers)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def pose_png(size=64) -> str:
    """An OpenPose-style map with two skeletons (left and right), white limbs on black."""
    img = Image.new("RGB", (size, size), (0, 0, 0))
    d = ImageDraw.Draw(img)
    for cx in (0.27, 0.73):
        x = cx * size
        d.ellipse((x - 4, size * 0.08, x + 4, size * 0.2), outline=(255, 255, 255))
        d.line((x, size * 0.2, x, size * 0.6), fill=(255, 255, 255))
        d.line((x - 9, size * 0.3, x + 9, size * 0.3), fill=(255, 255, 255))
        d.line((x, size * 0.6, x - 6, size * 0.95), fill=(255, 255, 255))
        d.line((x, size * 0.6, x + 6, size * 0.95), fill=(255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


REF = reference_png()
REF2 = reference_png(jacket=(180, 180, 190), trousers=(90, 60, 30))
TWO_PROMPT = "a girl on the left and a knight on the right, face, upper body, lower body"
REF_SQUARE = reference_png(256, 256)
REF_TALL = reference_png(256, 512)


def unit(**kw):
    d = dict(enabled=True, image=REF, model=ADAPTER)
    d.update(kw)
    return d


def positional(**kw):
    values = dict(enabled=True, image=REF, model=ADAPTER, encoder="", weight=0.8, start=0.0, end=1.0,
                  fusion="soft", temperature=0.1, background=0.4, timestep=650, crop="strip", show_masks=False,
                  region1_reference_phrase="face", region1_phrase="", region1_weight=1.0,
                  region2_reference_phrase="upper body", region2_phrase="red jacket", region2_weight=1.0,
                  region3_reference_phrase="lower body", region3_phrase="blue jeans", region3_weight=1.0,
                  region4_reference_phrase="", region4_phrase="", region4_weight=1.0)
    values.update(kw)
    return [values[name] for name in ARG_NAMES_ONE]  # the single-character panel's 25 values: still accepted


def txt2img(args=None, **kw):
    payload = dict(TINY, **kw)
    if args is not None:
        payload.setdefault("alwayson_scripts", {})[TITLE] = {"args": args}
    return "txt2img", payload


def img2img(args=None, **kw):
    payload = dict(TINY, init_images=[reference_png(64, 64)], denoising_strength=0.6, **kw)
    if args is not None:
        payload.setdefault("alwayson_scripts", {})[TITLE] = {"args": args}
    return "img2img", payload


def axis_index(url, label, tab="txt2img"):
    """Index of an X/Y/Z axis in the tab's type dropdown (the API takes the index, type="index")."""
    config = requests.get(f"{url}/config", timeout=60).json()
    for comp in config["components"]:
        props = comp.get("props", {})
        if props.get("elem_id") == f"script_{tab}_xyz_plot_x_type":
            choices = [c[0] if isinstance(c, list) else c for c in props["choices"]]
            return choices.index(label)
    raise KeyError(label)


def xyz(x_label, x_values, y_label=None, y_values="", args=None, **kw):
    def make(url):
        x = axis_index(url, x_label)
        y = axis_index(url, y_label) if y_label else 0
        # axes with choices (Fusion mode, IP-Adapter model) read the dropdown list, not the text
        # (xyz_grid.process_axis, unless csv_mode): send both
        def listed(text):
            return [v.strip() for v in text.split(",") if v.strip()]
        script_args = [x, x_values, listed(x_values), y, y_values, listed(y_values), 0, "", [], True, False,
                       False, False, False, False, False, 0, False]
        route, payload = txt2img(args, script_name="x/y/z plot", script_args=script_args, **kw)
        return route, payload
    return make


def controlnet_unit(**kw):
    d = dict(enabled=True, module="none", model="control_v11p_sd15_canny", weight=1.0,
             image=reference_png(64, 64), resize_mode="Crop and Resize", processor_res=64,
             guidance_start=0.0, guidance_end=1.0, control_mode="Balanced", pixel_perfect=False)
    d.update(kw)
    return d


def with_controlnet(route_payload, units):
    route, payload = route_payload
    payload.setdefault("alwayson_scripts", {})["ControlNet"] = {"args": units}
    return route, payload


# the status each case should answer (200 when not listed): 422 = a refused input, the caller's
# mistake (one plain log line, no traceback); 500 = a failure that is not (with its traceback)
EXPECTED_STATUS = dict.fromkeys(("xyz_panel_off", "xyz_bad_value", "bad_model", "bad_weight", "no_image", "bad_key",
                                 "path_as_image", "sdxl_wrong_family"), 422)
EXPECTED_STATUS.update(two_characters_shared_differs=422, two_characters_no_subject=422)
EXPECTED_STATUS["bin_newtorch"] = 500  # the server's own file cannot be read: not the caller's fault


CASES = {
    "plain": lambda: txt2img(),
    "dict": lambda: txt2img([unit()]),
    "dict_regions": lambda: txt2img([unit(regions=[{"reference_phrase": "face"},
                                                    {"reference_phrase": "upper body", "phrase": "red jacket"},
                                                    {"reference_phrase": "lower body", "phrase": "blue jeans"}])]),
    "dict_global": lambda: txt2img([unit(regions=[])]),
    # no region phrase in the prompt: every region located from its phrase (expect "from the phrase")
    "no_region_phrase": lambda: txt2img([unit(show_masks=True)], prompt="a knight riding a horse at dusk"),
    "dict_plus_hard_box": lambda: txt2img([unit(model=ADAPTER_PLUS, fusion="hard", crop="box")]),
    "dict_auto_encoder": lambda: txt2img([unit(encoder="Auto")]),
    "dict_named_encoder": lambda: txt2img([unit(encoder="image_encoder")]),
    "positional": lambda: txt2img(positional()),
    "positional_disabled": lambda: txt2img(positional(enabled=False)),
    "show_masks": lambda: txt2img([unit(show_masks=True)]),
    "batch2": lambda: txt2img([unit()], batch_size=2),
    "and_prompt": lambda: txt2img([unit()], prompt=PROMPT + " AND a face:0.5"),
    "hires": lambda: txt2img([unit(show_masks=True)], enable_hr=True, hr_scale=1.5, hr_upscaler="Latent",
                             hr_second_pass_steps=2, denoising_strength=0.6),
    "hires_nonlatent": lambda: txt2img([unit()], enable_hr=True, hr_scale=1.5, hr_upscaler="Lanczos",
                                       hr_second_pass_steps=1, denoising_strength=0.6),
    "ddim": lambda: txt2img([unit()], sampler_name="DDIM"),
    "heun": lambda: txt2img([unit()], sampler_name="Heun"),
    "img2img": lambda: img2img([unit()]),
    "img2img_show_masks": lambda: img2img([unit(show_masks=True)]),
    "inpaint": lambda: img2img([unit()], mask=reference_png(64, 64), inpaint_full_res=True),
    "xyz_weight": xyz("[Character-Adapter] Weight", "0, 0.8", args=[unit()]),
    "xyz_weight_fusion": xyz("[Character-Adapter] Weight", "0.4, 1.2", "[Character-Adapter] Fusion mode",
                             "soft, hard", args=[unit()]),
    "xyz_region_weights": xyz("[Character-Adapter] Region weights", '"1, 0, 0", 0 1 1', args=[unit()]),
    "xyz_model": xyz("[Character-Adapter] IP-Adapter model", ADAPTER + ", " + ADAPTER_PLUS, args=[unit()]),
    "xyz_panel_off": xyz("[Character-Adapter] Weight", "0, 0.8"),
    "xyz_bad_value": xyz("[Character-Adapter] Weight", "0.5, 7", args=[unit()]),
    "controlnet": lambda: with_controlnet(txt2img([unit()]), [controlnet_unit()]),
    "controlnet_show_masks_hires": lambda: with_controlnet(
        txt2img([unit(show_masks=True)], enable_hr=True, hr_scale=1.5, hr_upscaler="Latent",
                hr_second_pass_steps=1, denoising_strength=0.6), [controlnet_unit()]),
    "controlnet_only": lambda: with_controlnet(txt2img(), [controlnet_unit()]),
    "two_characters": lambda: txt2img([unit(subject="girl", show_masks=True), unit(image=REF2, subject="knight")],
                                      prompt=TWO_PROMPT),
    "two_characters_pose": lambda: with_controlnet(
        txt2img([unit(subject="girl"), unit(image=REF2, subject="knight", model=ADAPTER_PLUS)], prompt=TWO_PROMPT),
        [controlnet_unit(image=pose_png())]),
    "two_characters_shared_differs": lambda: txt2img([unit(subject="girl"), unit(image=REF2, subject="knight",
                                                                                  fusion="hard")], prompt=TWO_PROMPT),
    "two_characters_no_subject": lambda: txt2img([unit(subject="girl"), unit(image=REF2)], prompt=TWO_PROMPT),
    "xyz_character2_weight": xyz("[Character-Adapter] Character 2 weight", "0, 1.2",
                                 args=[unit(subject="girl"), unit(image=REF2, subject="knight")], prompt=TWO_PROMPT),
    "bin_newtorch": lambda: txt2img([unit(model="ip-adapter_sd15_newtorch.bin", regions=[])]),
    "bin_oldzip": lambda: txt2img([unit(model="ip-adapter_sd15_oldzip.bin", regions=[])]),
    "bad_model": lambda: txt2img([unit(model="nope.safetensors")]),
    "bad_weight": lambda: txt2img([unit(weight=5)]),
    "no_image": lambda: txt2img([unit(image=None)]),
    "bad_key": lambda: txt2img([unit(wieght=0.5)]),
    "path_as_image": lambda: txt2img([unit(image="/etc/hostname")]),
    "plain_128": lambda: txt2img(**SIZE128),
    "regions_128": lambda: txt2img([unit()], **SIZE128),  # 3 regions, 192x320 reference (512x853 pass)
    # SDXL (reference pass at short side 1024: a 256x256 reference is one UNet pass at 1024x1024)
    "sdxl_plain": lambda: txt2img(),
    "sdxl_plain_128": lambda: txt2img(**SIZE128),
    "sdxl_square_128": lambda: txt2img([unit(model=SDXL_VITH, image=REF_SQUARE)], **SIZE128),
    "sdxl_square": lambda: txt2img([unit(model=SDXL_VITH, image=REF_SQUARE)]),
    # + the ViT-bigG encoder (1.8 G parameters, 7.4 GB in fp32) on top: also only under a cap
    "sdxl_square_bigg_capped": lambda: txt2img([unit(model=SDXL_BIGG, image=REF_SQUARE)]),
    "sdxl_square_show_masks": lambda: txt2img([unit(model=SDXL_VITH, image=REF_SQUARE, show_masks=True)]),
    "sdxl_square_global": lambda: txt2img([unit(model=SDXL_VITH, image=REF_SQUARE, regions=[])]),
    "sdxl_no_region_phrase": lambda: txt2img([unit(model=SDXL_VITH, image=REF_SQUARE, show_masks=True)], **SIZE128,
                                             prompt="a knight riding a horse at dusk"),
    "sdxl_xyz_weight": xyz("[Character-Adapter] Weight", "0, 0.8", args=[unit(model=SDXL_VITH, image=REF_SQUARE)]),
    "sdxl_wrong_family": lambda: txt2img([unit(image=REF_SQUARE)]),  # an SD1.5 adapter on SDXL: refused
    "sdxl_two_characters": lambda: txt2img([unit(model=SDXL_VITH, image=REF_SQUARE, subject="girl"),
                                            unit(model=SDXL_VITH, subject="knight",
                                                 image=reference_png(256, 256, (180, 180, 190), (90, 60, 30)))],
                                           prompt=TWO_PROMPT, **SIZE128),
    # DANGER: a 1:2 reference is a 1024x2048 UNet pass; it took the WebUI to 24.3 GB (OOM kill) on a
    # 24 GB machine. Run only under a hard cap (start_webui.sh MEM_CAP_GB=...).
    "sdxl_tall_capped": lambda: txt2img([unit(model=SDXL_VITH, image=REF_TALL)], **SIZE128),
}
DANGEROUS = ("sdxl_tall_capped", "sdxl_square_bigg_capped")  # never part of "all" or a pattern: name it exactly


LOCATED = f'{TITLE} located: "'
# what the first infotext's "Character-Adapter located" must contain
EXPECT_LOCATED = {
    "no_region_phrase": "face: from the phrase, upper body: from the phrase, lower body: from the phrase",
    "sdxl_no_region_phrase": "face: from the phrase, upper body: from the phrase, lower body: from the phrase",
    "dict": "face: in the prompt, upper body: in the prompt, lower body: in the prompt",
    "dict_regions": "face: in the prompt, red jacket: in the prompt, blue jeans: in the prompt",
}


def strip_images(data):
    out = dict(data)
    if isinstance(out.get("images"), list):
        out["images"] = [f"<{len(i)} base64 chars>" for i in out["images"]]
    for key in ("parameters",):
        if isinstance(out.get(key), dict):
            params = dict(out[key])
            params.pop("init_images", None)
            params.pop("mask", None)
            scripts = params.get("alwayson_scripts") or {}
            params["alwayson_scripts"] = json.loads(json.dumps(scripts).replace(REF, "<ref>"))
            out[key] = params
    return out


def run(url, name, out_dir, log_path=None):
    make = CASES[name]
    route, payload = make(url) if make.__code__.co_argcount else make()
    log_start = os.path.getsize(log_path) if log_path and os.path.exists(log_path) else None
    t0 = time.time()
    r = requests.post(f"{url}/sdapi/v1/{route}", json=payload, timeout=1800)
    dt = time.time() - t0
    try:
        data = r.json()
    except ValueError:
        data = {"raw": r.text[:2000]}
    info = {}
    if isinstance(data.get("info"), str):
        try:
            info = json.loads(data["info"])
        except ValueError:
            pass
    infotexts = info.get("infotexts") or []
    images = data.get("images") or []
    for i, b64 in enumerate(images):
        with open(os.path.join(out_dir, f"{name}_{i}.png"), "wb") as f:
            f.write(base64.b64decode(b64.split(",", 1)[-1]))
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(dict(strip_images(data), info=info or data.get("info")), f, indent=1, default=str)
    ours = [TITLE in t for t in infotexts]
    located = [t.split(LOCATED, 1)[1].split('"')[0] if LOCATED in t else "" for t in infotexts[:1]]
    want = EXPECT_LOCATED.get(name)
    check = "" if want is None else (" located OK" if located and want in located[0] else " located FAILED")
    error = data.get("errors") or data.get("error") or data.get("detail") or ""
    expected = EXPECTED_STATUS.get(name, 200)
    status = f"HTTP {r.status_code}" + ("" if r.status_code == expected else f" (EXPECTED {expected})")
    print(f"{name:22s} {status} {dt:6.1f}s images={len(images)} infotexts={len(infotexts)} "
          f"ours={ours} located={located}{check} {str(error)[:300]}{log_note(log_path, log_start)}", flush=True)
    return r.status_code, data


def log_note(log_path, start):
    """What the request added to the WebUI's log: its lines naming us, and whether a traceback."""
    if start is None:
        return ""
    time.sleep(0.5)  # the handler prints after the response is built
    with open(log_path, errors="replace") as f:
        f.seek(start)
        added = f.read()
    ours = sum("Character-Adapter" in line for line in added.splitlines())
    return f" [log: {ours} line(s) naming us{', a TRACEBACK' if 'Traceback' in added else ''}]"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:7861")
    ap.add_argument("--out", default="/work/realwebui/out")
    ap.add_argument("--log", default="/work/realwebui/webui.log", help="the WebUI's log (start_webui.sh writes it)")
    ap.add_argument("cases", nargs="*")
    ap.add_argument("--list", action="store_true", help="print the case names and exit")
    a = ap.parse_args()
    if a.list:
        print("\n".join(CASES))
        return
    os.makedirs(a.out, exist_ok=True)
    sdxl = loaded_is_sdxl(a.url)
    for name in select(a.cases, sdxl):
        if name.startswith("sdxl_") != sdxl:
            print(f"{name:22s} skipped: needs the {'SDXL' if name.startswith('sdxl_') else 'SD1.5'} checkpoint loaded")
            continue
        run(a.url, name, a.out, a.log)


def loaded_is_sdxl(url: str) -> bool:
    """Whether the WebUI's current checkpoint is an SDXL one (by its name: random-sdxl...)."""
    current = requests.get(f"{url}/sdapi/v1/options", timeout=60).json().get("sd_model_checkpoint", "")
    return "sdxl" in current.lower()


def select(patterns, sdxl: bool):
    """Case names for the arguments: exact names, globs, or (none) every safe case of the family."""
    if not patterns:
        return [n for n in CASES if n.startswith("sdxl_") == sdxl and n not in DANGEROUS]
    out = []
    for pattern in patterns:
        if pattern in CASES:
            out.append(pattern)
            continue
        matched = [n for n in CASES if fnmatch.fnmatchcase(n, pattern) and n not in DANGEROUS]
        if not matched:
            raise SystemExit(f"no case matches {pattern!r}; --list shows them")
        out += matched
    return out


if __name__ == "__main__":
    main()
