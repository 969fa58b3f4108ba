"""Render the Character-Adapter accordion as the WebUI v1.10.1 shows it, for docs/accordion.png.

Gradio 3.41.2 Blocks with the WebUI's default theme, the WebUI's style.css and its
javascript/inputAccordion.js (read from a WebUI checkout, not copied), the extension's style.css,
and build_ui() from the test double's ui_components. Prints the URL, then serves until killed.
Usage: python accordion_app.py <webui checkout dir> <port>
"""
import os
import sys

from PIL import Image, ImageDraw

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests", "webui_double"))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
from modules import gradio_extensons  # noqa: E402,F401  the WebUI's tooltip= patch

from charadapter.params import ARG_NAMES  # noqa: E402
from charadapter.webui import ui  # noqa: E402
from charadapter.webui.models import ModelListing  # noqa: E402

webui = sys.argv[1]
port = int(sys.argv[2])


def character():
    """A simple drawn character: the kind of reference the panel takes."""
    img = Image.new("RGB", (256, 384), (236, 232, 224))
    d = ImageDraw.Draw(img)
    d.rectangle((104, 300, 124, 372), fill=(40, 60, 120))   # legs
    d.rectangle((132, 300, 152, 372), fill=(40, 60, 120))
    d.rectangle((98, 200, 158, 306), fill=(44, 66, 132))     # trousers
    d.rectangle((98, 368, 126, 380), fill=(50, 40, 30))      # shoes
    d.rectangle((130, 368, 158, 380), fill=(50, 40, 30))
    d.polygon([(84, 112), (172, 112), (166, 214), (90, 214)], fill=(196, 40, 48))  # jacket
    d.rectangle((70, 116, 88, 200), fill=(196, 40, 48))       # sleeves
    d.rectangle((168, 116, 186, 200), fill=(196, 40, 48))
    d.ellipse((70, 196, 88, 214), fill=(238, 200, 170))       # hands
    d.ellipse((168, 196, 186, 214), fill=(238, 200, 170))
    d.line((128, 114, 128, 212), fill=(120, 20, 28), width=3)
    d.rectangle((118, 92, 138, 114), fill=(238, 200, 170))    # neck
    d.ellipse((92, 28, 164, 104), fill=(238, 200, 170))       # face
    d.chord((88, 20, 168, 84), 180, 360, fill=(70, 44, 30))   # hair
    d.ellipse((110, 58, 118, 66), fill=(40, 40, 40))          # eyes
    d.ellipse((138, 58, 146, 66), fill=(40, 40, 40))
    d.arc((114, 70, 142, 90), 20, 160, fill=(150, 60, 60), width=2)
    return img


listing = ModelListing(
    adapters={"ip-adapter-plus_sd15.safetensors": "x", "ip-adapter_sd15.safetensors": "x"},
    encoders={"clip_h.pth": "x"},
)
css = open(os.path.join(webui, "style.css"), encoding="utf-8").read()
css += open(os.path.join(REPO, "style.css"), encoding="utf-8").read()
css += "\nbody, gradio-app { background: var(--body-background-fill) !important; }\n#shot { max-width: 760px; }\n"
accordion_js = open(os.path.join(webui, "javascript", "inputAccordion.js"), encoding="utf-8").read()
accordion_js = accordion_js[:accordion_js.index("onUiLoaded(")]
load_js = """() => {
    window.gradioApp = () => document.querySelector('gradio-app').shadowRoot || document;
    window.updateInput = (el) => el.dispatchEvent(new Event('input', {bubbles: true}));
    %s
    window.inputAccordionChecked = inputAccordionChecked;
    for (const acc of gradioApp().querySelectorAll('.input-accordion')) { setupAccordion(acc); }
}""" % accordion_js

theme = gr.themes.Default(font=["Source Sans Pro", "ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["IBM Plex Mono", "ui-monospace", "Consolas", "monospace"])
with gr.Blocks(css=css, theme=theme, analytics_enabled=False) as demo:
    with gr.Column(elem_id="shot"):
        with gr.Group(elem_id="script_txt2img_character_adapter"):
            components = ui.build_ui(False, lambda: listing, lambda: listing)
    c = dict(zip(ARG_NAMES, components))
    c["enabled"].value = True
    c["enabled"].accordion.open = True
    c["image"].value = c["image"].postprocess(character())
    c["model"].value = "ip-adapter-plus_sd15.safetensors"
    for block in demo.blocks.values():
        if isinstance(block, gr.Accordion) and block.label == "Advanced":
            block.open = True
    demo.load(None, None, None, _js=load_js)

demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, show_error=True)
print(f"http://127.0.0.1:{port}/", flush=True)
import time  # noqa: E402
while True:
    time.sleep(3600)
