"""`make_depth_dependent`: random tiny models whose exits disagree, for the decoding tests.

With the default init a random tiny model's exits nearly always agree, so exit modes would
all take the same path. Redrawing the residual-branch output kernels with std
1/sqrt(fan_in) makes every layer move the residual stream; scaling the embeddings sharpens
the distributions, so confidences vary by token and layer.
"""

import numpy as np


def make_depth_dependent(model, embedding_scale: float | None = None, seed: int = 1):
    """Redraws `model`'s residual-branch output kernels in place (and scales its token
    embeddings by `embedding_scale`); returns `model`."""
    rng = np.random.default_rng(seed)
    for weight in model.weights:
        if weight.path.endswith(("ffn/down/kernel", "attention_output/kernel")):
            std = 1.0 / np.sqrt(weight.shape[0])
            weight.assign(rng.normal(0.0, std, weight.shape).astype("float32"))
    if embedding_scale is not None:
        embeddings = model.token_embedding.embeddings
        embeddings.assign(np.asarray(embeddings) * embedding_scale)
    return model
