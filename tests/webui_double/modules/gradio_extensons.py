"""Gradio patches the WebUI installs at startup; mirrors modules/gradio_extensons.py [sic].

Only the part that changes what an extension may pass: every IOComponent accepts `tooltip=`
(popped and kept as .webui_tooltip) and gets a 'gradio-<block>' css class.
"""
import gradio as gr

_component = gr.components.IOComponent
original_IOComponent_init = getattr(_component, "_webui_double_original_init", _component.__init__)


def IOComponent_init(self, *args, **kwargs):  # mirrors modules/gradio_extensons.py (IOComponent_init)
    self.webui_tooltip = kwargs.pop('tooltip', None)
    res = original_IOComponent_init(self, *args, **kwargs)
    self.elem_classes = [f"gradio-{self.get_block_name()}", *(self.elem_classes or [])]
    return res


_component._webui_double_original_init = original_IOComponent_init
_component.__init__ = IOComponent_init
