"""Test double of the AUTOMATIC1111 WebUI v1.10.1 host (see README.md)."""
