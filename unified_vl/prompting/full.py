"""``full``: fine-tune every parameter (the default method); ``train.freeze`` may still freeze parts.

The task's templates make the inputs, its decoding reads the answers, and a run exports the whole
model folder.
"""

from unified_vl.prompting import Method

METHOD = Method(
    name="full", description="every parameter trains (train.freeze can freeze parts); the task's own prompts"
)
