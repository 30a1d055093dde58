"""The application layer's jobs: pretrain, finetune, evaluate (each ``main(argv) -> int``)."""
