"""Test double of the WebUI `modules` package (v1.10.1). See tests/webui_double/README.md."""
