"""Datasets (Fashion-MNIST IDX, CIFAR-100 pickles, ImageFolder), the train/val/test protocol, batching."""
from klas.data.datasets import (DATASETS, FASHION_MNIST, FASHION_MNIST_ROOT, SPLITS, DataSpec, ImageSet, load_dataset,
                                load_fashion_mnist, split_indices)
from klas.data.loader import augment, batches, num_batches
from klas.data.stream import Preprocess, StreamSet, open_image, open_split

__all__ = ["DATASETS", "FASHION_MNIST", "FASHION_MNIST_ROOT", "SPLITS", "DataSpec", "ImageSet", "load_dataset",
           "load_fashion_mnist", "split_indices", "augment", "batches", "num_batches", "Preprocess", "StreamSet",
           "open_image", "open_split"]
