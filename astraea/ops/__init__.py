"""The operators a rewritten graph calls (`sparse`, `ulysses`) and the inputs it takes
(`signature`): the layer below both the passes that write such graphs and the runtime that
runs them, so that neither imports the other for them. Importing registers torch.ops.astraea.*."""

from . import sparse, ulysses  # noqa: F401  (registers the ops)
