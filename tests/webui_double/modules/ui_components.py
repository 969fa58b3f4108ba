"""Gradio helpers for extension UIs; mirrors modules/ui_components.py (gradio 3.41.2)."""
import gradio as gr


class FormComponent:  # mirrors modules/ui_components.py (FormComponent)
    def get_expected_parent(self):
        return gr.components.Form


gr.Dropdown.get_expected_parent = FormComponent.get_expected_parent  # mirrors: the WebUI patches this at import


class ToolButton(FormComponent, gr.Button):  # mirrors (ToolButton): small emoji button, css class 'tool'
    def __init__(self, *args, **kwargs):
        classes = kwargs.pop("elem_classes", [])
        super().__init__(*args, elem_classes=["tool", *classes], **kwargs)

    def get_block_name(self):
        return "button"


class ResizeHandleRow(gr.Row):  # mirrors (ResizeHandleRow)
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.elem_classes.append("resize-handle-row")

    def get_block_name(self):
        return "row"


class FormRow(FormComponent, gr.Row):  # mirrors (FormRow)
    def get_block_name(self):
        return "row"


class FormColumn(FormComponent, gr.Column):  # mirrors (FormColumn)
    def get_block_name(self):
        return "column"


class FormGroup(FormComponent, gr.Group):  # mirrors (FormGroup)
    def get_block_name(self):
        return "group"


class FormHTML(FormComponent, gr.HTML):  # mirrors (FormHTML)
    def get_block_name(self):
        return "html"


class FormColorPicker(FormComponent, gr.ColorPicker):  # mirrors (FormColorPicker)
    def get_block_name(self):
        return "colorpicker"


class DropdownMulti(FormComponent, gr.Dropdown):  # mirrors (DropdownMulti)
    def __init__(self, **kwargs):
        super().__init__(multiselect=True, **kwargs)

    def get_block_name(self):
        return "dropdown"


class DropdownEditable(FormComponent, gr.Dropdown):  # mirrors (DropdownEditable)
    def __init__(self, **kwargs):
        super().__init__(allow_custom_value=True, **kwargs)

    def get_block_name(self):
        return "dropdown"


class InputAccordion(gr.Checkbox):  # mirrors (InputAccordion): a hidden Checkbox (the input, a bool) + an Accordion that follows it
    global_index = 0

    def __init__(self, value, **kwargs):
        self.accordion_id = kwargs.get('elem_id')
        if self.accordion_id is None:
            self.accordion_id = f"input-accordion-{InputAccordion.global_index}"
            InputAccordion.global_index += 1
        kwargs_checkbox = {**kwargs, "elem_id": f"{self.accordion_id}-checkbox", "visible": False}
        super().__init__(value, **kwargs_checkbox)
        self.change(fn=None, _js='function(checked){ inputAccordionChecked("' + self.accordion_id + '", checked); }', inputs=[self])
        kwargs_accordion = {
            **kwargs,
            "elem_id": self.accordion_id,
            "label": kwargs.get('label', 'Accordion'),
            "elem_classes": ['input-accordion'],
            "open": value,
        }
        self.accordion = gr.Accordion(**kwargs_accordion)

    def extra(self):  # mirrors (InputAccordion.extra): a column shown in the accordion's label
        return gr.Column(elem_id=self.accordion_id + '-extra', elem_classes='input-accordion-extra', min_width=0)

    def __enter__(self):
        self.accordion.__enter__()
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        self.accordion.__exit__(exc_type, exc_val, exc_tb)

    def get_block_name(self):
        return "checkbox"
