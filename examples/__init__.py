"""The example scripts (digits): run ``python -m examples.<name>``. The Stable Diffusion job is
the installed command ``siss-stable-diffusion`` (``siss.stable_diffusion``)."""
