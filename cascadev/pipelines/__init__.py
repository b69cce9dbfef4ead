"""Inference: the diffusers pipelines and what they are made of.

``cascade``: ``CascadeVPipeline``, video <-> semantic latents through the LDM-VAE cascade (Stage B and A).
``text_to_video``: ``TextToVideoPipeline``, prompts -> the Stage C base model -> the cascade -> video.
``upscale``: ``CascadeVUpscalePipeline``, the resize route (4x resolution or frame rate).
``runtime`` (precision, Stage A's memory, compilation, the sampler: what the three share), ``sampling`` (the DiT over
diffusers schedulers and a clip's windows), ``tiling`` (where the windows go, how their outputs merge),
``conditioning`` (the condition on the Stage A grid), ``frames`` (sizes, resizing, the colour fix), ``source_vae``
(another model's VAE as the source of the latents), ``text_encoder`` (Stage C's frozen open_clip text tower) and
``distributed`` (windows split across processes) are their parts;
``convert`` rewrites folders of cascadev < 0.2. The commands' options are declared and acted on in ``cascadev/cli/``
(``arguments``, ``options``).

Nothing is imported here, so the cascade loads without the text side's dependencies (open_clip) and the command line
parses without torch.
"""

DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}     # short precision names -> torch's
