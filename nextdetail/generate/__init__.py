"""Generation from a trained next-detail transformer (nextdetail.train) and its tokenizer, without
retraining. One file per concern, one per command:

    options.py   DrawOptions (top-k, top-p, temperature, device, memory; validated once), SampleError
    draw.py      one token per position: filter_logits, inverse_cdf, draw_per_row, guidance_scale
    loop.py      generate: the KV-cached, map-by-map loop with classifier-free guidance
    highres.py   above the trained resolution: upsampled base, details drawn patchwise
    run.py       load_run: a run's model and tokenizer; class labels and strip names
    images.py    decode and tile: features to 8-bit images, strips and grids
    memory.py    check_draw: a draw refused before it starts when it cannot fit
    sample.py    `nextdetail sample` (SampleConfig, sample_to_folder)
    batches.py   `nextdetail sample --per-class` (sample_batches, sample_per_class): resumable, torchrun-aware
    upscale.py   `nextdetail upscale`: super-resolution by token prefix
    edit.py      `nextdetail edit`: recolor and relight through the factors

Modules import torch and are imported by path, e.g. `from nextdetail.generate.sample import sample_to_folder`.
"""
