"""Trains models/digits.model on scikit-learn's 8×8 `digits` with Chainer 7.8.1 and writes what the repository
ships: the weights (models/digits.npz, Chainer's save_npz layout), the held-out split as cnnc preprocesses it
(tests/fixtures/digits/), its accuracy, and one example PNG per digit (models/examples/digit-N.png).

    python models/train_digits.py      # needs chainer==7.8.1, scikit-learn, pillow; about a minute on 2 cores

The network is the one models/digits.model describes, written here as a Chainer Chain. Inputs are what
`cnnc run` makes of an 8×8 greyscale PNG with its default preprocessing: the pixel (0..255) minus the mean
of the three default channel means, divided by 255 (docs/cli.md). The digits' 0..16 values are stored in the
PNGs as round(v × 255 / 16), and trained on through the same formula, so a PNG and its array agree exactly.
"""
import json
import os

import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# cnnc's default --mean averaged for a one-channel model, in float32 arithmetic as cnnc computes it.
MEAN = (np.float32(123.68) + np.float32(116.78) + np.float32(103.94)) / np.float32(3)


class Digits(chainer.Chain):
    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.conv1 = L.Convolution2D(1, 32, 3, pad=1)
            self.bn1 = L.BatchNormalization(32)
            self.conv2 = L.Convolution2D(32, 64, 3, pad=1)
            self.bn2 = L.BatchNormalization(64)
            self.conv3 = L.Convolution2D(64, 64, 3, pad=1)
            self.bn3 = L.BatchNormalization(64)
            self.fc = L.Linear(256, 10)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.max_pooling_2d(F.relu(self.bn2(self.conv2(h))), 2, stride=2)
        h = F.max_pooling_2d(F.relu(self.bn3(self.conv3(h))), 2, stride=2)
        return self.fc(F.dropout(h, ratio=0.3))


def pixels(images):
    """The digits' 0..16 values as 8-bit grey pixels, as the example PNGs store them."""
    return np.round(images * 255.0 / 16.0).astype(np.uint8)


def preprocess(px):
    """What cnnc's default preprocessing makes of those pixels: (pixel - mean) / 255, as float32."""
    return ((px.astype(np.float32) - MEAN) * np.float32(1 / 255))[:, None]


def shifted(x, rng):
    """Training augmentation: each image moved by up to one pixel in each direction (background filled)."""
    out = np.full_like(x, x.min())
    for i, (dy, dx) in enumerate(rng.integers(-1, 2, size=(len(x), 2))):
        src = x[i, :, max(0, -dy):8 - max(0, dy), max(0, -dx):8 - max(0, dx)]
        out[i, :, max(0, dy):max(0, dy) + src.shape[1], max(0, dx):max(0, dx) + src.shape[2]] = src
    return out


def main():
    np.random.seed(0)
    rng = np.random.default_rng(0)
    digits = load_digits()
    px = pixels(digits.images)
    px_train, px_test, y_train, y_test = train_test_split(px, digits.target, test_size=0.25, random_state=0, stratify=digits.target)
    x_train, x_test = preprocess(px_train), preprocess(px_test)
    y_train, y_test = y_train.astype(np.int32), y_test.astype(np.int32)

    model = Digits()
    opt = chainer.optimizers.Adam(alpha=1e-3)
    opt.setup(model)
    for epoch in range(60):
        order = rng.permutation(len(x_train))
        xs = shifted(x_train, rng)
        with chainer.using_config("train", True):
            for b in range(0, len(order), 64):
                idx = order[b:b + 64]
                loss = F.softmax_cross_entropy(model(xs[idx]), y_train[idx])
                model.cleargrads()
                loss.backward()
                opt.update()
    with chainer.using_config("train", False), chainer.no_backprop_mode():
        logits = model(x_test).array
    accuracy = float((logits.argmax(1) == y_test).mean())
    print(f"held-out accuracy: {accuracy:.4f} ({int((logits.argmax(1) == y_test).sum())}/{len(y_test)})")

    chainer.serializers.save_npz(os.path.join(ROOT, "models", "digits.npz"), model)
    fixtures = os.path.join(ROOT, "tests", "fixtures", "digits")
    os.makedirs(fixtures, exist_ok=True)
    np.save(os.path.join(fixtures, "x_test.npy"), x_test)
    np.save(os.path.join(fixtures, "y_test.npy"), y_test.astype(np.int64))
    np.save(os.path.join(fixtures, "logits_chainer.npy"), logits.astype(np.float32))
    with open(os.path.join(fixtures, "accuracy.json"), "w") as f:
        json.dump({"accuracy": accuracy, "correct": int((logits.argmax(1) == y_test).sum()), "n": len(y_test)}, f, indent=1)
        f.write("\n")
    # One example per digit: the first held-out image of that class that the model gets right.
    for d in range(10):
        i = next(i for i in range(len(y_test)) if y_test[i] == d and logits[i].argmax() == d)
        Image.fromarray(px_test[i], mode="L").save(os.path.join(ROOT, "models", "examples", f"digit-{d}.png"))


if __name__ == "__main__":
    main()
