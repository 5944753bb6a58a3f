"""The example scripts (digits, Stable Diffusion): run ``python -m examples.<name>``."""
