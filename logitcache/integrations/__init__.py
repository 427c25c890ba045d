"""Bridges to the libraries users already train with (Hugging Face `datasets`)."""
