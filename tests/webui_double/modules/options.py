"""Settings store; mirrors modules/options.py."""
from modules.shared_cmd_options import cmd_opts


class OptionInfo:  # mirrors modules/options.py (OptionInfo)
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None, refresh=None, comment_before='', comment_after='', infotext=None, restrict_api=False, category_id=None):
        self.default = default
        self.label = label
        self.component = component
        self.component_args = component_args
        self.onchange = onchange
        self.section = section
        self.category_id = category_id
        self.refresh = refresh
        self.do_not_save = False
        self.comment_before = comment_before
        self.comment_after = comment_after
        self.infotext = infotext
        self.restrict_api = restrict_api

    def link(self, label, url):  # mirrors modules/options.py (OptionInfo.link)
        self.comment_before += f"[<a href='{url}' target='_blank'>{label}</a>]"
        return self

    def js(self, label, js_func):  # mirrors modules/options.py (OptionInfo.js)
        self.comment_before += f"[<a onclick='{js_func}(); return false'>{label}</a>]"
        return self

    def info(self, info):  # mirrors modules/options.py (OptionInfo.info)
        self.comment_after += f"<span class='info'>({info})</span>"
        return self

    def html(self, html):  # mirrors modules/options.py (OptionInfo.html)
        self.comment_after += html
        return self

    def needs_restart(self):  # mirrors modules/options.py (OptionInfo.needs_restart)
        self.comment_after += " <span class='info'>(requires restart)</span>"
        return self

    def needs_reload_ui(self):  # mirrors modules/options.py (OptionInfo.needs_reload_ui)
        self.comment_after += " <span class='info'>(requires Reload UI)</span>"
        return self


class OptionHTML(OptionInfo):  # mirrors modules/options.py (OptionHTML)
    def __init__(self, text):
        def component(**kwargs):
            import gradio as gr
            return gr.HTML(elem_classes="settings-info", **kwargs)

        super().__init__(str(text).strip(), label='', component=component)
        self.do_not_save = True


def options_section(section_identifier, options_dict):  # mirrors modules/options.py (options_section)
    """Stamp a (key, title) or (key, title, category) section on every OptionInfo of the dict."""
    for v in options_dict.values():
        if len(section_identifier) == 2:
            v.section = section_identifier
        elif len(section_identifier) == 3:
            v.section = section_identifier[0:2]
            v.category_id = section_identifier[2]
    return options_dict


options_builtin_fields = {"data_labels", "data", "restricted_opts", "typemap"}  # mirrors modules/options.py


class Options:  # mirrors modules/options.py (Options)
    typemap = {int: float}

    def __init__(self, data_labels, restricted_opts):
        self.data_labels = data_labels
        self.data = {k: v.default for k, v in self.data_labels.items() if not v.do_not_save}
        self.restricted_opts = restricted_opts

    def __setattr__(self, key, value):  # mirrors modules/options.py (Options.__setattr__)
        if key in options_builtin_fields:
            return super().__setattr__(key, value)
        if self.data is not None and (key in self.data or key in self.data_labels):
            assert not cmd_opts.freeze_settings, "changing settings is disabled"
            info = self.data_labels.get(key, None)
            if info is not None and info.do_not_save:
                return
            comp_args = info.component_args if info else None
            if isinstance(comp_args, dict) and comp_args.get('visible', True) is False:
                raise RuntimeError(f"not possible to set '{key}' because it is restricted")
            self.data[key] = value
            return
        return super().__setattr__(key, value)

    def __getattr__(self, item):  # mirrors modules/options.py (Options.__getattr__): data first, then the default
        if item in options_builtin_fields:
            return super().__getattribute__(item)
        if self.data is not None and item in self.data:
            return self.data[item]
        if item in self.data_labels:
            return self.data_labels[item].default
        return super().__getattribute__(item)

    def set(self, key, value, is_api=False, run_callbacks=True):  # mirrors modules/options.py (Options.set)
        """Set an option and run its onchange; a failing onchange restores the old value."""
        oldval = self.data.get(key, None)
        if oldval == value:
            return False
        option = self.data_labels[key]
        if option.do_not_save:
            return False
        if is_api and option.restrict_api:
            return False
        try:
            setattr(self, key, value)
        except RuntimeError:
            return False
        if run_callbacks and option.onchange is not None:
            try:
                option.onchange()
            except Exception as e:
                from modules import errors
                errors.display(e, f"changing setting {key} to {value}")
                setattr(self, key, oldval)
                return False
        return True

    def get_default(self, key):  # mirrors modules/options.py (Options.get_default)
        data_label = self.data_labels.get(key)
        return None if data_label is None else data_label.default

    def onchange(self, key, func, call=True):  # mirrors modules/options.py (Options.onchange): calls func now by default
        item = self.data_labels.get(key)
        item.onchange = func
        if call:
            func()

    def add_option(self, key, info):  # mirrors modules/options.py (Options.add_option)
        self.data_labels[key] = info
        if key not in self.data and not info.do_not_save:
            self.data[key] = info.default

    def cast_value(self, key, value):  # mirrors modules/options.py (Options.cast_value)
        if value is None:
            return None
        default_value = self.data_labels[key].default
        if default_value is None:
            default_value = getattr(self, key, None)
        if default_value is None:
            return None
        expected_type = type(default_value)
        if expected_type == bool and value == "False":
            return False
        return expected_type(value)
