"""The Stable Diffusion job: remove a memorized training image from a diffusers text-to-image
pipeline with SISS (the paper's Section 5.3), as the installed command ``siss-stable-diffusion``
(or ``python -m siss.stable_diffusion``). Tutorial: docs/stable_diffusion.md.

One module per stage, in the order the ``run`` stage runs them:

* ``generate``: images of the training prompt, seeded per image, and their final latents (the
  training data);
* ``split``: the images into the memorized copies (A, the forget set) and the rest (X \\ A, the
  keep set), by a reference image or the paper's 2-means rule;
* ``unlearn``: the fine-tune with ``siss.Unlearner`` under ``accelerate`` (LoRA or the whole
  denoiser, checkpoints and ``--resume_from_checkpoint latest``);
* ``verify``: the memorized fraction on fresh seeds, the noise-magnitude score, CLIP quality,
  and the paper's verdict;

with ``pipeline`` (loading the pipeline, its dtype, its denoiser and LoRA), ``files`` (the job
folder: atomic JSON and PNG writes, ``config.json`` and its checks, checkpoints, prompt lists)
and ``cli`` (the flags, their checks before anything is loaded, and the summary).

An application on top of the library: it uses ``siss.recipe``, ``siss.adapters``, ``siss.audit``
and ``siss.metrics``, and nothing in ``siss`` imports it. diffusers, accelerate, PEFT and
matplotlib are imported where they are used, so ``import siss.stable_diffusion`` (and
``--help``) needs torch only.
"""
