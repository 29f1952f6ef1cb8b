"""LoRA training: musubi-tuner's dataset TOML and cache layout, timestep sampling, the flow-matching
loss, the trainable LoRA network, and the training loop. Sits above the engine, which makes the
samples shown during training (see DESIGN.md's layers)."""
