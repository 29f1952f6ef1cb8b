"""Layer types shared by loading and optim (below both, above nothing): the quantised linear layer."""
