"""Training on DeepSpeed: typed config, the loop, checkpoints and export. The only package that imports DeepSpeed."""
