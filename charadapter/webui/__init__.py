"""WebUI host adapter: the only part of the extension that imports the WebUI (`modules`) or gradio."""
